"""The store controller: receives kiosk heartbeats and fault reports (SEC-KI-7, SEC-KI-8).

A kiosk is watched from its first heartbeat; one silent for SILENCE_LIMIT seconds is reported
(logged, and pushed as a fault). Every fault, reported by a kiosk or found here, is pushed to the
store register and the maintenance center, each retried until it gets through. In this
emulation both are in-process sinks (`register`, `maintenance`): the topology has no node for them.
"""

from __future__ import annotations

import logging

import trio

from gateway.node.server import App, NodeContext, Peer
from gateway.nodes.heartbeat import HeartbeatMonitor, notify_fault, watch
from gateway.protocol.h2trio import Stream
from gateway.protocol.http import method_path, refuse, send_json

log = logging.getLogger("konbini.store-controller")


class StoreController(App):
    def __init__(self, ctx: NodeContext, nursery: trio.Nursery | None = None) -> None:
        self.ctx = ctx
        self.monitor = HeartbeatMonitor()
        self.faults: list[tuple[str, bytes]] = []
        self.register: list[dict] = []  # what the store register was told
        self.maintenance: list[dict] = []  # what the maintenance center was told
        self._nursery = nursery
        if nursery is not None:
            nursery.start_soon(watch, self.monitor, self._kiosk_silent)

    @property
    def last_seen(self) -> dict[str, float]:
        return self.monitor.last_seen

    async def handle(self, stream: Stream, peer: Peer) -> None:
        method, path = method_path(stream.headers)
        body = await stream.read_body(16 * 1024)
        if path == "/v1/heartbeat":
            if self.monitor.seen(peer.identity, trio.current_time()):
                log.warning("kiosk %s is back", peer.identity)
        elif path == "/v1/fault":
            self.faults.append((peer.identity, body))
            self._push({"kiosk": peer.identity, "fault": body.decode("utf-8", "replace")[:512], "at": self.ctx.clock.now().isoformat()})
        else:
            await refuse(stream, 404, "bad-request", "unknown endpoint")
            return
        await send_json(stream, 200, {"status": "ok"})

    async def _kiosk_silent(self, kiosk: str) -> None:
        log.error("kiosk %s silent for %.0f s", kiosk, self.monitor.limit)
        self._push({"kiosk": kiosk, "fault": "silent", "at": self.ctx.clock.now().isoformat()})

    def _push(self, fault: dict) -> None:
        async def to(sink: list[dict]):
            async def send(f: dict) -> None:
                sink.append(f)
            return send

        async def fan_out() -> None:
            await notify_fault(fault, {"register": await to(self.register), "maintenance": await to(self.maintenance)})

        if self._nursery is not None:
            self._nursery.start_soon(fan_out)
        else:
            self.register.append(fault)
            self.maintenance.append(fault)
