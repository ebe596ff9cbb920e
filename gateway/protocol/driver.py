"""The runtime-independent half of both drivers: a connection's per-stream waits and wakes,
opening streams within the peer's concurrency limit and releasing them (`H2Driver`), and a task's
handle on one stream (`Stream`).

The Trio driver (`gateway.protocol.h2trio`) and the asyncio one (`kiosk_emu.load.h2asyncio`)
feed bytes into a core (`interfaces.Core`), write its `data_to_send()` out and wake the tasks
whose stream ids `receive_data` returns; this is written against a one-shot event each runtime
supplies, and `Stream` against `interfaces.Connection` alone, so the Trio servers and the uvloop
load generator read and write bodies with the same code.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from gateway.protocol.errors import ConnectionClosed, StreamReset
from gateway.protocol.frames import CANCEL, REFUSED_STREAM
from gateway.protocol.interfaces import Connection, Core, OneShot
from gateway.protocol.streams import PENDING, Headers, StreamState, header


class Stream:
    """One HTTP/2 stream seen from a task: a view of one StreamState on one connection. Made only
    where a task waits on a stream (a handler, a client request); the splice needs none."""

    __slots__ = ("conn", "st", "sent_headers")

    def __init__(self, conn: Connection, st: StreamState) -> None:
        self.conn = conn
        self.st = st
        self.sent_headers = False

    @property
    def id(self) -> int:
        return self.st.id

    @property
    def headers(self) -> Headers | None:
        return self.st.headers

    @property
    def trailers(self) -> Headers | None:
        return self.st.trailers

    @property
    def status(self) -> int:
        """A response's :status (0 before it came)."""
        return int(header(self.st.headers, b":status") or 0)

    def _raise_if_reset(self) -> None:
        if self.st.reset_code is not None:
            raise StreamReset(self.st.id, self.st.reset_code)

    async def receive_headers(self) -> Headers:
        """Client side: wait for the response headers."""
        while self.st.headers is None:
            self._raise_if_reset()
            await self.conn.wait(self.st.id)
        return self.st.headers

    async def receive_chunk(self, ack: bool = True) -> bytes | None:
        """Next chunk of the body, None at its end. With ack=False the caller acks after forwarding."""
        while (data := self.conn.core.next_chunk(self.st)) is PENDING:
            await self.conn.wait(self.st.id)
        if data and ack:
            self.ack(len(data))
        return data

    async def read_body(self, limit: int = 1 << 20) -> bytes:
        """The whole body, for small messages only (JSON); bounded so a peer cannot make us buffer."""
        parts: list[bytes] = []
        size = 0
        while (chunk := await self.receive_chunk()) is not None:
            size += len(chunk)
            if size > limit:
                self.reset(REFUSED_STREAM)
                raise StreamReset(self.st.id, REFUSED_STREAM)
            parts.append(chunk)
        return b"".join(parts)

    async def drain_body(self) -> int:
        """Read and discard the body; returns its size (relay benchmarks)."""
        n = 0
        while (chunk := await self.receive_chunk()) is not None:
            n += len(chunk)
        return n

    def ack(self, nbytes: int) -> None:
        self.conn.core.ack(self.st.id, nbytes)
        self.conn.flush()

    async def forward_body(self, dst: Stream, observe: Callable[[bytes], None] | None = None) -> None:
        """Move this stream's body on to `dst` chunk by chunk, acking each chunk here only once
        `dst` took it, so this side's window follows what the far peer reads and nothing is
        buffered beyond the windows. `observe` sees each chunk before it is sent.

        A chunk is acked even when its send fails (a reset or a cancel while waiting for window):
        it is already out of this stream's buffer, so the reset cannot give its bytes back, and
        every such race would shrink the connection's window for good."""
        while (chunk := await self.receive_chunk(ack=False)) is not None:
            if not chunk:
                continue
            if observe is not None:
                observe(chunk)
            try:
                await dst.send_data(chunk)
            finally:
                self.ack(len(chunk))

    def send_headers(self, headers: Headers, end_stream: bool = False) -> None:
        self._raise_if_reset()
        self.conn.core.send_headers(self.st.id, headers, end_stream)
        self.sent_headers = True
        self.conn.flush()

    async def send_data(self, data: bytes | memoryview, end_stream: bool = False) -> None:
        """Send data, waiting for flow-control window as needed (never buffers beyond it)."""
        core = self.conn.core
        view = memoryview(data)
        stalled_since: float | None = None
        while True:
            self._raise_if_reset()
            n = core.send_data(self.st.id, view, end_stream)  # everything the windows allow
            view = view[n:]
            if n or not data:  # an empty DATA frame (END_STREAM) needs no window
                self.conn.flush()
                if not view:
                    return
                stalled_since = None
            if stalled_since is None:
                stalled_since = self.conn.now()
            await self.conn.wait_window(self.st.id, stalled_since)  # the windows are empty: wait for WINDOW_UPDATE

    def end(self, trailers: Headers | None = None) -> None:
        self._raise_if_reset()
        self.conn.core.end_stream(self.st.id, trailers)
        self.conn.flush()

    def reset(self, code: int = CANCEL) -> None:
        self.conn.core.reset(self.st.id, code)
        self.conn.flush()
        self.conn.wake({self.st.id})


class H2Driver:
    """What both runtimes' connection drivers share: per-stream waits and wakes, opening streams
    within the peer's concurrency limit, and releasing them.

    A runtime driver subclasses it and supplies `new_event()` (a fresh `OneShot`) and `flush()`
    (get `core.data_to_send()` onto the wire soon), then feeds the core and calls `wake` with the
    ids `receive_data` returns. A task waits on one event per stream id; a wake pops and sets it,
    so the next wait makes a new one (id 0: every stream, and the tasks waiting for a free slot).
    """

    def __init__(self, core: Core) -> None:
        self.core = core
        self._waiters: dict[int, OneShot] = {}
        self._slot_free: OneShot | None = None  # made only while a task waits for a stream slot

    def new_event(self) -> OneShot:
        raise NotImplementedError

    def flush(self) -> None:
        raise NotImplementedError

    now = staticmethod(time.monotonic)  # the runtime's clock (trio.current_time in Trio)

    # -- waiting and waking ----------------------------------------------------------------

    async def wait(self, stream_id: int) -> None:
        """Until something happens on the stream; at once (the stream reset) once the connection is gone."""
        if self.core.closed:
            st = self.core.streams.get(stream_id)
            if st is not None and st.reset_code is None and not st.ended:
                st.reset_code = CANCEL
            return
        ev = self._waiters.get(stream_id)
        if ev is None or ev.is_set():
            ev = self._waiters[stream_id] = self.new_event()
        await ev.wait()

    async def wait_window(self, stream_id: int, stalled_since: float) -> None:
        """A writer waits for window since `stalled_since`; a driver may bound it (slow read)."""
        await self.wait(stream_id)

    def wake(self, stream_ids: set[int]) -> None:
        if 0 in stream_ids:  # connection-level: window, settings (a higher stream limit) or its end
            waiters, self._waiters = self._waiters, {}
            for ev in waiters.values():
                ev.set()
            self._stream_done()
            return
        for sid in stream_ids:
            if sid in self._waiters:
                self._waiters.pop(sid).set()

    def _stream_done(self) -> None:
        """A stream slot may be free: let the tasks waiting in `open_stream` look again."""
        ev, self._slot_free = self._slot_free, None
        if ev is not None:
            ev.set()

    # -- client side -----------------------------------------------------------------------

    async def open_stream(self, headers: Headers, end_stream: bool = False) -> Stream:
        """Start a request; waits while the peer's concurrent-stream limit is reached."""
        while not self.core.can_open_stream():
            if self.core.closed:
                raise ConnectionClosed(self.core.close_reason or "closed")
            if self._slot_free is None:
                self._slot_free = self.new_event()
            await self._slot_free.wait()
        st = self.core.send_request(headers, end_stream)
        self.flush()
        return Stream(self, st)

    def release(self, stream: Stream) -> None:
        """Client side: done with a stream (reset it if unfinished, so every hop stops work on it)."""
        st = stream.st
        if not st.finished:
            stream.reset(CANCEL)
        self.core.forget(st.id)
        self._stream_done()

    def close(self) -> None:
        """GOAWAY; every waiting task wakes and finds its stream reset."""
        self.core.close()
        self.wake({0})
        self.flush()
