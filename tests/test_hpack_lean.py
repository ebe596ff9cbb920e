"""The lean cores' HPACK (gateway.protocol.h2lean): FieldDecoder against hpack's Decoder on what
hpack's Encoder writes (Huffman or not, the dynamic table filling, evicting and resized mid-way),
FieldEncoder's output read back by hpack's Decoder, and malformed blocks only ever raising
hpack's errors."""

from __future__ import annotations

import random

import hpack
import hpack.exceptions
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.protocol.fieldcodec import FieldDecoder, FieldEncoder

names = st.sampled_from(
    [
        b":method",
        b":path",
        b":status",
        b"content-length",
        b"x-a",
        b"x-b",
        b"user-agent",
        b"authorization",
        b"server-timing",
        b"cookie",
    ]
)
values = st.one_of(st.sampled_from([b"GET", b"200", b"/", b"0", b""]), st.binary(max_size=300))
header_lists = st.lists(st.tuples(names, values), max_size=12)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.lists(st.tuples(header_lists, st.booleans(), st.sampled_from([None, 0, 256, 4096])), min_size=1, max_size=20))
def test_the_decoder_reads_what_hpacks_encoder_writes_block_after_block(blocks) -> None:
    encoder, reference, lean = hpack.Encoder(), hpack.Decoder(), FieldDecoder(1 << 20)
    for headers, huffman, table_size in blocks:
        if table_size is not None:  # a SETTINGS_HEADER_TABLE_SIZE: the next block opens with a size update
            encoder.header_table_size = table_size
        block = encoder.encode(headers, huffman=huffman)
        expected = [tuple(f) for f in reference.decode(block, raw=True)]
        assert lean.decode(block) == expected == headers
    assert list(lean.table) == [tuple(f) for f in reference.header_table.dynamic_entries]


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.lists(header_lists, min_size=1, max_size=10))
def test_hpacks_decoder_reads_what_the_field_encoder_writes(blocks) -> None:
    encoder, decoder = FieldEncoder(), hpack.Decoder()
    for i, headers in enumerate(blocks):
        if i == 1:  # the peer changed its table size: our next block says ours is 0
            encoder.table_update = True
            decoder.max_allowed_table_size = 0
        block = encoder.encode(headers)
        assert [tuple(f) for f in decoder.decode(block, raw=True)] == headers
    assert not decoder.header_table.dynamic_entries


def test_a_header_list_past_the_limit_stops_while_decoding() -> None:
    # one 4000-byte field into the table, then 1000 references to it: 5 KiB that would be 4 MB
    block = hpack.Encoder().encode([(b"x-a", b"a" * 4000)], huffman=False) + b"\xbe" * 1000
    with pytest.raises(hpack.exceptions.OversizedHeaderListError):
        FieldDecoder(16384).decode(block)


@pytest.mark.parametrize(
    "block",
    [
        b"\x80",  # index 0
        b"\xff\x00",  # index 127: beyond the tables
        b"\x3f\xe2\x1f",  # a table size update to 4097, beyond our 4096
        b"\x82\x20",  # a table size update after a field
        b"\x00\x05ab",  # a name cut short
        b"\x40\x01a\xff",  # a value length cut short
        b"\x8f\xff\xff\xff\xff\xff\xff\x01",  # an integer too large
        b"\x00\x81\xff",  # a Huffman string that is all padding
    ],
)
def test_malformed_blocks_raise_hpack_errors(block: bytes) -> None:
    with pytest.raises(hpack.exceptions.HPACKDecodingError):
        FieldDecoder(16384).decode(block)


def test_random_bytes_raise_only_hpack_errors() -> None:
    rng = random.Random(5)
    for _ in range(3000):
        decoder = FieldDecoder(16384)
        try:
            decoder.decode(rng.randbytes(rng.randint(1, 60)))
        except hpack.exceptions.HPACKDecodingError:
            pass
