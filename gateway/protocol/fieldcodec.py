"""HPACK (RFC 7541) for the cores: an encoder that uses the static table only, and a decoder
with the dynamic table whose header list is bounded while it decodes.

hpack supplies the static table, the Huffman decoder and the exceptions; the loops are ours
because hpack's Encoder and Decoder cost a relay more CPU than the frames around them (the
classes' docstrings say where). tests/test_hpack_lean.py holds both against hpack's own.
"""

from __future__ import annotations

from collections import deque

import hpack.exceptions
import hpack.table
from hpack.huffman_table import decode_huffman

from gateway.protocol.streams import Headers


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
