"""The relay's lean upstream core against h2's own server (an implementation we did not write).

Requests and responses with bodies larger than every window, peers with the protocol's default
16 KiB frames and with 1 MiB frames, header blocks that need CONTINUATION both ways, trailers,
PING and SETTINGS acks, resets racing DATA (the window must come back), GOAWAY, and malformed
input closing the connection rather than raising anything else. Bytes are fed in pieces of every
size, as TCP may deliver them."""

from __future__ import annotations

import random

import h2.settings
import pytest

from gateway.protocol.errors import ConnectionClosed
from gateway.protocol.frames import CONTINUATION, GOAWAY, PING, STREAM_WINDOW, frame
from gateway.protocol.h2lean import LeanClientCore
from tests.h2peer import H2Peer, pieces

REQUEST = [(b":method", b"POST"), (b":scheme", b"https"), (b":path", b"/v1/x"), (b":authority", b"center")]


def Server(**kw) -> H2Peer:
    return H2Peer(client_side=False, **kw)


def pump(client: LeanClientCore, server: Server, rng: random.Random | None = None) -> set[int]:
    """Move bytes both ways until both are quiet; the client's wakes."""
    woken: set[int] = set()
    for _ in range(1000):
        up, down = client.data_to_send(), server.out()
        if not up and not down:
            return woken
        if up:
            server.feed(up)
        for part in pieces(down, rng) if rng else [down]:
            if part:
                woken |= client.receive_data(part)
    raise AssertionError("the two sides never went quiet")


def connected(**kw) -> tuple[LeanClientCore, Server]:
    client, server = LeanClientCore(), Server(**kw)
    pump(client, server)
    return client, server


def read_body(client: LeanClientCore, st) -> bytes:
    out = bytearray()
    while (chunk := client.take_chunk(st)) is not None:
        out += chunk
        client.ack(st.id, len(chunk))
    return bytes(out)


@pytest.mark.parametrize("max_frame", [16384, 1 << 20])
@pytest.mark.parametrize("seed", [1, 2])
def test_an_upload_and_a_download_larger_than_every_window_arrive_whole(max_frame: int, seed: int) -> None:
    rng = random.Random(seed)
    client, server = connected(max_frame=max_frame)
    body = rng.randbytes(3 * STREAM_WINDOW + 12345)
    st = client.send_request(REQUEST, end_stream=False)
    sent = 0
    for _ in range(1000):  # as the splice does: send what the windows take, then wait for more
        if sent < len(body):
            sent += client.send_data(st.id, memoryview(body)[sent:], end_stream=True)
        pump(client, server, rng)
        if st.id in server.ended:
            break
    assert bytes(server.bodies[st.id]) == body and sent == len(body)
    answer = rng.randbytes(5 * STREAM_WINDOW + 7)
    server.conn.send_headers(st.id, [(b":status", b"200")])
    got, left = bytearray(), memoryview(answer)
    for _ in range(1000):
        window = min(server.conn.local_flow_control_window(st.id), len(left))
        step = server.conn.max_outbound_frame_size
        for i in range(0, window, step):
            server.conn.send_data(
                st.id, left[i : min(i + step, window)], end_stream=window == len(left) and i + step >= window
            )
        left = left[window:]
        if not window and not left:
            break
        pump(client, server, rng)
        got += read_body(client, st)
        pump(client, server, rng)
        if st.ended and not st.chunks:
            break
    assert st.headers == [(b":status", b"200")] and bytes(got) == answer and st.ended
    client.forget(st.id)


def test_header_blocks_beyond_a_frame_go_out_and_come_in_as_continuations() -> None:
    client, server = connected()
    big = [*REQUEST, (b"x-big", b"v" * 40000)]
    st = client.send_request(big, end_stream=True)
    wire = client.data_to_send()
    assert CONTINUATION in _frame_types(wire)
    server.feed(wire)
    assert server.headers[st.id][-1] == (b"x-big", b"v" * 40000)
    # h2 never splits a block below our 64 KiB frames: split one by hand, as a peer with 16 KiB frames would
    block = server.conn.encoder.encode([(b":status", b"200"), (b"x-big", b"w" * 8000)], huffman=False)
    client.receive_data(frame(1, 0, st.id, block[:5000]) + frame(CONTINUATION, 0, st.id, block[5000:6000]))
    assert st.headers is None and client.receiving_partial
    client.receive_data(frame(CONTINUATION, 0x4, st.id, block[6000:]))
    trailers = server.conn.encoder.encode([(b"x-trailer", b"t")], huffman=False)
    client.receive_data(frame(0, 0, st.id, b"ok") + frame(1, 0x5, st.id, trailers))
    assert st.headers[-1] == (b"x-big", b"w" * 8000) and read_body(client, st) == b"ok"
    assert st.trailers == [(b"x-trailer", b"t")] and st.ended


def test_a_response_header_list_over_our_limit_closes_the_connection() -> None:
    client, server = connected()
    st = client.send_request(REQUEST, end_stream=True)
    pump(client, server)
    server.conn.send_headers(st.id, [(b":status", b"200"), (b"x-big", b"w" * 40000)], end_stream=True)
    with pytest.raises(ConnectionClosed):
        client.receive_data(server.out())
    assert client.closed and st.reset_code is not None


def test_ping_and_settings_are_acknowledged_and_a_new_table_size_is_honoured() -> None:
    client, server = connected()
    server.conn.ping(b"12345678")
    server.conn.update_settings({h2.settings.SettingCodes.HEADER_TABLE_SIZE: 0})
    pump(client, server)
    assert server.pings == 1
    st = client.send_request([*REQUEST, (b"x-a", b"1")], end_stream=True)
    st2 = client.send_request([*REQUEST, (b"x-a", b"1")], end_stream=True)
    pump(client, server)  # h2 refuses a block that indexes into a table it shrank to 0
    assert server.headers[st.id][-1] == server.headers[st2.id][-1] == (b"x-a", b"1")


def test_a_reset_racing_data_gives_the_connection_window_back() -> None:
    client, server = connected()
    window = client.recv_window
    for _ in range(40):  # 40 streams, each reset while the server's DATA is in flight
        st = client.send_request(REQUEST, end_stream=True)
        pump(client, server)
        server.conn.send_headers(st.id, [(b":status", b"200")])
        server.conn.send_data(st.id, b"x" * 60000)
        in_flight = server.out()
        client.reset(st.id)
        client.receive_data(in_flight)  # DATA for a stream we already reset
        client.forget(st.id)
        pump(client, server)
        assert server.resets.get(st.id) == 8  # CANCEL reached the server
    # every byte came back: what the client still owes is less than one WINDOW_UPDATE's worth
    assert client.recv_window + client._processed == window
    assert server.conn.outbound_flow_control_window == client.recv_window  # h2 agrees on what is open


def test_goaway_ends_every_stream_and_what_follows_is_ignored() -> None:
    client, server = connected()
    st = client.send_request(REQUEST, end_stream=True)
    pump(client, server)
    server.conn.close_connection()
    woken = client.receive_data(server.out())
    assert client.closed and client.close_reason == "goaway" and st.reset_code is not None and 0 in woken
    with pytest.raises(ConnectionClosed):
        client.send_request(REQUEST, end_stream=True)


@pytest.mark.parametrize(
    "wire",
    [
        frame(PING, 0, 0, b"short"),  # a PING is 8 bytes
        frame(4, 0, 0, b"\x00\x05\x00\x00\x00\x01"),  # SETTINGS_MAX_FRAME_SIZE below 16384
        frame(1, 0x4, 1, b"\xff\xff\xff\xff"),  # a header block that does not decode
        frame(9, 0x4, 1, b""),  # CONTINUATION with no HEADERS before it
        frame(5, 0x4, 1, b"\x00\x00\x00\x02"),  # PUSH_PROMISE: push is off
        frame(0, 0, 1, b"x" * 70000),  # a frame beyond our SETTINGS_MAX_FRAME_SIZE
        b"\x00\x00\x00\x08\x00\x00\x00\x00\x00\x00\x00\x00\x00",  # WINDOW_UPDATE of 0 on the connection
    ],
)
def test_malformed_input_closes_the_connection_with_goaway(wire: bytes) -> None:
    client, server = connected()
    client.send_request(REQUEST, end_stream=True)
    client.data_to_send()
    with pytest.raises(ConnectionClosed):
        client.receive_data(wire)
    assert client.closed and GOAWAY in _frame_types(client.data_to_send())


def test_random_bytes_only_ever_close_the_connection() -> None:
    rng = random.Random(7)
    for _ in range(300):
        client, _server = connected()
        client.send_request(REQUEST, end_stream=False)
        try:
            for _ in range(5):
                client.receive_data(rng.randbytes(rng.randint(1, 200)))
        except ConnectionClosed:
            assert client.closed


def _frame_types(wire: bytes) -> list[int]:
    if wire.startswith(b"PRI * HTTP/2.0"):
        wire = wire[24:]
    kinds, i = [], 0
    while i + 9 <= len(wire):
        length = int.from_bytes(wire[i : i + 3], "big")
        kinds.append(wire[i + 3])
        i += 9 + length
    return kinds
