"""A lean HTTP/2 client core for every client connection konbini opens: frames by hand, HPACK by hpack.

Theory of operation. A client connection (a relay's upstream, the center's links to OCSP and the
municipalities, a kiosk, the load generator) only ever opens requests, sends bodies and reads
responses, to a peer authenticated by certificate. On a relay, h2's general state machine did
that at about half of the relay's h2 cost (events built per frame, every stream's state machine, header validation layers). This
core speaks the same interface as `H2Core(client_side=True)` (what `Splice` and `TrioH2` call) and
does the client's part of RFC 9113 itself: the preface and SETTINGS, PING and SETTINGS acks,
both directions' flow control (our windows returned as the consumer acks, as h2's WindowManager
does: once half a window was consumed, or sooner when it is shut), HEADERS/CONTINUATION in and
out through hpack's Encoder and Decoder, RST_STREAM and GOAWAY. What it does not do: server push
(refused in our SETTINGS; a PUSH_PROMISE is a protocol error), priorities (ignored).

Anything malformed from the peer (a frame over our SETTINGS_MAX_FRAME_SIZE, a bad SETTINGS
value, a header block that does not decode, data beyond a window) closes the connection with
GOAWAY(PROTOCOL_ERROR or FLOW_CONTROL_ERROR) and raises ConnectionClosed, as H2Core does; a relay
then resets every request crossing it (INT-1).
"""

from __future__ import annotations

import os
import struct
from collections import deque

import hpack
import hpack.exceptions

from gateway.protocol.h2core import (
    CONNECTION_WINDOW,
    MAX_CONCURRENT_STREAMS,
    MAX_FRAME_SIZE,
    MAX_HEADER_LIST_SIZE,
    STREAM_WINDOW,
    ConnectionClosed,
    CoreBase,
    H2Core,
    Headers,
    StreamState,
)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
NO_ERROR, PROTOCOL_ERROR, FLOW_CONTROL_ERROR, FRAME_SIZE_ERROR, CANCEL = 0x0, 0x1, 0x3, 0x6, 0x8
S_HEADER_TABLE_SIZE, S_ENABLE_PUSH, S_MAX_CONCURRENT_STREAMS, S_INITIAL_WINDOW_SIZE, S_MAX_FRAME_SIZE, S_MAX_HEADER_LIST_SIZE = range(1, 7)
MAX_WINDOW = 2**31 - 1
MAX_HEADER_BLOCK = 2 * MAX_HEADER_LIST_SIZE + 4096  # compressed, CONTINUATIONs included (as H2Core)

_head = struct.Struct(">HBBBL")  # a frame header: 24-bit length as (16, 8), type, flags, stream id
_u32 = struct.Struct(">L")
_setting = struct.Struct(">HL")


def frame(kind: int, flags: int, stream_id: int, payload: bytes | memoryview = b"") -> bytes:
    n = len(payload)
    return _head.pack(n >> 8, n & 0xFF, kind, flags, stream_id) + bytes(payload)


class _Out:
    """Our state of one stream: its send window, whether we ended or reset it, and its receive
    window with the bytes acked since our last WINDOW_UPDATE for it."""

    __slots__ = ("window", "ended", "reset", "recv_window", "processed")

    def __init__(self, window: int) -> None:
        self.window = window
        self.ended = False
        self.reset = False
        self.recv_window = STREAM_WINDOW  # what the peer may still send on it
        self.processed = 0  # bytes acked since the last WINDOW_UPDATE


class _Violation(Exception):
    def __init__(self, code: int, what: str) -> None:
        super().__init__(what)
        self.code = code


class LeanClientCore(CoreBase):
    """`H2Core(client_side=True)`'s interface, without h2."""

    preface_received = True  # a client has nothing to wait for before it may send

    def __init__(self, *, max_header_list_size: int = MAX_HEADER_LIST_SIZE) -> None:
        self.streams: dict[int, StreamState] = {}
        self.new_requests: deque[StreamState] = deque()  # always empty: a client takes no requests
        self.closed = False
        self.close_reason: str | None = None
        self._out = bytearray()
        self._in = b""  # the start of a frame not yet whole
        self._state: dict[int, _Out] = {}
        self._next_id = 1
        self._encoder = hpack.Encoder()
        self._decoder = hpack.Decoder(max_header_list_size=max_header_list_size)
        self._block: bytearray | None = None  # a header block waiting for its CONTINUATIONs
        self._block_stream = 0
        self._block_flags = 0
        # the peer's settings, as RFC 9113 has them until its SETTINGS arrive
        self.max_frame_size = 16384
        self.initial_window = 65535
        self.max_streams = MAX_CONCURRENT_STREAMS
        self.send_window = 65535  # connection level
        self.recv_window = CONNECTION_WINDOW
        self._processed = 0  # connection-level bytes acked since the last WINDOW_UPDATE
        settings = b"".join(_setting.pack(k, v) for k, v in (
            (S_ENABLE_PUSH, 0), (S_MAX_CONCURRENT_STREAMS, MAX_CONCURRENT_STREAMS),
            (S_INITIAL_WINDOW_SIZE, STREAM_WINDOW), (S_MAX_FRAME_SIZE, MAX_FRAME_SIZE),
            (S_MAX_HEADER_LIST_SIZE, max_header_list_size),
        ))
        self._out += PREFACE
        self._out += frame(SETTINGS, 0, 0, settings)
        self._out += frame(WINDOW_UPDATE, 0, 0, _u32.pack(CONNECTION_WINDOW - 65535))

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
        # Frames are read from the bytes as they came; only a frame cut short is kept, in a
        # buffer of its own size (a bytearray reused across reads would keep the capacity of the
        # largest read, 256 KiB, on every idle upstream connection of a relay).
        buf = self._in + data if self._in else data
        woken: set[int] = set()
        pos, end = 0, len(buf)
        try:
            with memoryview(buf) as view:
                while end - pos >= 9:
                    hi, lo, kind, flags, sid = _head.unpack_from(buf, pos)
                    length = (hi << 8) | lo
                    if length > MAX_FRAME_SIZE:
                        raise _Violation(FRAME_SIZE_ERROR, f"frame of {length} bytes")
                    if end - pos - 9 < length:
                        break
                    payload = view[pos + 9 : pos + 9 + length].tobytes()  # one copy; no view outlives the loop
                    pos += 9 + length
                    self._frame(kind, flags, sid & 0x7FFFFFFF, payload, woken)
                    if self.closed:  # GOAWAY
                        break
        except _Violation as exc:
            self.abort("protocol-error", exc.code)
            raise ConnectionClosed("protocol-error") from exc
        self._in = bytes(buf[pos:]) if pos < end else b""
        return woken

    def _frame(self, kind: int, flags: int, sid: int, payload: bytes, woken: set[int]) -> None:
        if self._block is not None and kind != CONTINUATION:
            raise _Violation(PROTOCOL_ERROR, "a header block interrupted")
        if kind == DATA:
            self._data(flags, sid, payload, woken)
        elif kind == HEADERS:
            if sid == 0:
                raise _Violation(PROTOCOL_ERROR, "HEADERS on stream 0")
            block = self._unpad(flags, payload)
            if flags & PRIORITY_FLAG:
                block = block[5:]
            self._block, self._block_stream, self._block_flags = bytearray(block), sid, flags
            if flags & END_HEADERS:
                self._headers(woken)
        elif kind == CONTINUATION:
            if self._block is None or sid != self._block_stream:
                raise _Violation(PROTOCOL_ERROR, "CONTINUATION without its HEADERS")
            self._block += payload
            if len(self._block) > MAX_HEADER_BLOCK:
                raise _Violation(PROTOCOL_ERROR, "header block too large")
            if flags & END_HEADERS:
                self._headers(woken)
        elif kind == RST_STREAM:
            if len(payload) != 4 or sid == 0:
                raise _Violation(FRAME_SIZE_ERROR if len(payload) != 4 else PROTOCOL_ERROR, "bad RST_STREAM")
            st = self.streams.get(sid)
            if st is not None and st.reset_code is None:
                st.reset_code = _u32.unpack(payload)[0]
                woken.add(sid)
            state = self._state.get(sid)
            if state is not None:
                state.reset = True  # nothing more goes out on it
        elif kind == SETTINGS:
            self._settings(flags, sid, payload, woken)
        elif kind == PING:
            if len(payload) != 8 or sid != 0:
                raise _Violation(FRAME_SIZE_ERROR, "bad PING")
            if not flags & ACK:
                self._out += frame(PING, ACK, 0, payload)
        elif kind == GOAWAY:
            self._close("goaway")
            woken.update(self.streams)
            woken.add(0)
        elif kind == WINDOW_UPDATE:
            if len(payload) != 4:
                raise _Violation(FRAME_SIZE_ERROR, "bad WINDOW_UPDATE")
            inc = _u32.unpack(payload)[0] & 0x7FFFFFFF
            if sid == 0:
                if inc == 0 or self.send_window + inc > MAX_WINDOW:
                    raise _Violation(PROTOCOL_ERROR if inc == 0 else FLOW_CONTROL_ERROR, "bad connection WINDOW_UPDATE")
                self.send_window += inc
                woken.add(0)
            else:
                state = self._state.get(sid)
                if state is not None:
                    state.window += inc
                    woken.add(sid)
        elif kind == PUSH_PROMISE:
            raise _Violation(PROTOCOL_ERROR, "PUSH_PROMISE (push is off)")
        # PRIORITY and unknown frame types are ignored (RFC 9113 §5.5)

    @staticmethod
    def _unpad(flags: int, payload: bytes) -> bytes:
        if not flags & PADDED:
            return payload
        if not payload or payload[0] >= len(payload):
            raise _Violation(PROTOCOL_ERROR, "padding longer than the frame")
        return payload[1 : len(payload) - payload[0]]

    def _data(self, flags: int, sid: int, payload: bytes, woken: set[int]) -> None:
        n = len(payload)
        if n > self.recv_window:
            raise _Violation(FLOW_CONTROL_ERROR, "DATA beyond the connection window")
        self.recv_window -= n
        st, state = self.streams.get(sid), self._state.get(sid)
        if state is not None:
            if n > state.recv_window:
                raise _Violation(FLOW_CONTROL_ERROR, "DATA beyond the stream window")
            state.recv_window -= n
        if st is None or st.reset_code is not None:
            self._return_connection(n)  # nobody will read it: give the window back now
            return
        data = self._unpad(flags, payload)
        st.chunks.append((data, n))
        st.buffered += len(data)
        if flags & END_STREAM:
            st.ended = True
        woken.add(sid)

    def _headers(self, woken: set[int]) -> None:
        block, sid, flags = self._block, self._block_stream, self._block_flags
        self._block = None
        try:  # decoded even for a stream we forgot: the HPACK table must stay in step
            headers = self._decoder.decode(bytes(block), raw=True)
        except (hpack.exceptions.HPACKError, ValueError, IndexError) as exc:
            raise _Violation(PROTOCOL_ERROR, f"header block: {exc}") from None
        st = self.streams.get(sid)
        if st is None or st.reset_code is not None:
            return
        if st.headers is None:
            status = next((v for k, v in headers if k == b":status"), b"")
            if status.startswith(b"1"):  # informational: the response proper follows
                return
            st.headers = headers
        else:
            st.trailers = headers
        if flags & END_STREAM:
            st.ended = True
        woken.add(sid)

    def _settings(self, flags: int, sid: int, payload: bytes, woken: set[int]) -> None:
        if sid != 0 or len(payload) % 6 or (flags & ACK and payload):
            raise _Violation(FRAME_SIZE_ERROR, "bad SETTINGS")
        if flags & ACK:
            return
        for off in range(0, len(payload), 6):
            key, value = _setting.unpack_from(payload, off)
            if key == S_HEADER_TABLE_SIZE:
                self._encoder.header_table_size = value
            elif key == S_MAX_CONCURRENT_STREAMS:
                self.max_streams = value
            elif key == S_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise _Violation(FLOW_CONTROL_ERROR, "initial window too large")
                delta, self.initial_window = value - self.initial_window, value
                for state in self._state.values():
                    state.window += delta
            elif key == S_MAX_FRAME_SIZE:
                if not 16384 <= value <= 2**24 - 1:
                    raise _Violation(PROTOCOL_ERROR, "bad max frame size")
                self.max_frame_size = value
        self._out += frame(SETTINGS, ACK, 0)
        woken.add(0)

    def ack(self, stream_id: int, nbytes: int) -> None:
        """The consumer dealt with nbytes of this stream: return them to both windows, in
        WINDOW_UPDATEs of at least half a window (or sooner when a window is shut)."""
        if not nbytes or self.closed:
            return
        self._return_connection(nbytes)
        state, st = self._state.get(stream_id), self.streams.get(stream_id)
        if state is None or st is None or st.ended or st.reset_code is not None:
            return  # nothing more comes on it
        state.processed += nbytes
        if state.processed >= STREAM_WINDOW // 2 or (state.recv_window == 0 and state.processed >= 1024):
            self._out += frame(WINDOW_UPDATE, 0, stream_id, _u32.pack(state.processed))
            state.recv_window += state.processed
            state.processed = 0

    def _return_connection(self, nbytes: int) -> None:
        self._processed += nbytes
        if self._processed >= CONNECTION_WINDOW // 2 or (self.recv_window == 0 and self._processed >= 1024):
            self._out += frame(WINDOW_UPDATE, 0, 0, _u32.pack(self._processed))
            self.recv_window += self._processed
            self._processed = 0

    # -- outbound ------------------------------------------------------------------------------

    def can_open_stream(self) -> bool:
        return len(self.streams) < self.max_streams

    def send_request(self, headers: Headers, end_stream: bool) -> StreamState:
        self._check_open()
        sid = self._next_id
        self._next_id += 2
        self._header_block(sid, headers, end_stream)
        st = StreamState(sid)
        self.streams[sid] = st
        state = self._state[sid] = _Out(self.initial_window)
        state.ended = end_stream
        return st

    def _header_block(self, sid: int, headers: Headers, end_stream: bool) -> None:
        block = self._encoder.encode(headers, huffman=False)
        size = self.max_frame_size
        first, rest = block[:size], block[size:]
        flags = (END_STREAM if end_stream else 0) | (0 if rest else END_HEADERS)
        self._out += frame(HEADERS, flags, sid, first)
        while rest:
            part, rest = rest[:size], rest[size:]
            self._out += frame(CONTINUATION, 0 if rest else END_HEADERS, sid, part)

    def send_headers(self, stream_id: int, headers: Headers, end_stream: bool = False) -> None:
        raise NotImplementedError("a client core sends requests (send_request), not responses")

    def send_data(self, stream_id: int, data: bytes | memoryview, end_stream: bool = False) -> int:
        """As much of data as the windows allow, in frames of the peer's SETTINGS_MAX_FRAME_SIZE;
        returns the count taken (END_STREAM only with the last byte)."""
        self._check_open()
        state = self._state.get(stream_id)
        if state is None or state.ended or state.reset:
            raise ConnectionClosed("stream closed")  # as h2's StreamClosedError: the splice resets the pair
        n = min(self.send_window, state.window, len(data))
        if n <= 0 and data:
            return 0
        size, out = self.max_frame_size, self._out
        for start in range(0, n, size):
            stop = min(start + size, n)
            out += frame(DATA, END_STREAM if end_stream and stop == len(data) else 0, stream_id, data[start:stop])
        if not data:
            out += frame(DATA, END_STREAM if end_stream else 0, stream_id)
        self.send_window -= n
        state.window -= n
        if end_stream and n == len(data):
            state.ended = True
        return n

    def end_stream(self, stream_id: int, trailers: Headers | None = None) -> None:
        self._check_open()
        state = self._state.get(stream_id)
        if state is None or state.ended or state.reset:
            raise ConnectionClosed("stream closed")
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
        state.reset = True
        if not (state.ended and st is not None and st.ended):  # a stream closed both ways needs no reset
            self._out += frame(RST_STREAM, 0, stream_id, _u32.pack(code))

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
            self._out += frame(GOAWAY, 0, 0, _u32.pack(0) + _u32.pack(code))
            self._close(reason)

    def close(self, code: int = NO_ERROR) -> None:
        if not self.closed:
            self._out += frame(GOAWAY, 0, 0, _u32.pack(0) + _u32.pack(code))
            self._close("local-close")

    def data_to_send(self, amount: int | None = None) -> bytes:
        out = self._out
        if amount is None or amount >= len(out):
            data = bytes(out)
            out.clear()
            return data
        data = bytes(out[:amount])
        del out[:amount]
        return data

    @property
    def pending_output(self) -> int:
        return len(self._out)


# Every client connection konbini opens (relays' upstreams, the center's links to OCSP and the
# municipalities, kiosks, the load generator) uses the lean core; KONBINI_CLIENT_CORE=h2 goes
# back to h2's for a before/after in back-to-back runs.
LEAN_CLIENTS = os.environ.get("KONBINI_CLIENT_CORE", "lean") != "h2"


def client_core() -> LeanClientCore | H2Core:
    return LeanClientCore() if LEAN_CLIENTS else H2Core(client_side=True)
