"""asyncio (uvloop) driver for `gateway.h2core`, client side: the load generator's kiosks.

Mirror of `gateway.h2trio` with an asyncio Protocol instead of reader/writer tasks:
`data_received` feeds the core and wakes the streams it names; output is flushed once per
loop turn (`call_soon`), so many streams' frames leave in one write. A stream wait is one
future per stream id. Releasing an unfinished stream resets it, so a kiosk timeout cancels
the whole request on every hop (INT-1).
"""

from __future__ import annotations

import asyncio
import ssl

import h2.errors

from gateway.protocol.h2core import (
    ConnectionClosed,
    H2Core,
    Headers,
    StreamHandle,
    header,
)

HANDSHAKE_TIMEOUT = 5.0


class Stream(StreamHandle):
    """One HTTP/2 stream seen from an asyncio task."""

    __slots__ = ()

    @property
    def status(self) -> int:
        return int(header(self.st.headers, b":status") or 0)

    async def drain_body(self) -> int:
        """Read and discard the body; returns its size (relay benchmarks)."""
        n = 0
        while (chunk := await self.receive_chunk()) is not None:
            n += len(chunk)
        return n


class AsyncioH2(asyncio.Protocol):
    """An HTTP/2 client connection over an asyncio TLS transport."""

    def __init__(self, peer: str = "?") -> None:
        self.peer = peer
        self.core = H2Core(client_side=True)
        self.transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._waiters: dict[int, asyncio.Future] = {}
        self._slot_waiters: list[asyncio.Future] = []
        self._flush_pending = False
        self.closed = self._loop.create_future()

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.flush()

    def data_received(self, data: bytes) -> None:
        try:
            woken = self.core.receive_data(data)
        except ConnectionClosed:
            self._flush()
            self._lost()
            return
        while self.core.new_requests:  # a client takes no requests
            self.core.reset(self.core.new_requests.popleft().id, h2.errors.ErrorCodes.REFUSED_STREAM)
        self.wake(woken)
        self._flush()
        if self.core.closed:
            self._lost()

    def eof_received(self) -> bool:
        self._lost()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost()

    def _lost(self) -> None:
        self.core._close("eof")
        self.wake({0})
        self._wake_slots()
        if not self.closed.done():
            self.closed.set_result(None)

    # -- waiting and waking ----------------------------------------------------------------

    async def wait(self, stream_id: int) -> None:
        if self.core.closed:
            st = self.core.streams.get(stream_id)
            if st is not None and st.reset_code is None and not st.ended:
                st.reset_code = h2.errors.ErrorCodes.CANCEL
            return
        fut = self._waiters.get(stream_id)
        if fut is None or fut.done():
            fut = self._waiters[stream_id] = self._loop.create_future()
        await fut

    def wake(self, stream_ids: set[int]) -> None:
        if 0 in stream_ids:
            waiters, self._waiters = self._waiters, {}
            for fut in waiters.values():
                if not fut.done():
                    fut.set_result(None)
            return
        for sid in stream_ids:
            fut = self._waiters.pop(sid, None)
            if fut is not None and not fut.done():
                fut.set_result(None)

    def flush(self) -> None:
        if not self._flush_pending:
            self._flush_pending = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_pending = False
        data = self.core.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _wake_slots(self) -> None:
        waiters, self._slot_waiters = self._slot_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    # -- streams ---------------------------------------------------------------------------

    async def open_stream(self, headers: Headers, end_stream: bool = False) -> Stream:
        """Start a request; waits while the peer's concurrent-stream limit is reached."""
        while not self.core.can_open_stream():
            if self.core.closed:
                raise ConnectionClosed(self.core.close_reason or "closed")
            fut = self._loop.create_future()
            self._slot_waiters.append(fut)
            await fut
        st = self.core.send_request(headers, end_stream)
        self.flush()
        return Stream(self, st)

    def release(self, stream: Stream) -> None:
        """Done with a stream: reset it if unfinished, so every hop stops work on it."""
        st = stream.st
        if not st.finished:
            self.core.reset(st.id, h2.errors.ErrorCodes.CANCEL)
            self.flush()
        self.core.forget(st.id)
        self._waiters.pop(st.id, None)
        if self._slot_waiters:
            self._wake_slots()

    def close(self) -> None:
        self.core.close()
        self._flush()
        if self.transport is not None:
            self.transport.close()
        self.wake({0})


async def connect_h2(
    address: str, port: int, expect_id: str, ctx: ssl.SSLContext, *, local_address: str | None = None
) -> AsyncioH2:
    """TCP from our own address (the allow-lists check it), TLS naming the expected node, HTTP/2."""
    loop = asyncio.get_running_loop()
    transport, proto = await asyncio.wait_for(
        loop.create_connection(
            lambda: AsyncioH2(expect_id),
            address,
            port,
            ssl=ctx,
            server_hostname=expect_id,
            local_addr=(local_address, 0) if local_address else None,
            ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
        ),
        HANDSHAKE_TIMEOUT + 1,
    )
    sslobj = transport.get_extra_info("ssl_object")
    if sslobj is None or sslobj.selected_alpn_protocol() != "h2":
        transport.close()
        raise ConnectionError(f"{expect_id} did not agree to h2")
    return proto
