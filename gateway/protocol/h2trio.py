"""Trio driver for `gateway.protocol.h2core`: one reader task, one writer task, a cancel scope per stream.

The reader feeds bytes into the core and wakes the tasks whose streams changed. The writer
sends whatever the core has queued, so many streams' frames go out in one write. A request
handler runs in its own cancel scope: a RST_STREAM from the peer or the connection dying
cancels the handler, so a cancelled request is cancelled whole (INT-1), never half-done.
Waiting, waking, opening and releasing streams are `H2Driver`'s, on `trio.Event`s.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import h2.errors
import trio

from gateway.protocol.h2core import (
    ConnectionClosed,
    H2Core,
    H2Driver,
    Headers,
    StreamHandle,
    StreamReset,
    StreamState,
)

log = logging.getLogger("konbini.h2")

READ_SIZE = 256 * 1024


class Stream(StreamHandle):
    """One HTTP/2 stream seen from a Trio task."""

    __slots__ = ("cancel_scope", "sent_headers")

    def __init__(self, conn: TrioH2, st: StreamState) -> None:
        super().__init__(conn, st)
        self.cancel_scope: trio.CancelScope | None = None
        self.sent_headers = False

    def send_headers(self, headers: Headers, end_stream: bool = False) -> None:
        self._raise_if_reset()
        self.conn.core.send_headers(self.st.id, headers, end_stream)
        self.sent_headers = True
        self.conn.flush()

    def end(self, trailers: Headers | None = None) -> None:
        self._raise_if_reset()
        self.conn.core.end_stream(self.st.id, trailers)
        self.conn.flush()


Handler = Callable[[Stream], Awaitable[None]]


class TrioH2(H2Driver):
    """An HTTP/2 connection over any Trio stream (here: a mutual-TLS SSLStream)."""

    stream_class = Stream
    new_event = staticmethod(trio.Event)

    def __init__(self, transport: trio.abc.Stream, *, client_side: bool, peer: str = "?") -> None:
        super().__init__(H2Core(client_side=client_side))
        self.transport = transport
        self.peer = peer
        self._output = trio.Event()
        self._handlers: dict[int, Stream] = {}
        self._reader_scope = trio.CancelScope()  # the writer ends reading once our GOAWAY is out
        self.closed = trio.Event()

    def flush(self) -> None:
        self._output.set()

    # -- the connection's life -------------------------------------------------------------

    async def run(self, handler: Handler | None = None) -> None:
        """Serve until the connection ends; with a handler, each request runs in its own task."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer)
                try:
                    with self._reader_scope:
                        await self._reader(nursery, handler)
                finally:
                    self.wake({0})
                    for s in list(self._handlers.values()):
                        if s.cancel_scope is not None:
                            s.cancel_scope.cancel()
                    self.flush()  # the writer sends the GOAWAY, then ends
        finally:
            self.closed.set()
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                try:
                    await self.transport.aclose()
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass

    async def _reader(self, nursery: trio.Nursery, handler: Handler | None) -> None:
        core = self.core
        while True:
            try:
                data = await self.transport.receive_some(READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                data = b""
            try:
                woken = core.receive_data(data)
            except ConnectionClosed as exc:
                if exc.args[0] not in ("eof", "goaway"):
                    log.info("closing connection from %s: %s", self.peer, exc.args[0])
                return
            if core.closed:  # peer sent GOAWAY: finish, the writer flushes what is left
                return
            while core.new_requests:
                st = core.new_requests.popleft()
                if handler is None:  # a client does not take requests
                    core.reset(st.id, h2.errors.ErrorCodes.REFUSED_STREAM)
                    continue
                stream = Stream(self, st)
                self._handlers[st.id] = stream
                nursery.start_soon(self._serve_stream, handler, stream)
            for sid in woken:
                st = core.streams.get(sid)
                if st is not None and st.reset_code is not None:
                    s = self._handlers.get(sid)
                    if s is not None and s.cancel_scope is not None:
                        s.cancel_scope.cancel()  # the peer cancelled: cancel the whole request
            self.wake(woken)
            self.flush()

    async def _writer(self) -> None:
        while True:
            await self._output.wait()
            self._output = trio.Event()
            data = self.core.data_to_send()
            if data:
                try:
                    await self.transport.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    self.core._close("write-failed")
                    self.wake({0})
                    return
            if self.core.closed:
                self._reader_scope.cancel()
                return

    async def _serve_stream(self, handler: Handler, stream: Stream) -> None:
        with trio.CancelScope() as scope:
            stream.cancel_scope = scope
            try:
                await handler(stream)
            except* (StreamReset, ConnectionClosed):
                pass  # the peer or the connection ended the request: nothing left to answer
            except* Exception:
                log.exception("handler failed on stream %d from %s", stream.id, self.peer)
                stream.reset(h2.errors.ErrorCodes.INTERNAL_ERROR)
        if scope.cancelled_caught and not self.core.closed:
            stream.reset(h2.errors.ErrorCodes.CANCEL)
        self._handlers.pop(stream.id, None)
        self.core.forget(stream.id)
        self._stream_done()
