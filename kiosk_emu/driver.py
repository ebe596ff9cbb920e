"""The one driver of `KioskFlow`: the kiosk's requests, in their order, for both runtimes.

Theory of operation: `FlowDriver.run` walks a flow up to a verified document over one HTTP/2
connection — session, card authentication, the streamed document, or the misdelivery report —
and `FlowDriver.settle` takes it from there: pay → print → completion notice → erase. Every
request goes through `exchange`. Both are written against what the Trio kiosk's `TrioH2` and the
load generator's `AsyncioH2` share (`H2Driver.open_stream`/`release`, `Stream` for the
stream), so a change to the request order is made here once. Three rules:
1. what differs between the kiosks is their devices (`KioskDevices`: a spool on disk, a
   printer, a durable outbox; the load generator has none), never the order of the steps;
2. timeouts and cancellation stay with the caller's runtime (`trio.fail_after`,
   `asyncio.timeout`) and apply to `run` only: the driver only awaits streams, so a cancel
   there ends the whole request, and nothing has been paid;
3. `settle` starts with the payment, the point of no return (flow rule 3): the caller runs it
   where its cancel cannot reach (a shielded scope), bounded by the devices' own deadlines.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import datetime
from typing import Protocol

from gateway.protocol.driver import H2Driver
from gateway.protocol.http import request_headers
from gateway.protocol.streams import header
from kiosk_emu.flow import KioskFlow, State

SpoolWriter = Callable[[bytes], object]


class KioskDevices(Protocol):
    """What a kiosk has besides its connection, in the order the driver uses it."""

    def spool(self, flow: KioskFlow) -> AbstractContextManager[SpoolWriter]:
        """Where the document's chunks go while it is received (closed before it is checked)."""

    def erase(self, flow: KioskFlow, event: str) -> None:
        """Erase the spooled document; `event` names why (the kiosk's log line)."""

    async def pay(self, flow: KioskFlow) -> None:
        """Take the fee; a kiosk with an outbox first makes the job's refund notice durable."""

    async def print(self, flow: KioskFlow) -> bool:
        """Print the document; True when the printer failed or overran its deadline (the fee is
        then refunded, every copy void)."""

    async def printed(self, flow: KioskFlow, path: str, body: bytes) -> None:
        """The completion notice for the printed (or refunded) job, durable before the resident is told."""

    async def deliver(self, flow: KioskFlow, path: str, body: bytes) -> tuple[int, bytes] | None:
        """Send the notice: the center's (status, body), or None when it waits in the outbox."""


async def exchange(
    conn: H2Driver, authority: str, method: str, path: str, body: bytes | None, flow: KioskFlow | None = None
) -> tuple[int, bytes]:
    """One request with a small body (None: none at all), answered with a small one: (status, body).
    The stream is released whatever happens, so an unfinished one is reset on every hop."""
    t0 = time.perf_counter()
    stream = await conn.open_stream(request_headers(method, path, authority), end_stream=body is None)
    try:
        if body is not None:
            await stream.send_data(body, end_stream=True)
        headers = await stream.receive_headers()
        t1 = time.perf_counter()
        if flow is not None:
            flow.record_timing(headers)
        answer = int(header(headers, b":status") or 0), await stream.read_body()
        if flow is not None:
            flow.record_request(headers, (t1 - t0) * 1000, (time.perf_counter() - t0) * 1000)
        return answer
    finally:
        conn.release(stream)


class FlowDriver:
    """Drives one flow at a time over `conn` to the store router `authority`."""

    def __init__(self, conn: H2Driver, authority: str, devices: KioskDevices) -> None:
        self.conn = conn
        self.authority = authority
        self.devices = devices

    async def request(self, flow: KioskFlow, step: tuple[str, str, bytes]) -> tuple[int, bytes]:
        return await exchange(self.conn, self.authority, *step, flow)

    async def run(self, flow: KioskFlow) -> None:
        """The issuance up to a verified document, which the caller then `settle`s; ends in a
        final state otherwise, unless the caller cancels it (then the caller calls `flow.cancel`)."""
        status, body = await self.request(flow, flow.start())
        step = flow.on_challenge(status, body)
        if step:
            status, body = await self.request(flow, step)
            step = flow.on_auth(status, body)
        if step:
            await self.receive_document(flow, step)
        if flow.state is State.MISDELIVERED:
            self.devices.erase(flow, "misdelivery-refused")
            await self.request(flow, flow.misdelivery_report())

    async def receive_document(self, flow: KioskFlow, step: tuple[str, str, bytes]) -> None:
        """The issue request, answered by the streamed document (or a refusal)."""
        method, path, body = step
        t0 = time.perf_counter()
        stream = await self.conn.open_stream(request_headers(method, path, self.authority), end_stream=False)
        headers = None
        try:
            await stream.send_data(body, end_stream=True)
            headers = await stream.receive_headers()
            t1 = time.perf_counter()
            flow.record_timing(headers)
            status = int(header(headers, b":status") or 0)
            if not flow.on_document_headers(status, headers):
                flow.on_refusal_body(status, await stream.read_body())
                return
            with self.devices.spool(flow) as write:
                while (chunk := await stream.receive_chunk()) is not None:
                    flow.on_document_chunk(chunk)
                    write(chunk)
            flow.on_document_end(stream.trailers)
            flow.record_timing(stream.trailers)
        finally:
            self.conn.release(stream)
            if headers is not None:
                flow.record_request(headers, (t1 - t0) * 1000, (time.perf_counter() - t0) * 1000)

    async def settle(self, flow: KioskFlow, now: Callable[[], datetime]) -> None:
        """A verified document: payment before printing (BIZ-4), the notice (BIZ-5), then the erase.
        Past the point of no return: the caller must not cancel it (rule 3). `now` is the kiosk's
        clock (the notice's time)."""
        devices = self.devices
        await devices.pay(flow)
        flow.paid()
        if await devices.print(flow):
            _, path, body = flow.misprinted(now())
        else:
            _, path, body = flow.printed(now())
        await devices.printed(flow, path, body)
        answer = await devices.deliver(flow, path, body)
        if answer is None:
            flow.notice_queued()
        else:
            flow.on_notice(*answer)
        devices.erase(flow, "spool-erased")
        flow.erased()
