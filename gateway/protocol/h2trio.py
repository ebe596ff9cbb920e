"""Trio driver for the HTTP/2 cores (`gateway.protocol.h2lean`): one reader task, one writer task, a cancel scope per stream.

The reader feeds bytes into the core and wakes the tasks whose streams changed. The writer
sends whatever the core has queued, so many streams' frames go out in one write. A request
handler runs in its own cancel scope: a RST_STREAM from the peer or the connection dying
cancels the handler, so a cancelled request is cancelled whole (INT-1), never half-done.
Waiting, waking, opening and releasing streams are `H2Driver`'s, on `trio.Event`s.

A server connection (given `Limits`) also bounds time: every read runs under the one deadline
that applies (preface, a frame or header block left incomplete, idle), every write and every
wait for window under `slow_read_timeout`; each is a cancel scope, and running out closes the
connection with GOAWAY and a `close_reason` the node counts.
"""

from __future__ import annotations

import logging
import math
import ssl
import time
from collections.abc import Awaitable, Callable

import trio

from gateway.protocol.driver import H2Driver, Stream
from gateway.protocol.errors import TRANSPORT_ERRORS, ConnectionClosed, StreamReset
from gateway.protocol.frames import CANCEL, ENHANCE_YOUR_CALM, INTERNAL_ERROR, NO_ERROR, REFUSED_STREAM
from gateway.protocol.h2lean import LeanClientCore, LeanServerCore
from gateway.protocol.interfaces import Core
from gateway.protocol.streams import StreamState
from gateway.protocol.tlsrecords import TLSRecords, lean_tls
from topology.spec.model import Limits

log = logging.getLogger("konbini.h2")

READ_SIZE = 256 * 1024
# The writer takes at most this much per write: while a slow socket drains it, what waits behind
# stays in the core's buffer once, not also in a plaintext and a ciphertext copy of the whole queue.
WRITE_SIZE = 256 * 1024
# After closing on a hostile peer: how long its bytes are read and dropped (raw TCP, no TLS work)
# so that closing with unread input does not reset the connection and lose our GOAWAY.
LINGER = 0.5
ORDINARY_ENDS = frozenset({"eof", "goaway", "local-close", "write-failed"})


class _ReaderPass:
    """What one reader pass (the bytes of one read, taken through the core and the splice) asked
    to send: each connection flushed during the pass is written once at its end, from the reader
    task itself, when its writer is idle and its transport can write without waiting
    (`TLSRecords.send_now`). A flush outside a pass, or a write the socket did not take whole,
    wakes the connection's writer task as before. On a relay a request's HEADERS and its answer
    each crossed a hop with a wakeup of the other connection's writer task; in the issuance flow,
    where each request crosses a hop alone, that wakeup was a large part of the hop's cost."""

    __slots__ = ("active", "dirty")

    def __init__(self) -> None:
        self.active = False
        self.dirty: dict[TrioH2, None] = {}  # in the order they were flushed

    def end(self) -> None:
        """Write every flushed connection once. The pass is over first, so what these writes
        flush in turn (the splice's `on_drained`) goes to writer tasks, not back into this list."""
        self.active = False
        conns, self.dirty = self.dirty, {}
        for conn in conns:
            conn._write_direct()


_PASS = _ReaderPass()


class LingeringSocket(trio.abc.Stream):
    """A server's TCP stream under TLS. Closing a socket with unread input makes the kernel reset
    the connection and drop what we had still to send (our GOAWAY, TLS close_notify); so when the
    connection ends on a hostile peer (`linger`), close half-closes first and drops the peer's
    bytes for at most LINGER seconds, raw, without TLS work."""

    def __init__(self, tcp: trio.SocketStream) -> None:
        self.tcp = tcp
        self.linger = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.tcp.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.tcp.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        # trio's SSLStream asks for no size (trio's default, 64 KiB); a bigger read lets one
        # receive carry a whole 64 KiB response and its frames in one pass through h2
        return await self.tcp.receive_some(max_bytes or READ_SIZE)

    async def aclose(self) -> None:
        if self.linger:
            with trio.CancelScope(shield=True), trio.move_on_after(LINGER):
                try:
                    await self.tcp.send_eof()
                    while await self.tcp.receive_some(READ_SIZE):
                        pass
                except TRANSPORT_ERRORS:
                    pass
        await self.tcp.aclose()


Handler = Callable[[Stream], Awaitable[None]]
# A relay's splice takes a request in the reader itself: None, or the handler to run for it after all (a refusal).
TakeRequest = Callable[[StreamState], "Handler | None"]


class TrioH2(H2Driver):
    """An HTTP/2 connection over any Trio stream (here: a mutual-TLS SSLStream)."""

    new_event = staticmethod(trio.Event)

    now = staticmethod(trio.current_time)

    def __init__(
        self,
        transport: trio.abc.Stream,
        *,
        client_side: bool,
        peer: str = "?",
        limits: Limits | None = None,
        on_end: Callable[[str | None], None] | None = None,
        core: Core | None = None,
    ) -> None:
        """`core`: by default a new lean core for the side (`h2lean`)."""
        if core is None:
            core = LeanClientCore() if client_side else LeanServerCore(limits=limits, clock=trio.current_time)
        super().__init__(core)
        self.limits = limits  # None: no timeouts (our own client connections)
        self.transport = lean_tls(transport)  # TLS 1.3 after the handshake: records without SSLStream's machinery
        self.peer = peer
        self._output = trio.Event()
        self._handlers: dict[int, Stream] = {}
        self._scopes: dict[int, trio.CancelScope] = {}  # a handler task's, once it runs
        self._reader_scope = trio.CancelScope()  # the writer ends reading once our GOAWAY is out
        self.closed = trio.Event()
        self._writes_blocked = False
        self._on_end = on_end  # told the close reason as soon as HTTP/2 is over, before the socket closes
        self._nursery: trio.Nursery | None = None
        self.last_read = trio.current_time()  # when the peer last sent anything (a relay's keepalive)
        # A relay's fast path (gateway.protocol.splice): requests and what arrives for them are
        # handled in the reader, before it reads again, with no task per request.
        self.take_request: TakeRequest | None = None
        self.on_events: Callable[[set[int]], None] | None = None
        self.on_drained: Callable[[], None] | None = None  # after each write: room for more (the splice's budget)
        self._writing = 0  # bytes of the write under way
        self._in_write = False  # the writer task is inside a write (the reader must not write then)
        self._direct = isinstance(self.transport, TLSRecords) and self.transport.can_send_now

    def flush(self) -> None:
        if _PASS.active and self._direct:
            _PASS.dirty[self] = None  # written at the end of the reader pass under way
        else:
            self._output.set()

    def _write_direct(self) -> None:
        """At the end of a reader pass: write what is queued from here, if the writer is idle;
        what the socket does not take at once goes to the writer task."""
        tls = self.transport
        assert isinstance(tls, TLSRecords)  # only such a transport is `_direct`
        if self._in_write or tls.unsent:  # a write under way, or the socket was full last time
            self._output.set()
            return
        data = self.core.data_to_send(WRITE_SIZE)
        try:
            whole = tls.send_now(data)
        except TRANSPORT_ERRORS:
            self.core.lose("write-failed")
            self.wake({0})
            self._output.set()  # the writer ends the connection
            return
        if not whole or self.core.pending_output or self.core.closed:
            self._output.set()
        elif self.on_drained is not None:
            self.on_drained()

    @property
    def unsent(self) -> int:
        """Bytes queued for the peer or being written, not yet taken by the kernel."""
        return self.core.pending_output + self._writing + self._transport_unsent

    @property
    def _transport_unsent(self) -> int:
        """Ciphertext a direct write left in the transport (`TLSRecords.send_now`)."""
        return self.transport.unsent if isinstance(self.transport, TLSRecords) else 0

    # -- the connection's life -------------------------------------------------------------

    async def run(self, handler: Handler | None = None) -> None:
        """Serve until the connection ends; with a handler, each request runs in its own task."""
        self.flush()  # our preface and SETTINGS at once: an upstream opened ahead of its first request
        # would otherwise say nothing until then, and its server drops it for preface-timeout
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer)
                try:
                    with self._reader_scope:
                        await self._reader(nursery, handler)
                finally:
                    self.wake({0})
                    for scope in list(self._scopes.values()):
                        scope.cancel()
                    self.flush()  # the writer sends the GOAWAY, then ends
        finally:
            self.closed.set()
            if self._on_end is not None:
                self._on_end(self.core.close_reason)
            tcp = getattr(self.transport, "transport_stream", None)
            if isinstance(tcp, LingeringSocket):  # we gave up on the peer: let GOAWAY reach it
                tcp.linger = self.core.close_reason not in ORDINARY_ENDS and not self._writes_blocked
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                try:
                    await self.transport.aclose()
                except TRANSPORT_ERRORS:
                    pass

    async def _receive(self) -> bytes:
        """One read from the peer, plus every TLS record already received behind it.

        trio's SSLStream hands out one TLS record (at most 16 KiB) per call, and each call is a
        trip through the scheduler, the frame buffer and our wakes: a 64 KiB response took five.
        The records already in the SSL object's buffer are decrypted here in one go, without
        I/O; whatever error a record holds is left for trio's next read to raise properly."""
        data = bytes(await self.transport.receive_some(READ_SIZE))  # as it is when it is bytes already
        # trio's SSLObject (private, hence getattr). Only an SSLStream has it: `TLSRecords` (TLS 1.3,
        # the usual transport) already returns every whole record of a read from receive_some.
        tls = getattr(self.transport, "_ssl_object", None)
        if not data or tls is None:
            return data
        parts, size = [data], len(data)
        while size < READ_SIZE:
            try:
                more = tls.read(READ_SIZE - size)
            except ssl.SSLError:  # SSLWantReadError: no whole record left (or one for trio to report)
                break
            if not more:
                break
            parts.append(more)
            size += len(more)
        return data if len(parts) == 1 else b"".join(parts)

    async def _read(self, deadline: float) -> bytes | None:
        """The next bytes (b"" at the end), or None once `deadline` passed. An unbounded read
        opens no cancel scope: on a client connection that is every read."""
        try:
            if deadline == math.inf:
                return await self._receive()
            with trio.move_on_at(deadline):
                return await self._receive()
            return None
        except TRANSPORT_ERRORS:
            return b""

    def _read_deadline(self, started: float, last_read: float, partial_since: float | None) -> tuple[float, str]:
        """The one deadline the next read runs under, and the close reason when it passes."""
        lim = self.limits
        if lim is None:
            return math.inf, ""
        if not self.core.preface_received:
            return started + lim.preface_timeout, "preface-timeout"
        if partial_since is not None:
            return partial_since + lim.headers_timeout, "slow-headers"
        if not self._handlers and not self.core.streams:  # spliced requests have no handler task, only a stream
            return last_read + lim.idle_timeout, "idle"
        return math.inf, ""

    def abort(self, reason: str) -> None:
        """Close for what the peer did: GOAWAY (ENHANCE_YOUR_CALM, or NO_ERROR when idle), every stream ends."""
        if not self.core.closed:
            log.info("closing connection from %s: %s", self.peer, reason)
            self.core.abort(reason, NO_ERROR if reason == "idle" else ENHANCE_YOUR_CALM)
        self.wake({0})
        self.flush()

    async def wait_window(self, stream_id: int, stalled_since: float) -> None:
        if self.limits is None:
            return await self.wait(stream_id)
        with trio.move_on_at(stalled_since + self.limits.slow_read_timeout):
            return await self.wait(stream_id)
        self.abort("slow-read")  # the peer keeps its window shut: it will not read this
        raise ConnectionClosed("slow-read")

    def serve(self, st: StreamState, handler: Handler) -> None:
        """Run `handler` for a request in its own task (the reader's nursery), cancelled with its stream."""
        stream = Stream(self, st)
        self._handlers[st.id] = stream
        assert self._nursery is not None, "serve() needs a running connection"
        self._nursery.start_soon(self._serve_stream, handler, stream)

    async def _reader(self, nursery: trio.Nursery, handler: Handler | None) -> None:
        self._nursery = nursery
        core = self.core
        started = last_read = trio.current_time()
        partial_since: float | None = None  # when the frame or header block now arriving began
        units = 0
        while True:
            deadline, reason = self._read_deadline(started, last_read, partial_since)
            data = await self._read(deadline)
            if data is None:
                self.abort(reason)
                return
            last_read = self.last_read = trio.current_time()
            read_at = time.perf_counter()  # a request's queue time runs from here to its handler's start
            _PASS.active = True
            try:
                if not self._take(data, handler, read_at):
                    return
            finally:
                _PASS.end()
            # headers_timeout bounds one frame or header block, not the connection: a steady upload
            # reads across frame boundaries for ever, and each new frame starts the clock again
            if not core.receiving_partial:
                partial_since = None
            elif partial_since is None or core.units_received != units:
                partial_since = last_read
            units = core.units_received

    def _take(self, data: bytes, handler: Handler | None, read_at: float) -> bool:
        """One read through the core, the new requests and the streams it woke; False: the
        connection is over."""
        core = self.core
        try:
            woken = core.receive_data(data)
        except ConnectionClosed as exc:
            if exc.args[0] not in ("eof", "goaway"):
                log.info("closing connection from %s: %s", self.peer, exc.args[0])
            return False
        if core.closed:  # peer sent GOAWAY: finish, the writer flushes what is left
            if self.on_events is not None:  # a response that came whole with the GOAWAY still goes on
                self.on_events(woken)
            return False
        while core.new_requests:
            st = core.new_requests.popleft()
            if handler is None:  # a client does not take requests
                core.reset(st.id, REFUSED_STREAM)
                continue
            if st.reset_code is not None:  # opened and cancelled in one read (Rapid Reset): no task for it
                core.forget(st.id)
                continue
            st.received_at = read_at
            run = handler if self.take_request is None else self.take_request(st)
            if run is not None:
                self.serve(st, run)
        for sid in woken:
            state = core.streams.get(sid)
            if state is not None and state.reset_code is not None:
                scope = self._scopes.get(sid)
                if scope is not None:
                    scope.cancel()  # the peer cancelled: cancel the whole request
        if self.on_events is not None:
            self.on_events(woken)
        self.wake(woken)
        self.flush()
        return True

    async def _writer(self) -> None:
        while True:
            await self._output.wait()
            self._output = trio.Event()
            # loop: what was queued while the last write was under way (our GOAWAY, say) goes too
            # (and what a direct write from a reader pass left in the transport)
            while (data := self.core.data_to_send(WRITE_SIZE)) or self._transport_unsent:
                self._writing = len(data)
                self._in_write = True
                try:
                    sent = await self._write(data)
                except TRANSPORT_ERRORS:
                    self.core.lose("write-failed")
                    self.wake({0})
                    return
                finally:
                    self._writing = 0
                    self._in_write = False
                if not sent:  # the peer stopped reading TCP: nothing more can reach it
                    log.info("closing connection from %s: slow-read (writes blocked)", self.peer)
                    self.core.lose("slow-read")
                    self._writes_blocked = True
                    self.wake({0})
                    self._reader_scope.cancel()
                    return
                if self.on_drained is not None:
                    self.on_drained()
            if self.core.closed:
                self._reader_scope.cancel()
                return

    async def _write(self, data: bytes) -> bool:
        """Send it all; False when a server's peer kept its TCP window shut past `slow_read_timeout`.
        A client connection (no limits) writes without a cancel scope."""
        if self.limits is None:
            await self.transport.send_all(data)
            return True
        with trio.move_on_after(self.limits.slow_read_timeout):
            await self.transport.send_all(data)
            return True
        return False

    async def _serve_stream(self, handler: Handler, stream: Stream) -> None:
        with trio.CancelScope() as scope:
            self._scopes[stream.id] = scope
            try:
                await handler(stream)
            except* (StreamReset, ConnectionClosed):
                pass  # the peer or the connection ended the request: nothing left to answer
            except* Exception:
                log.exception("handler failed on stream %d from %s", stream.id, self.peer)
                stream.reset(INTERNAL_ERROR)
        if scope.cancelled_caught and not self.core.closed:
            stream.reset(CANCEL)
        self._handlers.pop(stream.id, None)
        self._scopes.pop(stream.id, None)
        self.core.forget(stream.id)
        self._stream_done()
