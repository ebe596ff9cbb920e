"""A shared, lazily (re)opened HTTP/2 connection from a node to one fixed peer.

The issuance center talks to the OCSP responder and each municipality over one multiplexed
connection each; if it dies, the next request opens a new one.
"""

from __future__ import annotations

import trio

from gateway.node.server import NodeContext
from gateway.protocol.driver import Stream
from gateway.protocol.errors import ConnectionClosed
from gateway.protocol.h2trio import TrioH2
from gateway.protocol.streams import Headers
from topology.spec.model import Node


class Upstream:
    def __init__(self, ctx: NodeContext, target: Node, nursery: trio.Nursery) -> None:
        self.ctx = ctx
        self.target = target
        self._nursery = nursery
        self._conn: TrioH2 | None = None
        self._lock = trio.Lock()

    async def _connection(self) -> TrioH2:
        async with self._lock:
            if self._conn is None or self._conn.core.closed:
                conn = await self.ctx.connect(self.target)
                self._nursery.start_soon(conn.run)
                self._conn = conn
            return self._conn

    async def open(self, headers: Headers, body: bytes | None = None) -> tuple[TrioH2, Stream]:
        """Start a request (with a small body sent whole); the caller must `conn.release(stream)`."""
        for attempt in (1, 2):  # one retry: the pooled connection may have just died
            conn = await self._connection()
            try:
                stream = await conn.open_stream(headers, end_stream=body is None)
            except ConnectionClosed:
                if attempt == 2:
                    raise ConnectionError(f"{self.target.id} closed the connection") from None
                continue
            if body is not None:
                await stream.send_data(body, end_stream=True)
            return conn, stream
        raise AssertionError("unreachable")
