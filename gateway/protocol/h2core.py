"""Sans-IO HTTP/2 session core shared by the Trio servers and the uvloop load generator.

Theory of operation: `h2` already is the protocol state machine; this module adds what every
runtime needs on top of it and nothing that touches a socket:

- a table of `StreamState`s that buffer inbound events per stream (bytes, trailers, end, reset);
- flow control done the streaming way: inbound DATA is acknowledged only when the consumer
  says so (`ack`), so a relay acks after it forwarded a chunk and a slow reader on one side
  throttles the writer on the other, keeping memory per stream bounded by the windows;
- outbound DATA is cut to what the windows allow (`send_data` returns how much it took).

The runtime drivers (`gateway.protocol.h2trio`, `kiosk_emu.load.h2asyncio`) feed bytes in,
write `data_to_send()` out and wake the tasks whose stream ids `receive_data` returns; what they
share (waiting, waking, opening and releasing streams) is `H2Driver`, written against a one-shot
event each runtime supplies, and stream bodies are read and written by `StreamHandle`. Two rules:
1. every call that changes state may produce output, so drivers flush after each call;
2. a protocol error from the peer closes the whole connection (GOAWAY) and resets every stream
   on it, so no request is ever left half-done (INT-1).

On the server side the core also counts what costs us work and the peer nothing (RST_STREAM,
PING, SETTINGS, empty DATA) per connection in a window (`Limits`); one too many closes the
connection with GOAWAY ENHANCE_YOUR_CALM and a `close_reason` the node counts as a denial.
Timeouts need a clock and live in the drivers; the core says what they need to know
(`preface_received`, `receiving_partial`, `units_received`).
"""

from __future__ import annotations

import binascii
import functools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import h2.stream
import h2.utilities
import hpack.hpack
import hyperframe.frame

from topology.spec.model import Limits

Headers = list[tuple[bytes, bytes]]

# Between our own hops we raise the frame size and the connection window to cut per-frame
# overhead (DESIGN §3). The stream window stays near HTTP/2's default: a process serving three
# relay hops holds up to one window per stream and hop, and a wider window bought memory, not
# throughput (docs/performance.md).
MAX_FRAME_SIZE = 64 * 1024
STREAM_WINDOW = 64 * 1024
CONNECTION_WINDOW = 16 * 1024 * 1024
MAX_CONCURRENT_STREAMS = 1000
MAX_HEADER_LIST_SIZE = 16 * 1024  # an oversized header block closes the connection


def header_list_size(headers: Headers) -> int:
    """A header list's size as SETTINGS_MAX_HEADER_LIST_SIZE counts it (RFC 9113 §6.5.2)."""
    return sum(len(name) + len(value) + 32 for name, value in headers)


class ConnectionClosed(Exception):
    """The HTTP/2 connection is gone (peer GOAWAY, protocol error or EOF)."""


class StreamReset(Exception):
    """The peer reset the stream (or the connection died) before it finished."""

    def __init__(self, stream_id: int, code: int | None) -> None:
        super().__init__(f"stream {stream_id} reset (code {code})")
        self.code = code


class Flood:
    """At most `limit` events per `window` seconds (a fixed window: cheap, and a burst of twice
    the limit across a window boundary is still bounded)."""

    __slots__ = ("limit", "window", "start", "count")

    def __init__(self, limit: int, window: float) -> None:
        self.limit, self.window, self.start, self.count = limit, window, float("-inf"), 0

    def over(self, now: float) -> bool:
        if now - self.start >= self.window:
            self.start, self.count = now, 0
        self.count += 1
        return self.count > self.limit


PENDING = object()  # next_chunk: nothing yet, the driver waits for the stream to be woken


@dataclass(eq=False)
class StreamState:
    """Inbound side of one stream as the consumer sees it."""

    id: int
    headers: Headers | None = None
    trailers: Headers | None = None
    chunks: deque[tuple[bytes, int]] = field(default_factory=deque)  # (data, flow-controlled length)
    ended: bool = False  # remote sent END_STREAM
    reset_code: int | None = None  # remote (or we) reset the stream
    buffered: int = 0  # bytes received and not yet taken by the consumer
    received_at: float = 0.0  # time.perf_counter() when the driver read the request's HEADERS (server side)

    @property
    def finished(self) -> bool:
        return self.ended or self.reset_code is not None

    @property
    def body_ends_here(self) -> bool:
        """The remote ended the stream with its body, no trailers, and nothing is left to take:
        whoever passes the next piece on may set END_STREAM with it."""
        return self.ended and not self.chunks and self.trailers is None


class StreamHandle:
    """What both runtimes' stream objects share: a view of one StreamState on one connection.

    `conn` is an `H2Driver` (`core`, `flush()`, `wake(ids)`, awaitable `wait(stream_id)`);
    everything here is written against those alone, so the Trio servers and the uvloop load
    generator read and write bodies with the same code.
    """

    __slots__ = ("conn", "st")

    def __init__(self, conn, st: StreamState) -> None:
        self.conn = conn
        self.st = st

    @property
    def id(self) -> int:
        return self.st.id

    @property
    def headers(self) -> Headers | None:
        return self.st.headers

    @property
    def trailers(self) -> Headers | None:
        return self.st.trailers

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
                self.reset(h2.errors.ErrorCodes.REFUSED_STREAM)
                raise StreamReset(self.st.id, h2.errors.ErrorCodes.REFUSED_STREAM)
            parts.append(chunk)
        return b"".join(parts)

    def ack(self, nbytes: int) -> None:
        self.conn.core.ack(self.st.id, nbytes)
        self.conn.flush()

    async def forward_body(self, dst: StreamHandle, observe: Callable[[bytes], None] | None = None) -> None:
        """Move this stream's body on to `dst` chunk by chunk, acking each chunk here only once
        `dst` took it, so this side's window follows what the far peer reads and nothing is
        buffered beyond the windows. `observe` sees each chunk before it is sent.

        A chunk is acked even when its send fails (a reset or a cancel while waiting for window):
        it is already out of this stream's buffer, so the reset cannot give its bytes back, and
        every such race would shrink the connection's window for good (about 230 cancelled
        downloads stalled a kiosk's connection through the relays)."""
        while (chunk := await self.receive_chunk(ack=False)) is not None:
            if not chunk:
                continue
            if observe is not None:
                observe(chunk)
            try:
                await dst.send_data(chunk)
            finally:
                self.ack(len(chunk))

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

    def reset(self, code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        self.conn.core.reset(self.st.id, code)
        self.conn.flush()
        self.conn.wake({self.st.id})


class OneShot(Protocol):
    """The runtime's event primitive: set once, awaited by any number of tasks (trio.Event, asyncio.Event)."""

    def set(self) -> None: ...

    def is_set(self) -> bool: ...

    def wait(self) -> Awaitable[object]: ...


class H2Driver:
    """What both runtimes' connection drivers share: per-stream waits and wakes, opening streams
    within the peer's concurrency limit, and releasing them.

    A runtime driver subclasses it and supplies `new_event()` (a fresh `OneShot`) and `flush()`
    (get `core.data_to_send()` onto the wire soon), then feeds the core and calls `wake` with the
    ids `receive_data` returns. A task waits on one event per stream id; a wake pops and sets it,
    so the next wait makes a new one (id 0: every stream, and the tasks waiting for a free slot).
    """

    stream_class: type[StreamHandle] = StreamHandle

    def __init__(self, core: H2Core) -> None:
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
                st.reset_code = h2.errors.ErrorCodes.CANCEL
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
            ev = self._waiters.pop(sid, None)
            if ev is not None:
                ev.set()

    def _stream_done(self) -> None:
        """A stream slot may be free: let the tasks waiting in `open_stream` look again."""
        ev, self._slot_free = self._slot_free, None
        if ev is not None:
            ev.set()

    # -- client side -----------------------------------------------------------------------

    async def open_stream(self, headers: Headers, end_stream: bool = False) -> StreamHandle:
        """Start a request; waits while the peer's concurrent-stream limit is reached."""
        while not self.core.can_open_stream():
            if self.core.closed:
                raise ConnectionClosed(self.core.close_reason or "closed")
            if self._slot_free is None:
                self._slot_free = self.new_event()
            await self._slot_free.wait()
        st = self.core.send_request(headers, end_stream)
        self.flush()
        return self.stream_class(self, st)

    def release(self, stream: StreamHandle) -> None:
        """Client side: done with a stream (reset it if unfinished, so every hop stops work on it)."""
        st = stream.st
        if not st.finished:
            stream.reset(h2.errors.ErrorCodes.CANCEL)
        self.core.forget(st.id)
        self._stream_done()

    def close(self) -> None:
        """GOAWAY; every waiting task wakes and finds its stream reset."""
        self.core.close()
        self.wake({0})
        self.flush()


def _hex_prefix(data) -> str:
    """hyperframe's `_raw_data_repr`, same text, without hexlifying the whole payload first: h2
    formats every frame it receives for a trace log that is off (h2 4.4 `_receive_frame`), and
    on 64 KiB DATA frames that hexlify showed in a relay's profile (docs/performance.md)."""
    if not data:
        return "None"
    r = binascii.hexlify(bytes(data[:11])).decode("ascii")
    return "<hex:" + (r[:20] + "..." if len(r) > 20 else r) + ">"


hyperframe.frame._raw_data_repr = _hex_prefix


def _deferred(frame):
    """Stands in for `repr` in h2.connection, whose one use is `trace("Received frame: %s",
    repr(frame))` on every frame received: the frame goes to the logger as it is, so a logger
    that logs formats it (same text) and the usual no-op one costs nothing (docs/performance.md)."""
    return frame


h2.connection.repr = _deferred


class _Silent:
    """hpack's module logger when its debug level is off: hpack calls `log.debug` with arguments
    four times per header field, and each call still walks logging's level checks
    (docs/performance.md)."""

    @staticmethod
    def debug(*args, **kwargs) -> None:
        pass


if not logging.getLogger(hpack.hpack.__name__).isEnabledFor(logging.DEBUG):
    hpack.hpack.log = _Silent()


RESET_ENDS = frozenset({h2.stream.StreamClosedBy.RECV_RST_STREAM, h2.stream.StreamClosedBy.SEND_RST_STREAM})


class ResetRecords(h2.utilities.SizeLimitDict):
    """h2's record of how closed streams ended, kept for the streams that ended in RST_STREAM only.

    h2 consults it for one thing: a late frame on a stream that was reset (trailers or DATA that
    crossed our RST_STREAM) is answered with RST_STREAM instead of closing the whole connection.
    For a stream that ended normally, or one not remembered, a late HEADERS is a connection error
    either way and late DATA, WINDOW_UPDATE or RST_STREAM are handled without the record; so
    remembering normal ends (nearly every request) costs ~100 bytes a request per connection end,
    for nothing: the soak bench's relays grew from these alone (docs/soak.md)."""

    def __setitem__(self, stream_id: int, closed_by) -> None:
        if closed_by in RESET_ENDS:
            super().__setitem__(stream_id, closed_by)


class _Connection(h2.connection.H2Connection):
    """h2 remembers how every closed stream ended, up to 65,536 per connection: on a long-lived
    kiosk or relay connection, memory growing with every request for hours (docs/soak.md).
    Here only resets are remembered (`ResetRecords`), the last
    2 × MAX_CONCURRENT_STREAMS of them: a late frame on a reset stream older than that closes the
    connection instead of being refused alone."""

    MAX_CLOSED_STREAMS = 2 * MAX_CONCURRENT_STREAMS

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._closed_streams = ResetRecords(size_limit=self.MAX_CLOSED_STREAMS)


class CoreBase:
    """What every HTTP/2 core shares (h2's `H2Core`, `h2lean.LeanClientCore`): the stream table
    as the consumer sees it, taking chunks from it, and closing. A core implements `ack`."""

    streams: dict[int, StreamState]
    closed: bool = False
    close_reason: str | None = None

    def ack(self, stream_id: int, nbytes: int) -> None:
        raise NotImplementedError

    def take_chunk(self, st: StreamState) -> bytes | None:
        """Next inbound chunk of a stream, or None when none is buffered. Does not ack."""
        if not st.chunks:
            return None
        data, flow_len = st.chunks.popleft()
        st.buffered -= len(data)
        if flow_len > len(data):  # padding counts against the window but never reaches the consumer
            self.ack(st.id, flow_len - len(data))
        return data

    def next_chunk(self, st: StreamState) -> bytes | None | object:
        """The consumer's next step on a stream: a chunk (not yet acked), None at the body's
        end, or PENDING; raises StreamReset once the stream was reset and nothing is left."""
        data = self.take_chunk(st)
        if data is not None:
            return data
        if st.reset_code is not None:
            raise StreamReset(st.id, st.reset_code)
        return None if st.ended else PENDING

    def _check_open(self) -> None:
        if self.closed:
            raise ConnectionClosed(self.close_reason or "closed")

    def _close(self, reason: str) -> None:
        if not self.closed:
            self.closed = True
            self.close_reason = reason
            for st in self.streams.values():
                if st.reset_code is None and not st.ended:
                    st.reset_code = h2.errors.ErrorCodes.CANCEL


class H2Core(CoreBase):
    def __init__(
        self,
        *,
        client_side: bool,
        max_header_list_size: int = MAX_HEADER_LIST_SIZE,
        limits: Limits | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        max_streams = MAX_CONCURRENT_STREAMS
        if limits is not None:
            max_header_list_size, max_streams = limits.max_header_list_size, limits.max_concurrent_streams
        # A server validates inbound headers (its peers may misbehave); a client's peers are our
        # own next hops, authenticated by certificate, whose headers the next server down
        # validates again. Outbound headers are ours and already lowercase and well-formed. So
        # validation, a fifth of h2's work on a small request, runs once per hop, not twice.
        config = h2.config.H2Configuration(
            client_side=client_side,
            header_encoding=None,
            validate_inbound_headers=not client_side,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self.conn = _Connection(config=config)
        # hpack's Huffman coder is pure Python, char by char; between hops on one machine the
        # bytes it saves cost more CPU than they save (and peers then skip Huffman decoding too).
        self.conn.encoder.encode = functools.partial(type(self.conn.encoder).encode, self.conn.encoder, huffman=False)
        self.conn.local_settings = h2.settings.Settings(
            client=client_side,
            initial_values={
                h2.settings.SettingCodes.MAX_FRAME_SIZE: MAX_FRAME_SIZE,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_streams,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: max_header_list_size,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
            },
        )
        self.conn.max_inbound_frame_size = MAX_FRAME_SIZE
        self.conn.decoder.max_header_list_size = max_header_list_size
        self._bound_header_blocks(2 * max_header_list_size + 4096)
        self.clock = clock
        self.preface_received = client_side  # server side: until the client's first SETTINGS
        # Only a server guards itself: a client's peers are our own upstream hops.
        self.floods: dict[type, tuple[Flood, str]] = {}
        if limits is not None and not client_side:
            w = limits.flood_window
            self.floods = {
                h2.events.StreamReset: (Flood(limits.max_resets, w), "rapid-reset"),
                h2.events.PingReceived: (ping := Flood(limits.max_pings, w), "ping-flood"),
                h2.events.PingAckReceived: (ping, "ping-flood"),
                h2.events.RemoteSettingsChanged: (Flood(limits.max_settings, w), "settings-flood"),
                h2.events.DataReceived: (Flood(limits.max_empty_data, w), "empty-data-flood"),
            }
        self.streams: dict[int, StreamState] = {}
        self.new_requests: deque[StreamState] = deque()  # server side: streams to hand to a handler
        self.closed = False
        self.close_reason: str | None = None
        self._settings_seen = False
        self.units_received = 0  # h2's events: each comes of a frame or header block received whole
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(CONNECTION_WINDOW - 65535)

    def _bound_header_blocks(self, max_bytes: int) -> None:
        """h2 buffers up to 64 CONTINUATION frames of a block before decoding it (up to 4 MiB at
        our frame size); cap the compressed block too, so a CONTINUATION flood holds little."""
        buf = self.conn.incoming_buffer
        update = getattr(buf, "_update_header_buffer", None)
        if update is None or not hasattr(buf, "_headers_buffer"):
            return  # another h2: its own CONTINUATION_BACKLOG still applies

        def bounded(frame):
            out = update(frame)
            if sum(len(f.data) for f in buf._headers_buffer) > max_bytes:
                raise h2.exceptions.ProtocolError("Too many continuation frames received: header block too large.")
            return out

        buf._update_header_buffer = bounded

    @property
    def peer_max_header_list(self) -> int | None:
        """The peer's SETTINGS_MAX_HEADER_LIST_SIZE (None: no limit); ours until its SETTINGS came."""
        if not self._settings_seen:
            return self.conn.decoder.max_header_list_size
        return self.conn.remote_settings.max_header_list_size

    @property
    def receiving_partial(self) -> bool:
        """A frame or a header block has begun arriving and is not complete yet."""
        buf = self.conn.incoming_buffer
        return bool(getattr(buf, "_data", b"")) or bool(getattr(buf, "_headers_buffer", ()))

    def abort(self, reason: str, code: int = h2.errors.ErrorCodes.ENHANCE_YOUR_CALM) -> None:
        """Close because of what the peer did (or failed to do): GOAWAY with `code`, reason kept."""
        if not self.closed:
            try:
                self.conn.close_connection(error_code=code)
            except h2.exceptions.ProtocolError:
                pass
            self._close(reason)

    # -- inbound ---------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> set[int]:
        """Feed bytes from the peer; returns the stream ids to wake (0: connection-level change).

        Raises ConnectionClosed when the peer broke the protocol or ended the connection;
        the GOAWAY for it is already in data_to_send().
        """
        if not data:
            self._close("eof")
            raise ConnectionClosed("eof")
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            # Malformed frames, oversized headers, flow-control abuse: drop this peer only.
            calm = h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
            if isinstance(exc, h2.exceptions.DenialOfServiceError):  # hpack: decoded too large (HPACK bomb too)
                code, reason = calm, "oversized-headers"
            elif str(exc).lower().startswith("too many continuation"):
                code, reason = calm, "continuation-flood"
            elif isinstance(exc, h2.exceptions.TooManyStreamsError):
                code, reason = h2.errors.ErrorCodes.REFUSED_STREAM, "too-many-streams"
            else:
                code, reason = h2.errors.ErrorCodes.PROTOCOL_ERROR, "protocol-error"
            self.abort(reason, code)
            raise ConnectionClosed(reason) from exc
        woken: set[int] = set()
        self.units_received += len(events)
        now = self.clock() if self.floods else 0.0
        for ev in events:
            sid = getattr(ev, "stream_id", 0) or 0
            if (flood := self.floods.get(type(ev))) is not None:
                if not isinstance(ev, h2.events.DataReceived) or not (ev.data or ev.stream_ended):
                    if flood[0].over(now):
                        self.abort(flood[1])
                        raise ConnectionClosed(flood[1])
            if isinstance(ev, h2.events.RemoteSettingsChanged):
                self.preface_received = self._settings_seen = True
            if isinstance(ev, h2.events.DataReceived):
                st = self.streams.get(sid)
                if st is None or st.reset_code is not None:
                    self.conn.acknowledge_received_data(ev.flow_controlled_length, sid)
                    continue
                st.chunks.append((ev.data, ev.flow_controlled_length))
                st.buffered += len(ev.data)
                if ev.stream_ended:
                    st.ended = True
            elif isinstance(ev, h2.events.RequestReceived):
                st = StreamState(sid, headers=ev.headers, ended=ev.stream_ended is not None)
                self.streams[sid] = st
                self.new_requests.append(st)
            elif isinstance(ev, (h2.events.ResponseReceived, h2.events.InformationalResponseReceived)):
                st = self.streams.get(sid)
                if st is not None and isinstance(ev, h2.events.ResponseReceived):
                    st.headers = ev.headers
                    st.ended = ev.stream_ended is not None
            elif isinstance(ev, h2.events.TrailersReceived):
                st = self.streams.get(sid)
                if st is not None:
                    st.trailers = ev.headers
                    st.ended = True
            elif isinstance(ev, h2.events.StreamEnded):
                st = self.streams.get(sid)
                if st is not None:
                    st.ended = True
            elif isinstance(ev, h2.events.StreamReset):
                st = self.streams.get(sid)
                if st is not None and st.reset_code is None:
                    st.reset_code = ev.error_code
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self._close("goaway")
                woken.update(self.streams)
                woken.add(0)
                continue
            # WindowUpdated / RemoteSettingsChanged wake writers waiting for window (id 0 = all).
            woken.add(sid)
        return woken

    def ack(self, stream_id: int, nbytes: int) -> None:
        """The consumer has dealt with nbytes of this stream: reopen the window for them."""
        if nbytes and not self.closed:
            try:
                self.conn.acknowledge_received_data(nbytes, stream_id)
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                pass  # stream already gone: the connection window was still credited by h2

    # -- outbound --------------------------------------------------------------------------

    def send_request(self, headers: Headers, end_stream: bool) -> StreamState:
        self._check_open()
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, headers, end_stream=end_stream)
        st = StreamState(sid)
        self.streams[sid] = st
        return st

    def can_open_stream(self) -> bool:
        """Below the peer's concurrent-stream limit. h2 counts open streams by walking all of
        them; every stream we opened and have not forgotten is in `streams`, so while those are
        fewer than the limit the walk is skipped."""
        limit = self.conn.remote_settings.max_concurrent_streams
        return len(self.streams) < limit or self.conn.open_outbound_streams < limit

    def send_headers(self, stream_id: int, headers: Headers, end_stream: bool = False) -> None:
        self._check_open()
        self.conn.send_headers(stream_id, headers, end_stream=end_stream)

    def send_data(self, stream_id: int, data: bytes | memoryview, end_stream: bool = False) -> int:
        """Send as much of data as the windows allow, in as many frames as the peer's
        SETTINGS_MAX_FRAME_SIZE needs; returns the count taken (END_STREAM only with the last byte).

        Taking only one frame per call and then waiting for a window event stalls any peer that
        keeps the protocol's 16 KiB frames and sends WINDOW_UPDATE rarely (curl, nghttp2)."""
        self._check_open()
        window = self.conn.local_flow_control_window(stream_id)
        if window <= 0 and data:
            return 0
        n = min(window, len(data))
        frame = self.conn.max_outbound_frame_size
        for start in range(0, n, frame):
            stop = min(start + frame, n)
            self.conn.send_data(stream_id, data[start:stop], end_stream=end_stream and stop == len(data))
        if not data:
            self.conn.send_data(stream_id, b"", end_stream=end_stream)
        return n

    def end_stream(self, stream_id: int, trailers: Headers | None = None) -> None:
        self._check_open()
        if trailers:
            self.conn.send_headers(stream_id, trailers, end_stream=True)
        else:
            self.conn.end_stream(stream_id)

    def reset(self, stream_id: int, code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        """Cancel a stream (the whole request, never half of it). Idempotent."""
        st = self.streams.get(stream_id)
        if st is not None and st.reset_code is None:
            st.reset_code = code
            # unread bytes still count against the connection window: give them back, or every
            # reset of a stream with data buffered shrinks the window until the connection stalls
            self.ack(stream_id, sum(flow for _, flow in st.chunks))
            st.chunks.clear()
            st.buffered = 0
        if self.closed:
            return
        try:
            self.conn.reset_stream(stream_id, error_code=code)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass

    def forget(self, stream_id: int) -> None:
        """The consumer is done with the stream; unread data is acked so the connection window recovers."""
        st = self.streams.pop(stream_id, None)
        if st is not None and st.chunks:
            self.ack(stream_id, sum(flow for _, flow in st.chunks))
            st.chunks.clear()

    def ping(self, opaque: bytes = bytes(8)) -> None:
        """A PING for the peer to ACK: whether it is still there (`gateway.transport.keepalive`)."""
        if not self.closed:
            self.conn.ping(opaque)

    def close(self, code: int = h2.errors.ErrorCodes.NO_ERROR) -> None:
        if not self.closed:
            try:
                self.conn.close_connection(error_code=code)
            except h2.exceptions.ProtocolError:
                pass
            self._close("local-close")

    def data_to_send(self, amount: int | None = None) -> bytes:
        return self.conn.data_to_send(amount)

    @property
    def pending_output(self) -> int:
        """Bytes queued for the peer and not yet taken by `data_to_send`."""
        return len(self.conn._data_to_send)  # h2's own buffer (no public size)


def header(headers: Headers | None, name: bytes) -> bytes | None:
    """First value of a header (names are lowercase in HTTP/2)."""
    for k, v in headers or ():
        if k == name:
            return v
    return None
