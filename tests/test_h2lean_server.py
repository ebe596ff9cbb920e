"""The lean server core (what every konbini node serves with) against h2's own client, an
implementation we did not write, and against h2's server as the reference for what a request
may look like.

Bodies larger than every window both ways with the protocol's default 16 KiB frames and with
1 MiB frames, bytes fed in pieces of every size as TCP may deliver them, header blocks in
CONTINUATIONs, trailers, resets racing DATA (the window must come back), every malformed input
closing the connection with GOAWAY and its code and reason, every flood counter, the stream
limit, and request header lists accepted exactly when h2's validation accepts them."""

from __future__ import annotations

import random
import struct

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import hpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as hst

from gateway.protocol.errors import ConnectionClosed
from gateway.protocol.frames import (
    CONTINUATION,
    DATA,
    ENHANCE_YOUR_CALM,
    FLOW_CONTROL_ERROR,
    FRAME_SIZE_ERROR,
    GOAWAY,
    PREFACE,
    PROTOCOL_ERROR,
    REFUSED_STREAM,
    STREAM_CLOSED,
    STREAM_WINDOW,
    frame,
)
from gateway.protocol.h2lean import LeanServerCore
from tests.h2peer import H2Peer, pieces
from topology.spec.model import Limits

REQUEST = [(b":method", b"POST"), (b":scheme", b"https"), (b":path", b"/v1/x"), (b":authority", b"router")]
GET = [(b":method", b"GET"), *REQUEST[1:]]
SETTINGS = frame(4, 0, 0)


def Client(**kw) -> H2Peer:
    return H2Peer(client_side=True, **kw)


def pump(server: LeanServerCore, client: Client, rng: random.Random | None = None) -> set[int]:
    woken: set[int] = set()
    for _ in range(1000):
        up, down = client.out(), server.data_to_send()
        if not up and not down:
            return woken
        if down:
            client.feed(down)
        for part in pieces(up, rng) if rng else [up]:
            if part:
                woken |= server.receive_data(part)
    raise AssertionError("the two sides never went quiet")


def connected(limits: Limits | None = None, clock=None, **kw) -> tuple[LeanServerCore, Client]:
    server = LeanServerCore(limits=limits, clock=clock) if clock else LeanServerCore(limits=limits)
    client = Client(**kw)
    pump(server, client)
    assert server.preface_received
    return server, client


def closes(server: LeanServerCore, wire: bytes, reason: str, code: int) -> None:
    """Feeding `wire` closes the connection for `reason`, with a GOAWAY of `code`."""
    with pytest.raises(ConnectionClosed) as exc:
        server.receive_data(wire)
    assert exc.value.args == (reason,) and server.closed and server.close_reason == reason
    out, i, codes = server.data_to_send(), 0, []
    while i + 9 <= len(out):
        if out[i + 3] == GOAWAY:
            codes.append(struct.unpack(">L", out[i + 13 : i + 17])[0])
        i += 9 + int.from_bytes(out[i : i + 3], "big")
    assert codes == [code]


def headers_frame(sid: int, headers, flags: int = 0x5) -> bytes:
    return frame(1, flags, sid, hpack.Encoder().encode(headers, huffman=False))


@pytest.mark.parametrize("max_frame", [16384, 1 << 20])
@pytest.mark.parametrize("seed", [1, 2])
def test_an_upload_and_a_download_larger_than_every_window_arrive_whole(max_frame: int, seed: int) -> None:
    rng = random.Random(seed)
    server, client = connected(max_frame=max_frame)
    body = rng.randbytes(3 * STREAM_WINDOW + 12345)
    sid = client.conn.get_next_available_stream_id()
    client.conn.send_headers(sid, REQUEST)
    pump(server, client, rng)
    st = server.new_requests.popleft()
    assert st.headers == REQUEST and not st.ended
    got, left = bytearray(), memoryview(body)
    for _ in range(1000):  # h2 sends what our windows allow; we read and ack what arrived
        window = min(client.conn.local_flow_control_window(sid), len(left))
        step = client.conn.max_outbound_frame_size
        for i in range(0, window, step):
            client.conn.send_data(
                sid, left[i : min(i + step, window)], end_stream=window == len(left) and i + step >= window
            )
        left = left[window:]
        pump(server, client, rng)
        while (chunk := server.take_chunk(st)) is not None:
            got += chunk
            server.ack(sid, len(chunk))
        pump(server, client, rng)
        if st.ended and not st.chunks:
            break
    assert bytes(got) == body
    answer = rng.randbytes(5 * STREAM_WINDOW + 7)
    server.send_headers(sid, [(b":status", b"200")])
    sent = 0
    for _ in range(1000):  # as the splice does: send what the windows take, then wait for more
        sent += server.send_data(sid, memoryview(answer)[sent:], end_stream=True)
        pump(server, client, rng)
        if sid in client.ended:
            break
    assert bytes(client.bodies[sid]) == answer and client.headers[sid] == [(b":status", b"200")]
    server.forget(sid)
    assert not server.streams


def test_header_blocks_in_continuations_and_trailers_come_in_and_go_out() -> None:
    server, client = connected()
    block = hpack.Encoder().encode([*REQUEST, (b"x-big", b"v" * 12000)], huffman=False)
    server.receive_data(frame(1, 0, 1, block[:5000]) + frame(CONTINUATION, 0, 1, block[5000:9000]))
    assert not server.new_requests and server.receiving_partial
    server.receive_data(frame(CONTINUATION, 0x4, 1, block[9000:]))
    st = server.new_requests.popleft()
    assert st.headers[-1] == (b"x-big", b"v" * 12000) and not server.receiving_partial
    server.receive_data(frame(DATA, 0, 1, b"body") + headers_frame(1, [(b"x-sum", b"1")]))
    assert server.take_chunk(st) == b"body" and st.trailers == [(b"x-sum", b"1")] and st.ended
    server.reset(1)  # the hand-made stream is done; h2's client opens the next one
    client.conn.highest_outbound_stream_id = 1
    client.conn.send_headers(3, REQUEST, end_stream=True)
    pump(server, client)
    server.send_headers(3, [(b":status", b"200"), (b"x-big", b"w" * 40000)])  # beyond h2's 16 KiB frames
    server.end_stream(3, [(b"x-trailer", b"t")])
    wire = server.data_to_send()
    assert CONTINUATION in _frame_types(wire)
    client.feed(wire)
    assert client.headers[3][-1] == (b"x-big", b"w" * 40000) and client.trailers[3] == [(b"x-trailer", b"t")]


def _frame_types(wire: bytes) -> list[int]:
    kinds, i = [], 0
    while i + 9 <= len(wire):
        kinds.append(wire[i + 3])
        i += 9 + int.from_bytes(wire[i : i + 3], "big")
    return kinds


def test_a_reset_racing_data_gives_the_connection_window_back() -> None:
    server, client = connected()
    window = server.recv_window
    for _ in range(40):  # 40 uploads, each reset by the server while the client's DATA is in flight
        sid = client.conn.get_next_available_stream_id()
        client.conn.send_headers(sid, REQUEST)
        pump(server, client)
        server.new_requests.popleft()
        client.conn.send_data(sid, b"x" * 60000)
        in_flight = client.out()
        server.reset(sid)
        server.receive_data(in_flight)  # DATA for a stream we already reset
        server.forget(sid)
        pump(server, client)
        assert client.resets.get(sid) == 8  # CANCEL reached the client
    assert server.recv_window + server._processed == window
    assert client.conn.outbound_flow_control_window == server.recv_window  # h2 agrees on what is open
    assert not server.closed and not server.streams


def test_ping_and_settings_are_acknowledged_and_goaway_ends_every_stream() -> None:
    server, client = connected()
    client.conn.ping(b"12345678")
    client.conn.update_settings({h2.settings.SettingCodes.HEADER_TABLE_SIZE: 0})
    sid = client.conn.get_next_available_stream_id()
    client.conn.send_headers(sid, REQUEST)
    pump(server, client)
    st = server.new_requests.popleft()
    server.send_headers(sid, [(b":status", b"200"), (b"x-a", b"1")])
    pump(server, client)  # h2 refuses a block that indexes into a table it shrank to 0
    assert client.headers[sid][-1] == (b"x-a", b"1")
    client.conn.close_connection()
    woken = server.receive_data(client.out())
    assert server.closed and server.close_reason == "goaway" and st.reset_code is not None and 0 in woken


# Each: what an allowed peer sends after the preface and SETTINGS, the close reason and GOAWAY code.
MALFORMED = {
    "data-on-stream-0": (frame(DATA, 0, 0, b"x"), "protocol-error", PROTOCOL_ERROR),
    "headers-on-an-even-stream": (headers_frame(2, GET), "protocol-error", PROTOCOL_ERROR),
    "data-on-an-idle-stream": (frame(DATA, 0, 5, b"x"), "protocol-error", PROTOCOL_ERROR),
    "window-update-on-an-idle-stream": (frame(8, 0, 5, b"\x00\x00\x00\x01"), "protocol-error", PROTOCOL_ERROR),
    "rst-on-an-idle-stream": (frame(3, 0, 5, b"\x00\x00\x00\x08"), "protocol-error", PROTOCOL_ERROR),
    "push-promise": (frame(5, 0x4, 1, b"\x00\x00\x00\x02"), "protocol-error", PROTOCOL_ERROR),
    "frame-beyond-our-max-size": (frame(DATA, 0, 1, b"x" * 70000), "protocol-error", FRAME_SIZE_ERROR),
    "connection-window-overflow": (frame(8, 0, 0, struct.pack(">L", 2**31 - 1)), "protocol-error", FLOW_CONTROL_ERROR),
    "window-update-of-0": (frame(8, 0, 0, b"\x00\x00\x00\x00"), "protocol-error", PROTOCOL_ERROR),
    "enable-push-2": (frame(4, 0, 0, struct.pack(">HL", 2, 2)), "protocol-error", PROTOCOL_ERROR),
    "settings-with-an-odd-length": (frame(4, 0, 0, b"\x00\x01\x00"), "protocol-error", FRAME_SIZE_ERROR),
    "ping-of-5-bytes": (frame(6, 0, 0, b"short"), "protocol-error", FRAME_SIZE_ERROR),
    "priority-of-4-bytes": (frame(2, 0, 1, b"\x00\x00\x00\x00"), "protocol-error", FRAME_SIZE_ERROR),
    "padding-beyond-the-frame": (frame(1, 0xD, 1, b"\xff" + b"x" * 10), "protocol-error", PROTOCOL_ERROR),
    "header-block-that-does-not-decode": (frame(1, 0x5, 1, b"\xff\xff\xff\xff"), "protocol-error", 0x9),
    "continuation-without-headers": (frame(CONTINUATION, 0x4, 1, b""), "protocol-error", PROTOCOL_ERROR),
    "headers-interrupted": (frame(1, 0x1, 1, b"") + frame(6, 0, 0, b"12345678"), "protocol-error", PROTOCOL_ERROR),
    "data-after-end-stream": (headers_frame(1, GET) + frame(DATA, 0, 1, b"x"), "protocol-error", STREAM_CLOSED),
    "body-longer-than-content-length": (
        headers_frame(1, [*REQUEST, (b"content-length", b"2")], 0x4) + frame(DATA, 1, 1, b"xyz"),
        "protocol-error",
        PROTOCOL_ERROR,
    ),
    "body-shorter-than-content-length": (
        headers_frame(1, [*REQUEST, (b"content-length", b"5")], 0x4) + frame(DATA, 1, 1, b"xyz"),
        "protocol-error",
        PROTOCOL_ERROR,
    ),
    "content-length-without-a-body": (
        headers_frame(1, [*GET, (b"content-length", b"5")]),
        "protocol-error",
        PROTOCOL_ERROR,
    ),  # RFC 9113 §8.1.1; h2 lets it through
    "trailers-without-end-stream": (
        headers_frame(1, REQUEST, 0x4) + headers_frame(1, [(b"x", b"1")], 0x4),
        "protocol-error",
        PROTOCOL_ERROR,
    ),
    "pseudo-header-in-trailers": (
        headers_frame(1, REQUEST, 0x4) + headers_frame(1, [(b":path", b"/")]),
        "protocol-error",
        PROTOCOL_ERROR,
    ),
    "hpack-bomb": (
        frame(1, 0x5, 1, hpack.Encoder().encode(GET + [(b"x-a", b"a" * 4000)], huffman=False) + b"\xbe" * 1000),
        "oversized-headers",
        ENHANCE_YOUR_CALM,
    ),
    "continuation-flood": (
        frame(1, 0x1, 1, hpack.Encoder().encode(GET, huffman=False)) + frame(CONTINUATION, 0, 1, b"\x00" * 100) * 65,
        "continuation-flood",
        ENHANCE_YOUR_CALM,
    ),
    "continuation-bytes": (
        frame(1, 0x1, 1, b"") + frame(CONTINUATION, 0, 1, b"\x00" * 16384) * 3,
        "continuation-flood",
        ENHANCE_YOUR_CALM,
    ),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_input_closes_the_connection_with_goaway_and_its_code(name: str) -> None:
    wire, reason, code = MALFORMED[name]
    server, _client = connected()
    closes(server, wire, reason, code)
    assert not server.new_requests or name.startswith(("data-after", "body-", "trailers-", "pseudo-header-in"))


def test_the_preface_and_a_first_settings_are_required() -> None:
    closes(LeanServerCore(), b"GET / HTTP/1.1\r\n\r\n", "protocol-error", PROTOCOL_ERROR)
    server = LeanServerCore()
    server.receive_data(PREFACE[:10])  # a preface may arrive in pieces
    assert not server.preface_received
    closes(server, PREFACE[10:] + frame(6, 0, 0, b"12345678"), "protocol-error", PROTOCOL_ERROR)
    server = LeanServerCore()
    server.receive_data(PREFACE[:10])
    server.receive_data(PREFACE[10:] + SETTINGS)
    assert server.preface_received


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        (frame(3, 0, 1, b"\x00\x00\x00\x08"), "rapid-reset"),
        (frame(6, 0, 0, b"12345678"), "ping-flood"),
        (frame(6, 1, 0, b"12345678"), "ping-flood"),
        (SETTINGS, "settings-flood"),
        (frame(DATA, 0, 1), "empty-data-flood"),
    ],
)
def test_each_flood_counter_closes_with_enhance_your_calm_one_past_its_limit(kind: bytes, reason: str) -> None:
    now = [0.0]
    limits = Limits(max_resets=5, max_pings=5, max_settings=5, max_empty_data=5, flood_window=10.0)
    server, client = connected(limits, clock=lambda: now[0])  # the handshake's SETTINGS counted one
    server.receive_data(headers_frame(1, REQUEST, 0x4))
    sent = 1 if reason == "settings-flood" else 0
    for _ in range(5 - sent):
        server.receive_data(kind)
    now[0] = 5.0  # still inside the window
    closes(server, kind, reason, ENHANCE_YOUR_CALM)
    # a fresh window forgives: the same count spread over two windows is fine
    server, client = connected(limits, clock=lambda: now[0])
    server.receive_data(headers_frame(1, REQUEST, 0x4))
    for i in range(8):
        now[0] = 100.0 + 11.0 * (i // 4)
        server.receive_data(kind)
    assert not server.closed


def test_streams_beyond_the_limit_close_the_connection_but_finished_ones_do_not_count() -> None:
    server, client = connected(Limits(max_concurrent_streams=2))
    for sid in (1, 3):
        server.receive_data(headers_frame(sid, GET))
        server.send_headers(sid, [(b":status", b"204")], end_stream=True)  # closed both ways, not yet forgotten
    server.receive_data(headers_frame(5, GET))
    server.receive_data(headers_frame(7, GET))
    assert len(server.new_requests) == 4
    closes(server, headers_frame(9, GET), "too-many-streams", REFUSED_STREAM)


def test_random_bytes_after_the_handshake_only_ever_close_the_connection() -> None:
    rng = random.Random(11)
    for _ in range(300):
        server, _client = connected(Limits())
        server.receive_data(headers_frame(1, REQUEST, 0x4))
        try:
            for _ in range(5):
                server.receive_data(rng.randbytes(rng.randint(1, 200)))
        except ConnectionClosed:
            assert server.closed


FIELD_NAMES = [
    b":method",
    b":path",
    b":scheme",
    b":authority",
    b":status",
    b":protocol",
    b"host",
    b"x",
    b"X-up",
    b"content-length",
    b"te",
    b"connection",
    b"x:y",
    b"",
    b"a b",
]
FIELD_VALUES = [
    b"GET",
    b"POST",
    b"CONNECT",
    b"/",
    b"",
    b"https",
    b"router",
    b"other",
    b"trailers",
    b"gzip",
    b"5",
    b" x",
    b"x\t",
    b"a\nb",
    b"a\x00b",
    b"0",
]
fields = hst.lists(hst.tuples(hst.sampled_from(FIELD_NAMES), hst.sampled_from(FIELD_VALUES)), max_size=7)


def _accepted(core, block: bytes) -> bool:
    try:
        core.receive_data(frame(1, 0x4, 1, block))  # the body stays open (a body-less content-length: MALFORMED)
    except ConnectionClosed:
        return False
    return bool(core.new_requests)


@settings(max_examples=1500, deadline=None, derandomize=True)
@given(
    hst.one_of(
        fields,
        fields.map(lambda f: [*GET, *f]),
        fields.map(lambda f: [*f, *GET]),
        hst.tuples(hst.sampled_from(FIELD_NAMES), hst.sampled_from(FIELD_VALUES)).map(lambda f: [*GET, f]),  # one twist
        hst.permutations(GET),
        hst.permutations(GET).map(lambda g: g[1:]),
    )
)
def test_a_request_header_list_is_accepted_exactly_when_h2_accepts_it(headers) -> None:
    block = hpack.Encoder().encode(headers, huffman=False)
    lean, _client = connected()
    assert _accepted(lean, block) == _h2_accepts(block), headers


def _h2_accepts(block: bytes) -> bool:
    """h2's own server, validating inbound headers (its default), as the reference."""
    reference = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
    reference.initiate_connection()
    reference.receive_data(PREFACE + SETTINGS)
    try:
        events = reference.receive_data(frame(1, 0x4, 1, block))
    except h2.exceptions.ProtocolError:
        return False
    return any(isinstance(ev, h2.events.RequestReceived) for ev in events)
