"""Lean HTTP/2 cores for konbini's connections, both ends: frames by hand, HPACK by hpack.

Theory of operation. h2's general state machine builds an event object per frame, walks every
stream's state machine and validates headers in layers of generators; on a relay that was most
of a hop's CPU. konbini's connections need far less of it: a client connection only opens
requests, sends bodies and reads responses; a server connection only takes requests and answers
them. These cores speak `H2Core`'s interface (what `Splice`, `TrioH2` and the load generator
call) and do those parts of RFC 9113 themselves:

- the preface and SETTINGS, PING and SETTINGS acks;
- both directions' flow control: our windows are returned as the consumer acks, as h2's
  WindowManager does (once half a window was consumed, or sooner when it is shut), and DATA
  beyond a window is a FLOW_CONTROL_ERROR;
- HEADERS/CONTINUATION in and out through hpack's Encoder and Decoder, RST_STREAM, GOAWAY.

The server core also guards itself, as h2 with `validate_inbound_headers` did and more cheaply:
the client preface and a SETTINGS first, client stream ids odd and rising, request header fields
(characters, pseudo-headers, connection-specific fields, :authority/Host, content-length
against the body), SETTINGS_MAX_CONCURRENT_STREAMS, decoded header lists bounded while decoding
(an HPACK bomb stops at the limit), header blocks bounded in bytes and frames (CONTINUATION
flood), and per-connection counters of what costs us work and the peer nothing (RST_STREAM,
PING, SETTINGS, empty DATA; `Limits`).

Anything malformed (a frame over our SETTINGS_MAX_FRAME_SIZE, a bad SETTINGS value, a header
block that does not decode, a frame on a stream that was never opened, data beyond a window)
closes the connection with GOAWAY and raises ConnectionClosed, as H2Core does; a relay then
resets every request crossing it (INT-1). Not done: server push (refused; a PUSH_PROMISE is a
protocol error), priorities (ignored).
"""

from __future__ import annotations

import os
import re
import struct
import time
from collections import deque
from collections.abc import Callable

import hpack
import hpack.exceptions
import hpack.table
from hpack.huffman_table import decode_huffman

from gateway.protocol.h2core import (
    CONNECTION_WINDOW,
    MAX_CONCURRENT_STREAMS,
    MAX_FRAME_SIZE,
    MAX_HEADER_LIST_SIZE,
    STREAM_WINDOW,
    ConnectionClosed,
    CoreBase,
    Flood,
    H2Core,
    Headers,
    StreamState,
)
from topology.spec.model import Limits

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
NO_ERROR, PROTOCOL_ERROR, FLOW_CONTROL_ERROR, STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL = (
    0x0,
    0x1,
    0x3,
    0x5,
    0x6,
    0x7,
    0x8,
)
COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 0x9, 0xB
(
    S_HEADER_TABLE_SIZE,
    S_ENABLE_PUSH,
    S_MAX_CONCURRENT_STREAMS,
    S_INITIAL_WINDOW_SIZE,
    S_MAX_FRAME_SIZE,
    S_MAX_HEADER_LIST_SIZE,
) = range(1, 7)
MAX_WINDOW = 2**31 - 1
MAX_HEADER_BLOCK = 2 * MAX_HEADER_LIST_SIZE + 4096  # compressed, CONTINUATIONs included (as H2Core)
MAX_CONTINUATIONS = 64  # frames in one header block (h2's CONTINUATION_BACKLOG)

_head = struct.Struct(">HBBBL")  # a frame header: 24-bit length as (16, 8), type, flags, stream id
_u32 = struct.Struct(">L")
_setting = struct.Struct(">HL")

# RFC 9113 §8.2.1: a name is visible ASCII without uppercase or ':' (bar a pseudo-header's
# first); a value has no NUL, CR or LF and no whitespace at either end.
_NAME = re.compile(rb":?[!-9;-@\[-~]+\Z")
_BAD_VALUE = re.compile(rb"[\x00\r\n]|\A[ \t]|[ \t]\Z")
_CONNECTION_FIELDS = frozenset({b"connection", b"proxy-connection", b"keep-alive", b"transfer-encoding", b"upgrade"})
_REQUEST_PSEUDO = frozenset({b":method", b":scheme", b":authority", b":path", b":protocol"})


def frame(kind: int, flags: int, stream_id: int, payload: bytes | memoryview = b"") -> bytes:
    n = len(payload)
    return _head.pack(n >> 8, n & 0xFF, kind, flags, stream_id) + bytes(payload)


def _integer(value: int, prefix_bits: int, first: int) -> bytes:
    """An HPACK integer (RFC 7541 §5.1) in a field's first byte's low `prefix_bits` and on."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 127) | 128)
        value >>= 7
    out.append(value)
    return bytes(out)


_STATIC_FIELDS: dict[tuple[bytes, bytes], int] = {}
_STATIC_NAMES: dict[bytes, int] = {}
for _i, _field in enumerate(hpack.table.HeaderTable.STATIC_TABLE, 1):
    _STATIC_FIELDS.setdefault(_field, _i)
    _STATIC_NAMES.setdefault(_field[0], _i)
_NEVER_INDEXED = frozenset({b"authorization", b"proxy-authorization", b"cookie"})


def _encode_field(name: bytes, value: bytes) -> bytes:
    index = _STATIC_FIELDS.get((name, value))
    if index is not None:
        return _integer(index, 7, 0x80)  # indexed, from the static table
    name_index = _STATIC_NAMES.get(name, 0)  # literal without (or never) indexing, RFC 7541 §6.2.2-3
    out = _integer(name_index, 4, 0x10 if name in _NEVER_INDEXED else 0x00)
    if not name_index:
        out += _integer(len(name), 7, 0) + name
    return out + _integer(len(value), 7, 0) + value


class FieldEncoder:
    """HPACK with the static table only: every field is a fully indexed static entry or a literal
    that is never added to the dynamic table, without Huffman coding.

    So a field always encodes to the same bytes, whatever went before on the connection, and
    the bytes are cached process-wide: encoding a header list is a dict lookup per field.
    hpack's Encoder searched its dynamic table field by field in Python, a tenth of a relay's CPU
    (py-spy, relay-small); between hops on one machine, the bytes the dynamic table and Huffman
    would save cost more CPU than they save. A peer that changes SETTINGS_HEADER_TABLE_SIZE is
    sent a dynamic table size update to 0 at the start of the next block (RFC 7541 §4.2):
    our table is empty whatever its limit."""

    CACHE = 4096  # fields remembered (their bytes); the cache starts over when full

    _cache: dict[tuple[bytes, bytes], bytes] = {}

    def __init__(self) -> None:
        self.table_update = False

    def encode(self, headers: Headers) -> bytes:
        cache = FieldEncoder._cache
        parts = [b"\x20"] if self.table_update else []
        self.table_update = False
        for field in headers:
            encoded = cache.get(field)
            if encoded is None:
                encoded = _encode_field(field[0], field[1])
                if len(cache) >= self.CACHE:
                    cache.clear()
                cache[field] = encoded
            parts.append(encoded)
        return b"".join(parts)


class FieldDecoder:
    """HPACK decoding (RFC 7541) with the dynamic table, Huffman strings through hpack's decoder,
    and the header list bounded while decoding: a block that inflates past `max_header_list_size`
    (an HPACK bomb) stops there with OversizedHeaderListError. hpack's Decoder built a tuple
    subclass per field and checked each through several layers; this is one loop."""

    def __init__(self, max_header_list_size: int, max_table_size: int = 4096) -> None:
        self.limit = max_header_list_size
        self.max_allowed = max_table_size  # our SETTINGS_HEADER_TABLE_SIZE (the protocol's default)
        self.max_size = max_table_size
        self.size = 0
        self.table: deque[tuple[bytes, bytes]] = deque()  # newest first: index 62 is table[0]

    def _field(self, index: int) -> tuple[bytes, bytes]:
        if 0 < index <= _STATIC_COUNT:
            return _STATIC_TABLE[index - 1]
        if _STATIC_COUNT < index <= _STATIC_COUNT + len(self.table):
            return self.table[index - _STATIC_COUNT - 1]
        raise hpack.exceptions.InvalidTableIndexError(f"index {index}")

    def _add(self, name: bytes, value: bytes) -> None:
        size = len(name) + len(value) + 32
        self._evict(self.max_size - size)
        if size <= self.max_size:
            self.table.appendleft((name, value))
            self.size += size

    def _evict(self, room: int) -> None:
        table = self.table
        while self.size > room and table:
            name, value = table.pop()
            self.size -= len(name) + len(value) + 32

    def decode(self, data: bytes) -> Headers:
        headers: Headers = []
        pos, end, inflated = 0, len(data), 0
        while pos < end:
            first = data[pos]
            if first & 0x80:  # indexed
                index, pos = _read_integer(data, pos, 7)
                field = self._field(index)
            elif first & 0x20 and not first & 0x40:  # dynamic table size update: only before the first field
                size, pos = _read_integer(data, pos, 5)
                if headers or size > self.max_allowed:
                    raise hpack.exceptions.InvalidTableSizeError(f"table size update to {size}")
                self.max_size = size
                self._evict(size)
                continue
            else:  # a literal: with incremental indexing (01), without (0000) or never indexed (0001)
                indexing = first & 0x40
                index, pos = _read_integer(data, pos, 6 if indexing else 4)
                if index:
                    name = self._field(index)[0]
                else:
                    name, pos = _read_string(data, pos)
                value, pos = _read_string(data, pos)
                field = (name, value)
                if indexing:
                    self._add(name, value)
            inflated += len(field[0]) + len(field[1]) + 32
            if inflated > self.limit:
                raise hpack.exceptions.OversizedHeaderListError(f"header list beyond {self.limit} bytes")
            headers.append(field)
        return headers


_STATIC_TABLE = hpack.table.HeaderTable.STATIC_TABLE
_STATIC_COUNT = len(_STATIC_TABLE)


def _read_integer(data: bytes, pos: int, prefix_bits: int) -> tuple[int, int]:
    limit = (1 << prefix_bits) - 1
    value = data[pos] & limit
    pos += 1
    if value < limit:
        return value, pos
    shift = 0
    while True:
        if pos >= len(data) or shift > 28:
            raise hpack.exceptions.HPACKDecodingError("integer cut short or too large")
        byte = data[pos]
        pos += 1
        value += (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _read_string(data: bytes, pos: int) -> tuple[bytes, int]:
    if pos >= len(data):
        raise hpack.exceptions.HPACKDecodingError("string cut short")
    huffman = data[pos] & 0x80
    length, pos = _read_integer(data, pos, 7)
    stop = pos + length
    if stop > len(data):
        raise hpack.exceptions.HPACKDecodingError("string cut short")
    raw = data[pos:stop]
    return (decode_huffman(raw) if huffman else raw), stop


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


class _Stream:
    """The protocol's state of one stream: our send window, whether each side ended it or it was
    reset, our receive window with the bytes acked since our last WINDOW_UPDATE for it, and the
    request body's declared and received length (server side)."""

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


class _Violation(Exception):
    def __init__(self, code: int, what: str, reason: str = "protocol-error") -> None:
        super().__init__(what)
        self.code = code
        self.reason = reason


class LeanCore(CoreBase):
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
        self._state: dict[int, _Stream] = {}
        self._encoder = FieldEncoder()
        self._decoder = FieldDecoder(max_header_list_size)
        self._block: bytearray | None = None  # a header block waiting for its CONTINUATIONs
        self._block_stream = 0
        self._block_flags = 0
        self._block_frames = 0
        # the peer's settings, as RFC 9113 has them until its SETTINGS arrive
        self.max_frame_size = 16384
        self.initial_window = 65535
        self.max_streams = MAX_CONCURRENT_STREAMS  # streams we may open (client)
        # the header list the peer takes: what we take ourselves until its SETTINGS say (no value: no limit)
        self.peer_max_header_list: int | None = max_header_list_size
        self.send_window = 65535  # connection level
        self.recv_window = CONNECTION_WINDOW
        self._processed = 0  # connection-level bytes acked since the last WINDOW_UPDATE
        self._out += frame(SETTINGS, 0, 0, b"".join(_setting.pack(k, v) for k, v in settings.items()))
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
                    hi, lo, kind, flags, sid = _head.unpack_from(buf, pos)
                    length = (hi << 8) | lo
                    if length > MAX_FRAME_SIZE:
                        raise _Violation(FRAME_SIZE_ERROR, f"frame of {length} bytes")
                    if end - pos - 9 < length:
                        break
                    payload = view[pos + 9 : pos + 9 + length].tobytes()  # one copy; no view outlives the loop
                    pos += 9 + length
                    self._frame(kind, flags, sid & 0x7FFFFFFF, payload, woken)
                    if self._block is None:
                        self.units_received += 1
                    if self.closed:  # GOAWAY
                        break
        except _Violation as exc:
            self.abort(exc.reason, exc.code)
            raise ConnectionClosed(exc.reason) from exc
        self._in = bytes(buf[pos:]) if pos < end else b""
        return woken

    def _preface(self, data: bytes) -> bytes:
        """Check the client preface as it arrives; what follows it."""
        done = len(PREFACE) - self._preface_left
        n = min(len(data), self._preface_left)
        if data[:n] != PREFACE[done : done + n]:
            raise _Violation(PROTOCOL_ERROR, "not the HTTP/2 client preface")
        self._preface_left -= n
        return data[n:]

    def _frame(self, kind: int, flags: int, sid: int, payload: bytes, woken: set[int]) -> None:
        if self._block is not None and kind != CONTINUATION:
            raise _Violation(PROTOCOL_ERROR, "a header block interrupted")
        if not self.preface_received and kind != SETTINGS:
            raise _Violation(PROTOCOL_ERROR, "the first frame is not SETTINGS")
        if kind == DATA:
            self._data(flags, sid, payload, woken)
        elif kind == HEADERS:
            if sid == 0:
                raise _Violation(PROTOCOL_ERROR, "HEADERS on stream 0")
            block = self._unpad(flags, payload)
            if flags & PRIORITY_FLAG:
                if len(block) < 5:
                    raise _Violation(FRAME_SIZE_ERROR, "HEADERS too short for its priority")
                _check_dependency(sid, block)
                block = block[5:]
            self._block, self._block_stream, self._block_flags, self._block_frames = bytearray(block), sid, flags, 0
            if flags & END_HEADERS:
                self._headers(woken)
        elif kind == CONTINUATION:
            if self._block is None or sid != self._block_stream:
                raise _Violation(PROTOCOL_ERROR, "CONTINUATION without its HEADERS")
            self._block += payload
            self._block_frames += 1
            if flags & END_HEADERS:  # decoding stops at the header list limit, whatever the block's size
                self._headers(woken)
            elif len(self._block) > MAX_HEADER_BLOCK or self._block_frames > MAX_CONTINUATIONS:
                raise _Violation(ENHANCE_YOUR_CALM, "a header block that does not end", "continuation-flood")
        elif kind == RST_STREAM:
            if len(payload) != 4:
                raise _Violation(FRAME_SIZE_ERROR, "bad RST_STREAM")
            if sid == 0 or self._idle(sid):
                raise _Violation(PROTOCOL_ERROR, "RST_STREAM on an idle stream")
            self._flood(RST_STREAM)
            st = self.streams.get(sid)
            if st is not None and st.reset_code is None and not (st.ended and self._done_sending(sid)):
                st.reset_code = _u32.unpack(payload)[0]
                woken.add(sid)
            state = self._state.get(sid)
            if state is not None:
                state.reset = True  # nothing more goes out on it
        elif kind == SETTINGS:
            self._settings(flags, sid, payload, woken)
        elif kind == PING:
            if len(payload) != 8 or sid != 0:
                raise _Violation(FRAME_SIZE_ERROR if len(payload) != 8 else PROTOCOL_ERROR, "bad PING")
            self._flood(PING)
            if not flags & ACK:
                self._out += frame(PING, ACK, 0, payload)
        elif kind == GOAWAY:
            if len(payload) < 8 or sid != 0:
                raise _Violation(FRAME_SIZE_ERROR if len(payload) < 8 else PROTOCOL_ERROR, "bad GOAWAY")
            self._close("goaway")
            woken.update(self.streams)
            woken.add(0)
        elif kind == WINDOW_UPDATE:
            self._window_update(sid, payload, woken)
        elif kind == PUSH_PROMISE:
            raise _Violation(PROTOCOL_ERROR, "PUSH_PROMISE (push is off)")
        elif kind == PRIORITY:  # ignored, once it is well-formed
            if len(payload) != 5 or sid == 0:
                raise _Violation(FRAME_SIZE_ERROR if len(payload) != 5 else PROTOCOL_ERROR, "bad PRIORITY")
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
            raise _Violation(PROTOCOL_ERROR, "padding longer than the frame")
        return payload[1 : len(payload) - payload[0]]

    def _window_update(self, sid: int, payload: bytes, woken: set[int]) -> None:
        if len(payload) != 4:
            raise _Violation(FRAME_SIZE_ERROR, "bad WINDOW_UPDATE")
        inc = _u32.unpack(payload)[0] & 0x7FFFFFFF
        if inc == 0:
            raise _Violation(PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
        if sid == 0:
            if self.send_window + inc > MAX_WINDOW:
                raise _Violation(FLOW_CONTROL_ERROR, "connection window beyond 2^31-1")
            self.send_window += inc
            woken.add(0)
            return
        state = self._state.get(sid)
        if state is None:
            if self._idle(sid):
                raise _Violation(PROTOCOL_ERROR, "WINDOW_UPDATE on an idle stream")
            return  # a stream we are done with
        if state.window + inc > MAX_WINDOW:
            raise _Violation(FLOW_CONTROL_ERROR, "stream window beyond 2^31-1")
        state.window += inc
        woken.add(sid)

    def _data(self, flags: int, sid: int, payload: bytes, woken: set[int]) -> None:
        n = len(payload)
        if sid == 0:
            raise _Violation(PROTOCOL_ERROR, "DATA on stream 0")
        if n > self.recv_window:
            raise _Violation(FLOW_CONTROL_ERROR, "DATA beyond the connection window")
        self.recv_window -= n
        state = self._state.get(sid)
        if state is None:
            if self._idle(sid):
                raise _Violation(PROTOCOL_ERROR, "DATA on an idle stream")
            self._return_connection(n)  # a stream we are done with: nobody will read it
            return
        if n > state.recv_window:
            raise _Violation(FLOW_CONTROL_ERROR, "DATA beyond the stream window")
        state.recv_window -= n
        st = self.streams.get(sid)
        if st is None or st.reset_code is not None or state.reset:
            self._return_connection(n)  # crossed our RST_STREAM: give the window back now
            return
        if state.remote_ended:
            raise _Violation(STREAM_CLOSED, "DATA after END_STREAM")
        if st.headers is None:  # a response's DATA before its HEADERS (a request's stream begins with them)
            raise _Violation(PROTOCOL_ERROR, "DATA before HEADERS")
        data = self._unpad(flags, payload)
        end = flags & END_STREAM
        if not data and not end:
            self._flood(DATA)
        if state.expected >= 0:
            state.received += len(data)
            if state.received > state.expected or (end and state.received != state.expected):
                raise _Violation(PROTOCOL_ERROR, "body length differs from content-length")
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
        self._block = None
        try:  # decoded even for a stream we forgot: the HPACK table must stay in step
            headers = self._decoder.decode(bytes(block))
        except hpack.exceptions.OversizedHeaderListError:
            raise _Violation(ENHANCE_YOUR_CALM, "header list too large", "oversized-headers") from None
        except (hpack.exceptions.HPACKError, ValueError, IndexError) as exc:
            raise _Violation(COMPRESSION_ERROR, f"header block: {exc}") from None
        self._on_headers(sid, flags, headers, woken)

    def _on_headers(self, sid: int, flags: int, headers: Headers, woken: set[int]) -> None:
        raise NotImplementedError

    def _settings(self, flags: int, sid: int, payload: bytes, woken: set[int]) -> None:
        if sid != 0:
            raise _Violation(PROTOCOL_ERROR, "SETTINGS on a stream")
        if len(payload) % 6 or (flags & ACK and payload):
            raise _Violation(FRAME_SIZE_ERROR, "bad SETTINGS")
        if flags & ACK:
            return
        self._flood(SETTINGS)
        self.preface_received = True
        if not self._settings_seen:
            self._settings_seen = True
            self.peer_max_header_list = None  # RFC 9113: unlimited unless the peer's SETTINGS say otherwise
        for off in range(0, len(payload), 6):
            key, value = _setting.unpack_from(payload, off)
            if key == S_HEADER_TABLE_SIZE:
                self._encoder.table_update = True
            elif key == S_ENABLE_PUSH:
                if value > 1 or (value and self._peer_is_server):
                    raise _Violation(PROTOCOL_ERROR, "ENABLE_PUSH neither 0 nor 1, or from a server")
            elif key == S_MAX_CONCURRENT_STREAMS:
                self.max_streams = value
            elif key == S_MAX_HEADER_LIST_SIZE:
                self.peer_max_header_list = value
            elif key == S_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise _Violation(FLOW_CONTROL_ERROR, "initial window too large")
                delta, self.initial_window = value - self.initial_window, value
                for state in self._state.values():
                    state.window += delta
                    if state.window > MAX_WINDOW:
                        raise _Violation(FLOW_CONTROL_ERROR, "a stream window beyond 2^31-1")
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
        state = self._state.get(stream_id)
        if state is None or state.remote_ended or state.reset:
            return  # nothing more comes on it
        state.processed += nbytes
        if _update_due(state.processed, state.recv_window, STREAM_WINDOW):
            self._out += frame(WINDOW_UPDATE, 0, stream_id, _u32.pack(state.processed))
            state.recv_window += state.processed
            state.processed = 0

    def _return_connection(self, nbytes: int) -> None:
        self._processed += nbytes
        if _update_due(self._processed, self.recv_window, CONNECTION_WINDOW):
            self._out += frame(WINDOW_UPDATE, 0, 0, _u32.pack(self._processed))
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

    def _sending(self, stream_id: int) -> _Stream:
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
            out += _head.pack(
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
            self._out += frame(GOAWAY, 0, 0, _u32.pack(self._last_stream()) + _u32.pack(code))
            self._close(reason)

    def ping(self, opaque: bytes = bytes(8)) -> None:
        """A PING for the peer to ACK: whether it is still there (`gateway.transport.keepalive`)."""
        if not self.closed:
            self._out += frame(PING, 0, 0, opaque)

    def close(self, code: int = NO_ERROR) -> None:
        if not self.closed:
            self._out += frame(GOAWAY, 0, 0, _u32.pack(self._last_stream()) + _u32.pack(code))
            self._close("local-close")

    def _last_stream(self) -> int:
        return 0

    def data_to_send(self, amount: int | None = None) -> bytes:
        return self._out.take(amount)

    @property
    def pending_output(self) -> int:
        return len(self._out)


class LeanClientCore(LeanCore):
    """`H2Core(client_side=True)`'s interface, without h2: opens requests, reads responses."""

    _peer_is_server = True

    def __init__(self, *, max_header_list_size: int = MAX_HEADER_LIST_SIZE) -> None:
        super().__init__(
            max_header_list_size,
            {
                S_ENABLE_PUSH: 0,
                S_MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
                S_INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                S_MAX_FRAME_SIZE: MAX_FRAME_SIZE,
                S_MAX_HEADER_LIST_SIZE: max_header_list_size,
            },
        )
        self._out.prepend(PREFACE)
        self._next_id = 1

    def _idle(self, sid: int) -> bool:
        return sid % 2 == 0 or sid >= self._next_id

    def _on_headers(self, sid: int, flags: int, headers: Headers, woken: set[int]) -> None:
        st = self.streams.get(sid)
        if st is None and self._idle(sid):
            raise _Violation(PROTOCOL_ERROR, "HEADERS on a stream we did not open")
        if st is None or st.reset_code is not None:
            return
        state = self._state.get(sid)
        if state is not None and state.remote_ended:
            raise _Violation(STREAM_CLOSED, "HEADERS after END_STREAM")
        if st.headers is None:
            status = next((v for k, v in headers if k == b":status"), b"")
            if status.startswith(b"1"):  # informational: the response proper follows
                if flags & END_STREAM:
                    raise _Violation(PROTOCOL_ERROR, "an informational response ending the stream")
                return
            st.headers = headers
        elif not flags & END_STREAM:
            raise _Violation(PROTOCOL_ERROR, "trailers without END_STREAM")
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
        state = self._state[sid] = _Stream(self.initial_window)
        state.ended = end_stream
        return st

    def send_headers(self, stream_id: int, headers: Headers, end_stream: bool = False) -> None:
        raise NotImplementedError("a client core sends requests (send_request), not responses")


class LeanServerCore(LeanCore):
    """`H2Core(client_side=False, limits=...)`'s interface, without h2: takes requests (in
    `new_requests`), answers them, and guards itself against its peer."""

    preface_received = False  # until the client's preface and first SETTINGS

    def __init__(self, *, limits: Limits | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        lim = limits or Limits()
        self.max_inbound = lim.max_concurrent_streams
        super().__init__(
            lim.max_header_list_size,
            {
                S_MAX_CONCURRENT_STREAMS: lim.max_concurrent_streams,
                S_INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                S_MAX_FRAME_SIZE: MAX_FRAME_SIZE,
                S_MAX_HEADER_LIST_SIZE: lim.max_header_list_size,
                S_ENABLE_PUSH: 0,
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
            raise _Violation(ENHANCE_YOUR_CALM, flood[1], flood[1])

    def _idle(self, sid: int) -> bool:
        return sid % 2 == 0 or sid > self._highest_in

    def _last_stream(self) -> int:
        return self._highest_in

    def _on_headers(self, sid: int, flags: int, headers: Headers, woken: set[int]) -> None:
        end = bool(flags & END_STREAM)
        state = self._state.get(sid)
        if state is None:
            if sid % 2 == 0:
                raise _Violation(PROTOCOL_ERROR, "a client opened an even stream")
            if sid <= self._highest_in:
                return  # a stream we are done with (trailers that crossed our reset)
            self._highest_in = sid
            expected = _request_fields(headers)
            if end and expected > 0:
                raise _Violation(PROTOCOL_ERROR, "content-length without a body")
            if (
                len(self._state) >= self.max_inbound
                and sum(not s.closed for s in self._state.values()) >= self.max_inbound
            ):
                raise _Violation(REFUSED_STREAM, "beyond SETTINGS_MAX_CONCURRENT_STREAMS", "too-many-streams")
            state = self._state[sid] = _Stream(self.initial_window)
            state.expected, state.remote_ended = expected, end
            st = self.streams[sid] = StreamState(sid, headers=headers, ended=end)
            self.new_requests.append(st)
            woken.add(sid)
            return
        st = self.streams.get(sid)
        if st is None or st.reset_code is not None or state.reset:
            return  # trailers that crossed our reset
        if state.remote_ended:
            raise _Violation(STREAM_CLOSED, "HEADERS after END_STREAM")
        if not end:
            raise _Violation(PROTOCOL_ERROR, "trailers without END_STREAM")
        for name, value in headers:
            if name[:1] == b":":
                raise _Violation(PROTOCOL_ERROR, "a pseudo-header in trailers")
            _check_field(name, value)
        if state.expected >= 0 and state.received != state.expected:
            raise _Violation(PROTOCOL_ERROR, "body length differs from content-length")
        st.trailers = headers
        st.ended = state.remote_ended = True
        woken.add(sid)

    def send_headers(self, stream_id: int, headers: Headers, end_stream: bool = False) -> None:
        """The response's HEADERS (or trailers, with end_stream)."""
        state = self._sending(stream_id)
        self._header_block(stream_id, headers, end_stream)
        if end_stream:
            state.ended = True


def _check_dependency(sid: int, priority: bytes) -> None:
    """Priorities are ignored, but a stream depending on itself is still an error (RFC 9113 §5.3.1)."""
    if _u32.unpack_from(priority)[0] & 0x7FFFFFFF == sid:
        raise _Violation(PROTOCOL_ERROR, "a stream depending on itself")


def _check_field(name: bytes, value: bytes) -> None:
    if not _NAME.match(name):
        raise _Violation(PROTOCOL_ERROR, f"bad header name {name[:40]!r}")
    if value and _BAD_VALUE.search(value):
        raise _Violation(PROTOCOL_ERROR, f"bad value for {name[:40]!r}")
    if name in _CONNECTION_FIELDS:
        raise _Violation(PROTOCOL_ERROR, f"connection-specific field {name!r}")
    if name == b"te" and value.lower() != b"trailers":
        raise _Violation(PROTOCOL_ERROR, "te other than trailers")


def _request_fields(headers: Headers) -> int:
    """Check a request's header list as RFC 9113 §8.2-8.3 has it; its content-length, or -1."""
    pseudo: set[bytes] = set()
    regular = False
    method = authority = host = None
    length = -1
    for name, value in headers:
        _check_field(name, value)
        if name[0] == 0x3A:  # ':'
            if regular or name in pseudo or name not in _REQUEST_PSEUDO:
                raise _Violation(PROTOCOL_ERROR, f"pseudo-header {name!r} repeated, late or unknown")
            pseudo.add(name)
            if name == b":method":
                method = value
            elif name == b":authority":
                authority = value
            elif name == b":path" and not value:
                raise _Violation(PROTOCOL_ERROR, "empty :path")
        else:
            regular = True
            if name == b"host":
                if host is not None:
                    raise _Violation(PROTOCOL_ERROR, "two Host fields")
                host = value
            elif name == b"content-length":
                if not value.isdigit() or (length >= 0 and int(value) != length):
                    raise _Violation(PROTOCOL_ERROR, "bad content-length")
                length = int(value)
    if method is None:
        raise _Violation(PROTOCOL_ERROR, "no :method")
    if method == b"CONNECT" and b":protocol" not in pseudo:
        if b":scheme" in pseudo or b":path" in pseudo:
            raise _Violation(PROTOCOL_ERROR, "CONNECT with :scheme or :path")
    elif b":scheme" not in pseudo or b":path" not in pseudo:
        raise _Violation(PROTOCOL_ERROR, "no :scheme or :path")
    elif b":protocol" in pseudo and method != b"CONNECT":
        raise _Violation(PROTOCOL_ERROR, ":protocol outside CONNECT")
    if authority is None and host is None:
        raise _Violation(PROTOCOL_ERROR, "neither :authority nor Host")
    if authority is not None and host is not None and authority != host:
        raise _Violation(PROTOCOL_ERROR, ":authority and Host differ")
    return length


# Every connection konbini opens or serves uses a lean core; KONBINI_CLIENT_CORE=h2 and
# KONBINI_SERVER_CORE=h2 go back to h2's for a before/after in back-to-back runs.
LEAN_CLIENTS = os.environ.get("KONBINI_CLIENT_CORE", "lean") != "h2"
LEAN_SERVERS = os.environ.get("KONBINI_SERVER_CORE", "lean") != "h2"


def client_core() -> LeanClientCore | H2Core:
    return LeanClientCore() if LEAN_CLIENTS else H2Core(client_side=True)


def server_core(limits: Limits | None = None, clock: Callable[[], float] = time.monotonic) -> LeanServerCore | H2Core:
    if LEAN_SERVERS:
        return LeanServerCore(limits=limits, clock=clock)
    return H2Core(client_side=False, limits=limits, clock=clock)
