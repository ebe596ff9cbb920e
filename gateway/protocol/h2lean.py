"""konbini's HTTP/2 cores, both ends: frames by hand, HPACK in `fieldcodec`.

Theory of operation. h2's general state machine builds an event object per frame, walks every
stream's state machine and validates headers in layers of generators; on a relay that was most
of a hop's CPU. konbini's connections need far less of it: a client connection only opens
requests, sends bodies and reads responses; a server connection only takes requests and answers
them. These cores speak `interfaces.Core` (what `Splice`, `TrioH2` and the load generator call)
and do those parts of RFC 9113 themselves:

- the preface and SETTINGS, PING and SETTINGS acks;
- both directions' flow control: our windows are returned as the consumer acks, as h2's
  WindowManager does (once half a window was consumed, or sooner when it is shut), and DATA
  beyond a window is a FLOW_CONTROL_ERROR;
- HEADERS/CONTINUATION in and out through `fieldcodec`, RST_STREAM, GOAWAY.

The server core also guards itself, as h2 with `validate_inbound_headers` did and more cheaply:
the client preface and a SETTINGS first, client stream ids odd and rising, request header fields
(`fieldrules`; content-length against the body here), SETTINGS_MAX_CONCURRENT_STREAMS, decoded
header lists bounded while decoding (an HPACK bomb stops at the limit), header blocks bounded in
bytes and frames (CONTINUATION flood), and per-connection counters of what costs us work and the
peer nothing (RST_STREAM, PING, SETTINGS, empty DATA; `Limits`).

Anything malformed (a frame over our SETTINGS_MAX_FRAME_SIZE, a bad SETTINGS value, a header
block that does not decode, a frame on a stream that was never opened, data beyond a window)
closes the connection with GOAWAY and raises ConnectionClosed; a relay then resets every request
crossing it (INT-1). Not done: server push (refused; a PUSH_PROMISE is a
protocol error), priorities (ignored).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

import hpack.exceptions

from gateway.protocol.errors import ConnectionClosed, StreamReset, Violation
from gateway.protocol.fieldcodec import FieldDecoder, FieldEncoder
from gateway.protocol.fieldrules import check_field, request_fields
from gateway.protocol.frames import (
    ACK,
    CANCEL,
    COMPRESSION_ERROR,
    CONNECTION_WINDOW,
    CONTINUATION,
    DATA,
    DEFAULT_FRAME_SIZE,
    DEFAULT_WINDOW,
    END_HEADERS,
    END_STREAM,
    ENHANCE_YOUR_CALM,
    FLOW_CONTROL_ERROR,
    FRAME_HEAD,
    FRAME_SIZE_ERROR,
    GOAWAY,
    HEADERS,
    MAX_CONCURRENT_STREAMS,
    MAX_CONTINUATIONS,
    MAX_FRAME_SIZE,
    MAX_HEADER_BLOCK,
    MAX_HEADER_LIST_SIZE,
    MAX_WINDOW,
    NO_ERROR,
    PADDED,
    PING,
    PREFACE,
    PRIORITY,
    PRIORITY_FLAG,
    PROTOCOL_ERROR,
    PUSH_PROMISE,
    REFUSED_STREAM,
    RST_STREAM,
    SETTING,
    SETTINGS,
    STREAM_CLOSED,
    STREAM_WINDOW,
    U32,
    WINDOW_UPDATE,
    SettingCode,
    frame,
)
from gateway.protocol.streams import PENDING, Chunk, Headers, StreamState
from topology.spec.model import Limits


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


def _update_due(processed: int, recv_window: int, window: int) -> bool:
    """Whether `processed` bytes go back to the peer now: half the window was consumed, or the
    window is shut and at least 1 KiB waits (the rule for a stream and for the connection alike)."""
    return processed >= window // 2 or (recv_window == 0 and processed >= 1024)


class _Output:
    """Frames queued for the peer, as the pieces they were made of: appending never reallocates
    or moves what is queued (a bytearray did, growing to 256 KiB by `+=` and moving its tail down
    after every partial take), and taking the first `amount` bytes joins the pieces once."""

    __slots__ = ("parts", "size")

    def __init__(self) -> None:
        self.parts: deque[bytes] = deque()
        self.size = 0

    def __iadd__(self, data: bytes) -> _Output:
        if data:
            self.parts.append(data)
            self.size += len(data)
        return self

    def __len__(self) -> int:
        return self.size

    def prepend(self, data: bytes) -> None:
        self.parts.appendleft(data)
        self.size += len(data)

    def take(self, amount: int | None = None) -> bytes:
        parts = self.parts
        if amount is None or amount >= self.size:
            data = parts[0] if len(parts) == 1 else b"".join(parts)
            parts.clear()
            self.size = 0
            return data
        out, n = [], 0
        while n < amount:
            part = parts.popleft()
            if n + len(part) > amount:
                cut = amount - n
                parts.appendleft(part[cut:])
                part = part[:cut]
            out.append(part)
            n += len(part)
        self.size -= n
        return b"".join(out)


class _Flow:
    """The protocol's state of one stream: our send window, whether each side ended it or it was
    reset, our receive window with the bytes acked since our last WINDOW_UPDATE for it, and the
    request body's declared and received length (server side). Kept apart from the stream's
    `StreamState`, which the splice and the drivers read and change: what only the core may
    change stays where only the core reaches it."""

    __slots__ = ("window", "ended", "reset", "remote_ended", "recv_window", "processed", "expected", "received")

    def __init__(self, window: int) -> None:
        self.window = window
        self.ended = False  # we sent END_STREAM
        self.reset = False  # either side sent RST_STREAM: nothing more goes out
        self.remote_ended = False
        self.recv_window = STREAM_WINDOW  # what the peer may still send on it
        self.processed = 0
        self.expected = -1  # content-length, -1 when none was given
        self.received = 0

    @property
    def closed(self) -> bool:
        return self.reset or (self.ended and self.remote_ended)


class LeanCore:
    """What both lean cores share: the frame reader, flow control both ways, DATA, header blocks
    out, resets and closing. A subclass says what a complete header block means (`_on_headers`),
    which streams are idle (`_idle`), and counts floods if it wants (`_flood`)."""

    preface_received = True
    _preface_left = 0  # server: bytes of the client preface still to come
    _peer_is_server = False  # a server may not send ENABLE_PUSH 1 (RFC 9113 §6.5.2)
    _settings_seen = False

    def __init__(self, max_header_list_size: int, settings: dict[int, int]) -> None:
        self.streams: dict[int, StreamState] = {}
        self.new_requests: deque[StreamState] = deque()
        self.closed = False
        self.close_reason: str | None = None
        self._out = _Output()
        self._in = b""  # the start of a frame not yet whole
        self.units_received = 0  # frames and header blocks (counted once, at their end) received whole
        self._state: dict[int, _Flow] = {}
        self._encoder = FieldEncoder()
        self._decoder = FieldDecoder(max_header_list_size)
        self._block: bytearray | None = None  # a header block waiting for its CONTINUATIONs
        self._block_stream = 0
        self._block_flags = 0
        self._block_frames = 0
        # the peer's settings, as RFC 9113 has them until its SETTINGS arrive
        self.max_frame_size = DEFAULT_FRAME_SIZE
        self.initial_window = DEFAULT_WINDOW
        self.max_streams = MAX_CONCURRENT_STREAMS  # streams we may open (client)
        # the header list the peer takes: what we take ourselves until its SETTINGS say (no value: no limit)
        self.peer_max_header_list: int | None = max_header_list_size
        self.send_window = DEFAULT_WINDOW  # connection level
        self.recv_window = CONNECTION_WINDOW
        self._processed = 0  # connection-level bytes acked since the last WINDOW_UPDATE
        self._out += frame(SETTINGS, 0, 0, b"".join(SETTING.pack(k, v) for k, v in settings.items()))
        self._out += frame(WINDOW_UPDATE, 0, 0, U32.pack(CONNECTION_WINDOW - DEFAULT_WINDOW))

    def take_chunk(self, st: StreamState) -> bytes | None:
        """Next inbound chunk of a stream, or None when none is buffered. Does not ack."""
        if not st.chunks:
            return None
        data, flow_len = st.chunks.popleft()
        st.buffered -= len(data)
        if flow_len > len(data):  # padding counts against the window but never reaches the consumer
            self.ack(st.id, flow_len - len(data))
        return data

    def next_chunk(self, st: StreamState) -> Chunk:
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
                    st.reset_code = CANCEL

    def lose(self, reason: str) -> None:
        """The transport under the connection is gone (EOF, a failed write): closed without a
        GOAWAY, every unfinished stream reset."""
        self._close(reason)

    # -- inbound -------------------------------------------------------------------------------

    @property
    def receiving_partial(self) -> bool:
        return bool(self._in) or self._block is not None

    def receive_data(self, data: bytes) -> set[int]:
        """Feed bytes from the peer; returns the stream ids to wake (0: every stream may move).
        Raises ConnectionClosed when the peer ended the connection or broke the protocol."""
        if not data:
            self._close("eof")
            raise ConnectionClosed("eof")
        if self.closed:
            return set()
        woken: set[int] = set()
        try:
            if self._preface_left:
                data = self._preface(data)
            # Frames are read from the bytes as they came; only a frame cut short is kept, in a
            # buffer of its own size (a bytearray reused across reads would keep the capacity of
            # the largest read, 256 KiB, on every idle connection of a relay).
            buf = self._in + data if self._in else data
            pos, end = 0, len(buf)
            with memoryview(buf) as view:
                while end - pos >= 9:
                    hi, lo, kind, flags, sid = FRAME_HEAD.unpack_from(buf, pos)
                    length = (hi << 8) | lo
                    if length > MAX_FRAME_SIZE:
                        raise Violation(FRAME_SIZE_ERROR, f"frame of {length} bytes")
                    if end - pos - 9 < length:
                        break
                    payload = view[pos + 9 : pos + 9 + length].tobytes()  # one copy; no view outlives the loop
                    pos += 9 + length
                    self._frame(kind, flags, sid & 0x7FFFFFFF, payload, woken)
                    if self._block is None:
                        self.units_received += 1
                    if self.closed:  # GOAWAY
                        break
        except Violation as exc:
            self.abort(exc.reason, exc.code)
            raise ConnectionClosed(exc.reason) from exc
        self._in = bytes(buf[pos:]) if pos < end else b""
        return woken

    def _preface(self, data: bytes) -> bytes:
        """Check the client preface as it arrives; what follows it."""
        done = len(PREFACE) - self._preface_left
        n = min(len(data), self._preface_left)
        if data[:n] != PREFACE[done : done + n]:
            raise Violation(PROTOCOL_ERROR, "not the HTTP/2 client preface")
        self._preface_left -= n
        return data[n:]

    def _frame(self, kind: int, flags: int, sid: int, payload: bytes, woken: set[int]) -> None:
        if self._block is not None and kind != CONTINUATION:
            raise Violation(PROTOCOL_ERROR, "a header block interrupted")
        if not self.preface_received and kind != SETTINGS:
            raise Violation(PROTOCOL_ERROR, "the first frame is not SETTINGS")
        if kind == DATA:
            self._data(flags, sid, payload, woken)
        elif kind == HEADERS:
            if sid == 0:
                raise Violation(PROTOCOL_ERROR, "HEADERS on stream 0")
            block = self._unpad(flags, payload)
            if flags & PRIORITY_FLAG:
                if len(block) < 5:
                    raise Violation(FRAME_SIZE_ERROR, "HEADERS too short for its priority")
                _check_dependency(sid, block)
                block = block[5:]
            self._block, self._block_stream, self._block_flags, self._block_frames = bytearray(block), sid, flags, 0
            if flags & END_HEADERS:
                self._headers(woken)
        elif kind == CONTINUATION:
            if self._block is None or sid != self._block_stream:
                raise Violation(PROTOCOL_ERROR, "CONTINUATION without its HEADERS")
            self._block += payload
            self._block_frames += 1
            if flags & END_HEADERS:  # decoding stops at the header list limit, whatever the block's size
                self._headers(woken)
            elif len(self._block) > MAX_HEADER_BLOCK or self._block_frames > MAX_CONTINUATIONS:
                raise Violation(ENHANCE_YOUR_CALM, "a header block that does not end", "continuation-flood")
        elif kind == RST_STREAM:
            if len(payload) != 4:
                raise Violation(FRAME_SIZE_ERROR, "bad RST_STREAM")
            if sid == 0 or self._idle(sid):
                raise Violation(PROTOCOL_ERROR, "RST_STREAM on an idle stream")
            self._flood(RST_STREAM)
            st = self.streams.get(sid)
            if st is not None and st.reset_code is None and not (st.ended and self._done_sending(sid)):
                st.reset_code = U32.unpack(payload)[0]
                woken.add(sid)
            state = self._state.get(sid)
            if state is not None:
                state.reset = True  # nothing more goes out on it
        elif kind == SETTINGS:
            self._settings(flags, sid, payload, woken)
        elif kind == PING:
            if len(payload) != 8 or sid != 0:
                raise Violation(FRAME_SIZE_ERROR if len(payload) != 8 else PROTOCOL_ERROR, "bad PING")
            self._flood(PING)
            if not flags & ACK:
                self._out += frame(PING, ACK, 0, payload)
        elif kind == GOAWAY:
            if len(payload) < 8 or sid != 0:
                raise Violation(FRAME_SIZE_ERROR if len(payload) < 8 else PROTOCOL_ERROR, "bad GOAWAY")
            self._close("goaway")
            woken.update(self.streams)
            woken.add(0)
        elif kind == WINDOW_UPDATE:
            self._window_update(sid, payload, woken)
        elif kind == PUSH_PROMISE:
            raise Violation(PROTOCOL_ERROR, "PUSH_PROMISE (push is off)")
        elif kind == PRIORITY:  # ignored, once it is well-formed
            if len(payload) != 5 or sid == 0:
                raise Violation(FRAME_SIZE_ERROR if len(payload) != 5 else PROTOCOL_ERROR, "bad PRIORITY")
            _check_dependency(sid, payload)
        # unknown frame types are ignored (RFC 9113 §5.5)

    def _done_sending(self, sid: int) -> bool:
        state = self._state.get(sid)
        return state is not None and state.ended

    def _idle(self, sid: int) -> bool:
        """A stream neither side has opened yet (frames other than HEADERS and PRIORITY on it are errors)."""
        raise NotImplementedError

    def _flood(self, kind: int) -> None:
        """Count a frame that costs us work and the peer nothing (server side)."""

    @staticmethod
    def _unpad(flags: int, payload: bytes) -> bytes:
        if not flags & PADDED:
            return payload
        if not payload or payload[0] >= len(payload):
            raise Violation(PROTOCOL_ERROR, "padding longer than the frame")
        return payload[1 : len(payload) - payload[0]]

    def _window_update(self, sid: int, payload: bytes, woken: set[int]) -> None:
        if len(payload) != 4:
            raise Violation(FRAME_SIZE_ERROR, "bad WINDOW_UPDATE")
        inc = U32.unpack(payload)[0] & 0x7FFFFFFF
        if inc == 0:
            raise Violation(PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
        if sid == 0:
            if self.send_window + inc > MAX_WINDOW:
                raise Violation(FLOW_CONTROL_ERROR, "connection window beyond 2^31-1")
            self.send_window += inc
            woken.add(0)
            return
        state = self._state.get(sid)
        if state is None:
            if self._idle(sid):
                raise Violation(PROTOCOL_ERROR, "WINDOW_UPDATE on an idle stream")
            return  # a stream we are done with
        if state.window + inc > MAX_WINDOW:
            raise Violation(FLOW_CONTROL_ERROR, "stream window beyond 2^31-1")
        state.window += inc
        woken.add(sid)

    def _data(self, flags: int, sid: int, payload: bytes, woken: set[int]) -> None:
        n = len(payload)
        if sid == 0:
            raise Violation(PROTOCOL_ERROR, "DATA on stream 0")
        if n > self.recv_window:
            raise Violation(FLOW_CONTROL_ERROR, "DATA beyond the connection window")
        self.recv_window -= n
        state = self._state.get(sid)
        if state is None:
            if self._idle(sid):
                raise Violation(PROTOCOL_ERROR, "DATA on an idle stream")
            self._return_connection(n)  # a stream we are done with: nobody will read it
            return
        if n > state.recv_window:
            raise Violation(FLOW_CONTROL_ERROR, "DATA beyond the stream window")
        state.recv_window -= n
        st = self.streams.get(sid)
        if st is None or st.reset_code is not None or state.reset:
            self._return_connection(n)  # crossed our RST_STREAM: give the window back now
            return
        if state.remote_ended:
            raise Violation(STREAM_CLOSED, "DATA after END_STREAM")
        if st.headers is None:  # a response's DATA before its HEADERS (a request's stream begins with them)
            raise Violation(PROTOCOL_ERROR, "DATA before HEADERS")
        data = self._unpad(flags, payload)
        end = flags & END_STREAM
        if not data and not end:
            self._flood(DATA)
        if state.expected >= 0:
            state.received += len(data)
            if state.received > state.expected or (end and state.received != state.expected):
                raise Violation(PROTOCOL_ERROR, "body length differs from content-length")
        if data:
            st.chunks.append((data, n))
            st.buffered += len(data)
        elif n:
            self._return_connection(n)  # padding alone: nothing for the consumer to ack
        if end:
            st.ended = state.remote_ended = True
        woken.add(sid)

    def _headers(self, woken: set[int]) -> None:
        block, sid, flags = self._block, self._block_stream, self._block_flags
        assert block is not None  # called once a block's END_HEADERS came
        self._block = None
        try:  # decoded even for a stream we forgot: the HPACK table must stay in step
            headers = self._decoder.decode(bytes(block))
        except hpack.exceptions.OversizedHeaderListError:
            raise Violation(ENHANCE_YOUR_CALM, "header list too large", "oversized-headers") from None
        except (hpack.exceptions.HPACKError, ValueError, IndexError) as exc:
            raise Violation(COMPRESSION_ERROR, f"header block: {exc}") from None
        self._on_headers(sid, flags, headers, woken)

    def _on_headers(self, sid: int, flags: int, headers: Headers, woken: set[int]) -> None:
        raise NotImplementedError

    def _settings(self, flags: int, sid: int, payload: bytes, woken: set[int]) -> None:
        if sid != 0:
            raise Violation(PROTOCOL_ERROR, "SETTINGS on a stream")
        if len(payload) % 6 or (flags & ACK and payload):
            raise Violation(FRAME_SIZE_ERROR, "bad SETTINGS")
        if flags & ACK:
            return
        self._flood(SETTINGS)
        self.preface_received = True
        if not self._settings_seen:
            self._settings_seen = True
            self.peer_max_header_list = None  # RFC 9113: unlimited unless the peer's SETTINGS say otherwise
        for off in range(0, len(payload), 6):
            key, value = SETTING.unpack_from(payload, off)
            if key == SettingCode.HEADER_TABLE_SIZE:
                self._encoder.table_update = True
            elif key == SettingCode.ENABLE_PUSH:
                if value > 1 or (value and self._peer_is_server):
                    raise Violation(PROTOCOL_ERROR, "ENABLE_PUSH neither 0 nor 1, or from a server")
            elif key == SettingCode.MAX_CONCURRENT_STREAMS:
                self.max_streams = value
            elif key == SettingCode.MAX_HEADER_LIST_SIZE:
                self.peer_max_header_list = value
            elif key == SettingCode.INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise Violation(FLOW_CONTROL_ERROR, "initial window too large")
                delta, self.initial_window = value - self.initial_window, value
                for state in self._state.values():
                    state.window += delta
                    if state.window > MAX_WINDOW:
                        raise Violation(FLOW_CONTROL_ERROR, "a stream window beyond 2^31-1")
            elif key == SettingCode.MAX_FRAME_SIZE:
                if not DEFAULT_FRAME_SIZE <= value <= 2**24 - 1:
                    raise Violation(PROTOCOL_ERROR, "bad max frame size")
                self.max_frame_size = value
        self._out += frame(SETTINGS, ACK, 0)
        woken.add(0)

    def ack(self, stream_id: int, nbytes: int) -> None:
        """The consumer dealt with nbytes of this stream: return them to both windows, in
        WINDOW_UPDATEs of at least half a window (or sooner when a window is shut)."""
        if not nbytes or self.closed:
            return
        self._return_connection(nbytes)
        state = self._state.get(stream_id)
        if state is None or state.remote_ended or state.reset:
            return  # nothing more comes on it
        state.processed += nbytes
        if _update_due(state.processed, state.recv_window, STREAM_WINDOW):
            self._out += frame(WINDOW_UPDATE, 0, stream_id, U32.pack(state.processed))
            state.recv_window += state.processed
            state.processed = 0

    def _return_connection(self, nbytes: int) -> None:
        self._processed += nbytes
        if _update_due(self._processed, self.recv_window, CONNECTION_WINDOW):
            self._out += frame(WINDOW_UPDATE, 0, 0, U32.pack(self._processed))
            self.recv_window += self._processed
            self._processed = 0

    # -- outbound ------------------------------------------------------------------------------

    def _header_block(self, sid: int, headers: Headers, end_stream: bool) -> None:
        block = self._encoder.encode(headers)
        size = self.max_frame_size
        first, rest = block[:size], block[size:]
        flags = (END_STREAM if end_stream else 0) | (0 if rest else END_HEADERS)
        self._out += frame(HEADERS, flags, sid, first)
        while rest:
            part, rest = rest[:size], rest[size:]
            self._out += frame(CONTINUATION, 0 if rest else END_HEADERS, sid, part)

    def _sending(self, stream_id: int) -> _Flow:
        """The stream's state, if we may still send on it (else as h2's StreamClosedError: the
        splice resets the pair, a handler ends)."""
        self._check_open()
        state = self._state.get(stream_id)
        if state is None or state.ended or state.reset:
            raise ConnectionClosed("stream closed")
        return state

    def send_data(self, stream_id: int, data: bytes | memoryview, end_stream: bool = False) -> int:
        """As much of data as the windows allow, in frames of the peer's SETTINGS_MAX_FRAME_SIZE;
        returns the count taken (END_STREAM only with the last byte).

        Taking only one frame per call and then waiting for a window event stalls any peer that
        keeps the protocol's 16 KiB frames and sends WINDOW_UPDATE rarely (curl, nghttp2)."""
        state = self._sending(stream_id)
        n = min(self.send_window, state.window, len(data))
        if n <= 0 and data:
            return 0
        size, out = self.max_frame_size, self._out
        for start in range(0, n, size):
            stop = min(start + size, n)
            out += FRAME_HEAD.pack(
                (stop - start) >> 8,
                (stop - start) & 0xFF,
                DATA,
                END_STREAM if end_stream and stop == len(data) else 0,
                stream_id,
            )
            out += bytes(data[start:stop])  # the header and the payload as two pieces: one copy, not two
        if not data:
            out += frame(DATA, END_STREAM if end_stream else 0, stream_id)
        self.send_window -= n
        state.window -= n
        if end_stream and n == len(data):
            state.ended = True
        return n

    def sendable(self, stream_id: int) -> int:
        """Bytes the windows let us send on the stream now (0 once we may send nothing more)."""
        state = self._state.get(stream_id)
        if self.closed or state is None or state.ended or state.reset:
            return 0
        return max(0, min(self.send_window, state.window))

    def end_stream(self, stream_id: int, trailers: Headers | None = None) -> None:
        state = self._sending(stream_id)
        if trailers:
            self._header_block(stream_id, trailers, True)
        else:
            self._out += frame(DATA, END_STREAM, stream_id)
        state.ended = True

    def reset(self, stream_id: int, code: int = CANCEL) -> None:
        """Cancel a stream (the whole request). Idempotent; unread bytes go back to the window."""
        st = self.streams.get(stream_id)
        if st is not None and st.reset_code is None:
            st.reset_code = code
            unread = sum(flow for _, flow in st.chunks)
            st.chunks.clear()
            st.buffered = 0
            if unread and not self.closed:
                self._return_connection(unread)
        state = self._state.get(stream_id)
        if self.closed or state is None or state.reset:
            return
        closed = state.closed  # a stream closed both ways needs no reset
        state.reset = True
        if not closed:
            self._out += frame(RST_STREAM, 0, stream_id, U32.pack(code))

    def forget(self, stream_id: int) -> None:
        st = self.streams.pop(stream_id, None)
        self._state.pop(stream_id, None)
        if st is not None and st.chunks:
            unread = sum(flow for _, flow in st.chunks)
            st.chunks.clear()
            if not self.closed:
                self._return_connection(unread)

    def abort(self, reason: str, code: int = PROTOCOL_ERROR) -> None:
        if not self.closed:
            self._out += frame(GOAWAY, 0, 0, U32.pack(self._last_stream()) + U32.pack(code))
            self._close(reason)

    def ping(self, opaque: bytes = bytes(8)) -> None:
        """A PING for the peer to ACK: whether it is still there (`gateway.transport.keepalive`)."""
        if not self.closed:
            self._out += frame(PING, 0, 0, opaque)

    def close(self, code: int = NO_ERROR) -> None:
        if not self.closed:
            self._out += frame(GOAWAY, 0, 0, U32.pack(self._last_stream()) + U32.pack(code))
            self._close("local-close")

    def _last_stream(self) -> int:
        return 0

    def data_to_send(self, amount: int | None = None) -> bytes:
        return self._out.take(amount)

    @property
    def pending_output(self) -> int:
        return len(self._out)


class LeanClientCore(LeanCore):
    """The client side: opens requests, reads responses."""

    _peer_is_server = True

    def __init__(self, *, max_header_list_size: int = MAX_HEADER_LIST_SIZE) -> None:
        super().__init__(
            max_header_list_size,
            {
                SettingCode.ENABLE_PUSH: 0,
                SettingCode.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
                SettingCode.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                SettingCode.MAX_FRAME_SIZE: MAX_FRAME_SIZE,
                SettingCode.MAX_HEADER_LIST_SIZE: max_header_list_size,
            },
        )
        self._out.prepend(PREFACE)
        self._next_id = 1

    def _idle(self, sid: int) -> bool:
        return sid % 2 == 0 or sid >= self._next_id

    def _on_headers(self, sid: int, flags: int, headers: Headers, woken: set[int]) -> None:
        st = self.streams.get(sid)
        if st is None and self._idle(sid):
            raise Violation(PROTOCOL_ERROR, "HEADERS on a stream we did not open")
        if st is None or st.reset_code is not None:
            return
        state = self._state.get(sid)
        if state is not None and state.remote_ended:
            raise Violation(STREAM_CLOSED, "HEADERS after END_STREAM")
        if st.headers is None:
            status = next((v for k, v in headers if k == b":status"), b"")
            if status.startswith(b"1"):  # informational: the response proper follows
                if flags & END_STREAM:
                    raise Violation(PROTOCOL_ERROR, "an informational response ending the stream")
                return
            st.headers = headers
        elif not flags & END_STREAM:
            raise Violation(PROTOCOL_ERROR, "trailers without END_STREAM")
        else:
            st.trailers = headers
        if flags & END_STREAM:
            st.ended = True
            if state is not None:
                state.remote_ended = True
        woken.add(sid)

    def can_open_stream(self) -> bool:
        return len(self.streams) < self.max_streams

    def send_request(self, headers: Headers, end_stream: bool) -> StreamState:
        self._check_open()
        sid = self._next_id
        self._next_id += 2
        self._header_block(sid, headers, end_stream)
        st = StreamState(sid)
        self.streams[sid] = st
        state = self._state[sid] = _Flow(self.initial_window)
        state.ended = end_stream
        return st

    def send_headers(self, stream_id: int, headers: Headers, end_stream: bool = False) -> None:
        self._check_open()
        raise NotImplementedError("a client core sends requests (send_request), not responses")


class LeanServerCore(LeanCore):
    """The server side: takes requests (in `new_requests`), answers them, and guards itself
    against its peer (`Limits`)."""

    preface_received = False  # until the client's preface and first SETTINGS

    def __init__(self, *, limits: Limits | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        lim = limits or Limits()
        self.max_inbound = lim.max_concurrent_streams
        super().__init__(
            lim.max_header_list_size,
            {
                SettingCode.MAX_CONCURRENT_STREAMS: lim.max_concurrent_streams,
                SettingCode.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                SettingCode.MAX_FRAME_SIZE: MAX_FRAME_SIZE,
                SettingCode.MAX_HEADER_LIST_SIZE: lim.max_header_list_size,
                SettingCode.ENABLE_PUSH: 0,
            },
        )
        self._preface_left = len(PREFACE)
        self._highest_in = 0
        self.clock = clock
        self.floods: dict[int, tuple[Flood, str]] = {}
        if limits is not None:
            w = limits.flood_window
            ping = Flood(limits.max_pings, w)
            self.floods = {
                RST_STREAM: (Flood(limits.max_resets, w), "rapid-reset"),
                PING: (ping, "ping-flood"),
                SETTINGS: (Flood(limits.max_settings, w), "settings-flood"),
                DATA: (Flood(limits.max_empty_data, w), "empty-data-flood"),
            }

    def _flood(self, kind: int) -> None:
        flood = self.floods.get(kind)
        if flood is not None and flood[0].over(self.clock()):
            raise Violation(ENHANCE_YOUR_CALM, flood[1], flood[1])

    def _idle(self, sid: int) -> bool:
        return sid % 2 == 0 or sid > self._highest_in

    def _last_stream(self) -> int:
        return self._highest_in

    def _on_headers(self, sid: int, flags: int, headers: Headers, woken: set[int]) -> None:
        end = bool(flags & END_STREAM)
        state = self._state.get(sid)
        if state is None:
            if sid % 2 == 0:
                raise Violation(PROTOCOL_ERROR, "a client opened an even stream")
            if sid <= self._highest_in:
                return  # a stream we are done with (trailers that crossed our reset)
            self._highest_in = sid
            expected = request_fields(headers)
            if end and expected > 0:
                raise Violation(PROTOCOL_ERROR, "content-length without a body")
            if (
                len(self._state) >= self.max_inbound
                and sum(not s.closed for s in self._state.values()) >= self.max_inbound
            ):
                raise Violation(REFUSED_STREAM, "beyond SETTINGS_MAX_CONCURRENT_STREAMS", "too-many-streams")
            state = self._state[sid] = _Flow(self.initial_window)
            state.expected, state.remote_ended = expected, end
            st = self.streams[sid] = StreamState(sid, headers=headers, ended=end)
            self.new_requests.append(st)
            woken.add(sid)
            return
        known = self.streams.get(sid)
        if known is None or known.reset_code is not None or state.reset:
            return  # trailers that crossed our reset
        if state.remote_ended:
            raise Violation(STREAM_CLOSED, "HEADERS after END_STREAM")
        if not end:
            raise Violation(PROTOCOL_ERROR, "trailers without END_STREAM")
        for name, value in headers:
            if name[:1] == b":":
                raise Violation(PROTOCOL_ERROR, "a pseudo-header in trailers")
            check_field(name, value)
        if state.expected >= 0 and state.received != state.expected:
            raise Violation(PROTOCOL_ERROR, "body length differs from content-length")
        known.trailers = headers
        known.ended = state.remote_ended = True
        woken.add(sid)

    def can_open_stream(self) -> bool:
        return False  # a server opens no streams (push is off)

    def send_request(self, headers: Headers, end_stream: bool) -> StreamState:
        self._check_open()
        raise NotImplementedError("a server core answers requests (send_headers), it opens none")

    def send_headers(self, stream_id: int, headers: Headers, end_stream: bool = False) -> None:
        """The response's HEADERS (or trailers, with end_stream)."""
        state = self._sending(stream_id)
        self._header_block(stream_id, headers, end_stream)
        if end_stream:
            state.ended = True


def _check_dependency(sid: int, priority: bytes) -> None:
    """Priorities are ignored, but a stream depending on itself is still an error (RFC 9113 §5.3.1)."""
    if U32.unpack_from(priority)[0] & 0x7FFFFFFF == sid:
        raise Violation(PROTOCOL_ERROR, "a stream depending on itself")
