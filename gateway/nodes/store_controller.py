"""The store controller: kiosk heartbeats and fault reports (SEC-KI-7, SEC-KI-8), and the store's
administration API (SEC-ST-3/KI-6).

A kiosk is watched from its first heartbeat (the watching task starts at the store's first); one silent for `silence_limit` seconds (default
SILENCE_LIMIT, 30 s; the operator may change it) is reported (logged, and pushed as a fault).
Every fault, reported by a kiosk or found here, is pushed to the store register and the
maintenance center, each retried until it gets through. In this emulation both are in-process
sinks (`register`, `maintenance`): the topology has no node for them; the admin API shows them.

`StoreControllerAdmin` is the admin API on the controller's `admin_port`, served by its own
`AdminServer`: only the operator principal, at the store console, gets past its allow-list;
store staff are refused each request with `principal-not-allowed` (counted in `denials`).
  GET  /admin/kiosks               -> every watched kiosk: seconds since its last heartbeat, silent or not
  POST /admin/kiosks/{id}/restart  -> a restart order for that kiosk, recorded (202)
  GET  /admin/config               -> {"silence_limit"}
  PUT  /admin/config               {"silence_limit": seconds (0 < s <= 300)}
  GET  /admin/faults               -> what the store register and the maintenance center were told
"""

from __future__ import annotations

import json
import logging
import math

import trio

from gateway.node.server import App, NodeContext, Peer
from gateway.nodes.heartbeat import SILENCE_LIMIT, HeartbeatMonitor, notify_fault, watch
from gateway.protocol.driver import Stream
from gateway.protocol.http import method_path, refuse, send_json

log = logging.getLogger("konbini.store-controller")

MAX_SILENCE_LIMIT = 300.0


class StoreController(App):
    def __init__(
        self, ctx: NodeContext, nursery: trio.Nursery | None = None, silence_limit: float = SILENCE_LIMIT
    ) -> None:
        self.ctx = ctx
        self.monitor = HeartbeatMonitor(limit=silence_limit)
        self.faults: list[tuple[str, bytes]] = []
        self.register: list[dict] = []  # what the store register was told
        self.maintenance: list[dict] = []  # what the maintenance center was told
        self.silence_reports: list[dict] = []  # each silent kiosk found: when, after how long, under which limit
        self.restarts: list[dict] = []  # restart orders given through the admin API
        self._nursery = nursery
        self._watch_scope: trio.CancelScope | None = None
        self._watching = False  # the watcher starts at the first heartbeat: a national process has
        # 2,750 controllers, most never hearing from a kiosk, and a task each was a tenth of its start

    @property
    def last_seen(self) -> dict[str, float]:
        return self.monitor.last_seen

    def set_silence_limit(self, seconds: float) -> None:
        """A new bound applies at once: the watcher re-computes its next deadline."""
        self.monitor.limit = seconds
        if self._watch_scope is not None:
            self._watch_scope.cancel()

    async def _watch(self) -> None:
        while True:
            with trio.CancelScope() as self._watch_scope:
                await watch(self.monitor, self._kiosk_silent)

    async def handle(self, stream: Stream, peer: Peer) -> None:
        method, path = method_path(stream.headers)
        body = await stream.read_body(16 * 1024)
        if path == "/v1/heartbeat":
            if not self._watching and self._nursery is not None:
                self._watching = True
                self._nursery.start_soon(self._watch)
            if self.monitor.seen(peer.identity, trio.current_time()):
                log.warning("kiosk %s is back", peer.identity)
        elif path == "/v1/fault":
            self.faults.append((peer.identity, body))
            self._push(
                {
                    "kiosk": peer.identity,
                    "fault": body.decode("utf-8", "replace")[:512],
                    "at": self.ctx.clock.now().isoformat(),
                }
            )
        else:
            await refuse(stream, 404, "bad-request", "unknown endpoint")
            return
        await send_json(stream, 200, {"status": "ok"})

    async def _kiosk_silent(self, kiosk: str) -> None:
        silent_for = trio.current_time() - self.monitor.silent_since.get(kiosk, trio.current_time())
        log.error("kiosk %s silent for %.1f s (limit %.1f s)", kiosk, silent_for, self.monitor.limit)
        at = self.ctx.clock.now().isoformat()
        self.silence_reports.append(
            {"kiosk": kiosk, "at": at, "silent_for_s": round(silent_for, 3), "limit_s": self.monitor.limit}
        )
        self._push({"kiosk": kiosk, "fault": "silent", "at": at})

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


class StoreControllerAdmin(App):
    """The administration API over one `StoreController`'s state."""

    def __init__(self, controller: StoreController) -> None:
        self.controller = controller

    async def handle(self, stream: Stream, peer: Peer) -> None:
        c = self.controller
        method, path = method_path(stream.headers)
        body = await stream.read_body(4096)
        parts = path.strip("/").split("/")
        log.info("admin %s %s by %s", method, path, peer.identity)  # the audit trail: who operated what
        if (method, path) == ("GET", "/admin/kiosks"):
            now = trio.current_time()
            kiosks = [
                {"kiosk": k, "last_heartbeat_s_ago": round(now - t, 3), "silent": k in c.monitor.silent_since}
                for k, t in sorted(c.monitor.last_seen.items())
            ]
            await send_json(
                stream, 200, {"kiosks": kiosks, "silence_limit": c.monitor.limit, "silence_reports": c.silence_reports}
            )
        elif method == "POST" and len(parts) == 4 and parts[:2] == ["admin", "kiosks"] and parts[3] == "restart":
            kiosk = parts[2]
            if (
                c.ctx.topo.nodes.get(kiosk) is None
                or c.ctx.topo.nodes[kiosk].kind != "kiosk"
                or c.ctx.topo.nodes[kiosk].site != c.ctx.node.site
            ):
                await refuse(stream, 404, "unknown-kiosk", f"{kiosk} is not a kiosk of this store")
                return
            order = {"kiosk": kiosk, "by": peer.identity, "at": c.ctx.clock.now().isoformat()}
            c.restarts.append(order)
            await send_json(stream, 202, {"status": "restart-ordered", **order})
        elif (method, path) == ("GET", "/admin/config"):
            await send_json(stream, 200, {"silence_limit": c.monitor.limit})
        elif (method, path) == ("PUT", "/admin/config"):
            try:
                limit = float(json.loads(body).get("silence_limit"))
            except (ValueError, TypeError, AttributeError):
                limit = math.nan
            if not 0 < limit <= MAX_SILENCE_LIMIT:
                await refuse(
                    stream,
                    400,
                    "bad-config",
                    f"silence_limit must be a number of seconds in (0, {MAX_SILENCE_LIMIT:.0f}]",
                )
                return
            c.set_silence_limit(limit)
            log.warning("silence limit set to %.1f s by %s", limit, peer.identity)
            await send_json(stream, 200, {"silence_limit": limit})
        elif (method, path) == ("GET", "/admin/faults"):
            await send_json(stream, 200, {"register": c.register, "maintenance": c.maintenance})
        else:
            await refuse(stream, 404, "bad-request", "unknown endpoint")
