"""asyncio (uvloop) driver for the HTTP/2 client core (`gateway.protocol.h2lean`): the load generator's kiosks.

Mirror of `gateway.protocol.h2trio` with an asyncio Protocol instead of reader/writer tasks:
`data_received` feeds the core and wakes the streams it names; output is flushed once per
loop turn (`call_soon`), so many streams' frames leave in one write. Waiting, waking, opening
and releasing streams are `H2Driver`'s, on `asyncio.Event`s (one per waiting stream; a cancelled
waiter leaves its event usable, which a shared future would not). Releasing an unfinished
stream resets it, so a kiosk timeout cancels the whole request on every hop (INT-1).
"""

from __future__ import annotations

import asyncio
import ssl

from gateway.protocol.driver import H2Driver
from gateway.protocol.errors import ConnectionClosed, link_errors
from gateway.protocol.frames import REFUSED_STREAM
from gateway.protocol.h2lean import LeanClientCore
from gateway.transport.dial import HANDSHAKE_TIMEOUT, agreed, offer
from gateway.transport.resumption import OfferingContext


class AsyncioH2(H2Driver, asyncio.Protocol):
    """An HTTP/2 client connection over an asyncio TLS transport."""

    new_event = staticmethod(asyncio.Event)

    def __init__(self, peer: str = "?") -> None:
        super().__init__(LeanClientCore())
        self.peer = peer
        self.transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
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
            self.core.reset(self.core.new_requests.popleft().id, REFUSED_STREAM)
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
        self.core.lose("eof")
        self.wake({0})
        if not self.closed.done():
            self.closed.set_result(None)

    # -- output --------------------------------------------------------------------------

    def flush(self) -> None:
        if not self._flush_pending:
            self._flush_pending = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_pending = False
        data = self.core.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def close(self) -> None:
        super().close()
        self._flush()  # the GOAWAY, now: the transport closes next
        if self.transport is not None:
            self.transport.close()


async def connect_h2(
    address: str, port: int, expect_id: str, ctx: ssl.SSLContext, *, local_address: str | None = None
) -> AsyncioH2:
    """TCP from our own address (the allow-lists check it), TLS naming the expected node, HTTP/2:
    `gateway.transport.dial.connect_h2` on asyncio, with its checks (`offer`, `agreed`). A refusal
    or failure of TCP or TLS raises LinkDown."""
    loop = asyncio.get_running_loop()
    with link_errors():
        transport, proto = await asyncio.wait_for(
            loop.create_connection(
                lambda: AsyncioH2(expect_id),
                address,
                port,
                ssl=OfferingContext(ctx, offer(ctx, expect_id)),  # resumed if the router still takes the ticket
                server_hostname=expect_id,
                local_addr=(local_address, 0) if local_address else None,
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
            ),
            HANDSHAKE_TIMEOUT + 1,
        )
    sslobj = transport.get_extra_info("ssl_object")
    try:
        agreed(ctx, expect_id, sslobj, sslobj.selected_alpn_protocol() if sslobj is not None else None)
    except ConnectionError:
        transport.close()
        raise
    return proto
