"""One emulated kiosk of the load generator: its persistent connection, its relay request, and
its devices that print nothing."""

from __future__ import annotations

import asyncio
import time
from contextlib import AbstractContextManager, nullcontext

from gateway.protocol.errors import StreamReset
from gateway.protocol.http import request_headers
from kiosk_emu import latency
from kiosk_emu.driver import SpoolWriter, exchange
from kiosk_emu.flow import KioskFlow
from kiosk_emu.latency import add_server_timing
from kiosk_emu.load.h2asyncio import AsyncioH2, connect_h2
from kiosk_emu.load.spec import KioskSpec, Workload
from kiosk_emu.load.stats import WorkerStats


class LoadKiosk:
    """One emulated kiosk: its persistent connection (reopened if it dies) and its card."""

    def __init__(self, spec: KioskSpec, ctx, card, center_key) -> None:
        self.spec = spec
        self.ctx = ctx
        self.card = card
        self.center_key = center_key
        self.conn: AsyncioH2 | None = None
        self._lock = asyncio.Lock()
        self.make_ctx = None  # fleet mode: KioskSpec -> its client context

    async def connection(self, stats: WorkerStats | None = None) -> AsyncioH2:
        if self.conn is not None and not self.conn.core.closed:
            return self.conn
        async with self._lock:
            if self.conn is None or self.conn.core.closed:
                s = self.spec
                if self.ctx is None:  # fleet mode: made at the kiosk's first customer
                    self.ctx = self.make_ctx(s)
                self.conn = await connect_h2(
                    s.router_address, s.router_port, s.router_id, self.ctx, local_address=s.address
                )
                if stats is not None:
                    stats.connects += 1
            return self.conn

    def hang_up(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


async def relay_request(
    k: LoadKiosk, w: Workload, hops: dict[str, float], split: dict[str, float], kinds: dict[str, str]
) -> tuple[str, int]:
    conn = await k.connection()
    t0 = time.perf_counter()
    st = await conn.open_stream(request_headers("GET", f"/bench/blob?size={w.size}", k.spec.router_id), end_stream=True)
    try:
        headers = await st.receive_headers()
        t1 = time.perf_counter()
        add_server_timing(headers, hops)
        n = await st.drain_body()
        latency.split((t1 - t0) * 1000, (time.perf_counter() - t0) * 1000, headers, kinds, split)
        status = st.status
        if status != 200:
            reason = dict(headers).get(b"konbini-reason", f"http-{status}".encode()).decode()
            return f"error:{reason}", n
        return "ok", n
    except StreamReset:
        return "error:stream-reset", 0
    finally:
        conn.release(st)


def _discard(chunk: bytes) -> None:
    pass


class Paperless:
    """The load generator's kiosk devices (`kiosk_emu.driver.KioskDevices`): nothing is spooled
    or printed, no fee is taken, and there is no outbox, so the notice is sent once, answered or not."""

    def __init__(self, conn: AsyncioH2, authority: str) -> None:
        self.conn = conn
        self.authority = authority

    def spool(self, flow: KioskFlow) -> AbstractContextManager[SpoolWriter]:
        return nullcontext(_discard)

    def erase(self, flow: KioskFlow, event: str) -> None:
        pass

    async def pay(self, flow: KioskFlow) -> None:
        pass

    async def print(self, flow: KioskFlow) -> bool:
        return False

    async def printed(self, flow: KioskFlow, path: str, body: bytes) -> None:
        pass

    async def deliver(self, flow: KioskFlow, path: str, body: bytes) -> tuple[int, bytes]:
        return await exchange(self.conn, self.authority, "POST", path, body, flow)
