"""The store controller: receives kiosk heartbeats and fault reports (SEC-KI-7, SEC-KI-8)."""

from __future__ import annotations

import time

from gateway.h2trio import Stream
from gateway.http import method_path, refuse, send_json
from gateway.server import App, NodeContext, Peer


class StoreController(App):
    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx
        self.last_seen: dict[str, float] = {}  # kiosk id -> monotonic time of its last heartbeat
        self.faults: list[tuple[str, bytes]] = []

    async def handle(self, stream: Stream, peer: Peer) -> None:
        method, path = method_path(stream.headers)
        body = await stream.read_body(16 * 1024)
        if path == "/v1/heartbeat":
            self.last_seen[peer.identity] = time.monotonic()
        elif path == "/v1/fault":
            self.faults.append((peer.identity, body))
        else:
            await refuse(stream, 404, "bad-request", "unknown endpoint")
            return
        await send_json(stream, 200, {"status": "ok"})
