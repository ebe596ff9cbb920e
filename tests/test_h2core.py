"""The sans-IO HTTP/2 cores (`gateway.protocol.h2lean`), fed bytes by a plain `h2` peer (no sockets), and its Trio driver over
memory streams: flow control acknowledged after forwarding, padding credit, outbound DATA cut to
the window in one call, and a broken peer closing the connection with every stream reset (INT-1)."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import pytest
import trio
import trio.testing

from gateway.protocol.driver import Stream
from gateway.protocol.errors import ConnectionClosed, StreamReset
from gateway.protocol.frames import CONNECTION_WINDOW, MAX_HEADER_LIST_SIZE, STREAM_WINDOW
from gateway.protocol.h2lean import LeanClientCore, LeanCore, LeanServerCore
from gateway.protocol.h2trio import TrioH2
from gateway.protocol.http import request_headers
from gateway.protocol.streams import PENDING, StreamState, header

REQUEST = request_headers("POST", "/v1/issue", "store-router-a1")
RESPONSE = [(b":status", b"200")]
BOTH_SIDES = pytest.mark.parametrize("client_side", [True, False], ids=["core-client", "core-server"])
DATA_ON_STREAM_0 = b"\x00\x00\x05\x00\x00\x00\x00\x00\x00hello"  # forbidden by RFC 9113 §6.1


class Peer:
    """The other end of a core: a plain `h2` connection, wired to it by hand."""

    def __init__(self, core: LeanCore, settings: dict[int, int] | None = None, connection_window: int = 0) -> None:
        self.core = core
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=not isinstance(core, LeanClientCore), header_encoding=None)
        )
        self.h2.initiate_connection()
        if settings:
            self.h2.update_settings(settings)
        if connection_window:
            self.h2.increment_flow_control_window(connection_window)
        self.events: list[h2.events.Event] = []
        self.exchange()
        self.events.clear()  # the handshake's settings and connection window: nothing to look at

    def exchange(self) -> set[int]:
        """Move bytes both ways until neither side has anything to say; the stream ids the core woke."""
        woken: set[int] = set()
        while True:
            out = self.core.data_to_send()
            if out:
                self.events += self.h2.receive_data(out)
            back = self.h2.data_to_send()
            if back:
                woken |= self.core.receive_data(back)
            if not out and not back:
                return woken

    def take_events(self, kind: type) -> list:
        got = [ev for ev in self.events if isinstance(ev, kind)]
        self.events = [ev for ev in self.events if not isinstance(ev, kind)]
        return got

    def send(self, stream_id: int, data: bytes) -> None:
        """DATA frames as large as the core allows."""
        step = self.h2.max_outbound_frame_size
        for start in range(0, len(data), step):
            self.h2.send_data(stream_id, data[start : start + step])

    def window(self, stream_id: int) -> int:
        """How much more the peer may send on the stream (the core's windows as the peer sees them)."""
        return self.h2.local_flow_control_window(stream_id)


def inbound_stream(peer: Peer) -> StreamState:
    """A stream whose body the peer is about to send to the core (a request to a server core,
    a response to a client core)."""
    core = peer.core
    if isinstance(core, LeanClientCore):
        st = core.send_request(REQUEST, end_stream=True)
        peer.exchange()
        peer.h2.send_headers(st.id, RESPONSE)
    else:
        peer.h2.send_headers(peer.h2.get_next_available_stream_id(), REQUEST)
        peer.exchange()
        st = core.new_requests.popleft()
    peer.exchange()
    assert st.headers is not None
    return st


def outbound_stream(peer: Peer) -> StreamState:
    """A stream whose body the core is about to send (a request body, or a response body)."""
    core = peer.core
    if isinstance(core, LeanClientCore):
        st = core.send_request(REQUEST, end_stream=False)
    else:
        peer.h2.send_headers(peer.h2.get_next_available_stream_id(), REQUEST, end_stream=True)
        peer.exchange()
        st = core.new_requests.popleft()
        core.send_headers(st.id, RESPONSE)
    peer.exchange()
    return st


def drain(core: LeanCore, st: StreamState) -> bytes:
    """Everything buffered on the stream, taken the consumer's way (nothing acked)."""
    parts = []
    while (data := core.take_chunk(st)) is not None:
        parts.append(data)
    return b"".join(parts)


def core_for(client_side: bool) -> LeanCore:
    return LeanClientCore() if client_side else LeanServerCore()


def record_acks(core: LeanCore) -> list[tuple[int, int]]:
    """(stream id, bytes) for every acknowledgement the core is given."""
    acks: list[tuple[int, int]] = []
    real = core.ack

    def spy(stream_id: int, nbytes: int) -> None:
        acks.append((stream_id, nbytes))
        real(stream_id, nbytes)

    core.ack = spy  # type: ignore[method-assign]
    return acks


def record_credit(core: LeanCore) -> list[int]:
    """Bytes of every credit the core gives back to the connection's window."""
    credit: list[int] = []
    real = core._return_connection

    def spy(nbytes: int) -> None:
        credit.append(nbytes)
        real(nbytes)

    core._return_connection = spy  # type: ignore[method-assign]
    return credit


def assert_goaway(peer: Peer, code: int) -> None:
    """The core's last words reach the peer: GOAWAY with `code` (h2 writes one, and the core's
    close_connection a second, identical one; RFC 9113 §6.8 allows repeats)."""
    peer.events += peer.h2.receive_data(peer.core.data_to_send())
    goaways = peer.take_events(h2.events.ConnectionTerminated)
    assert goaways and {ev.error_code for ev in goaways} == {code}


# -- inbound flow control --------------------------------------------------------------------


@BOTH_SIDES
def test_inbound_data_reopens_the_window_only_when_acked_not_on_receipt(client_side):
    core = core_for(client_side)
    peer = Peer(core)
    st = inbound_stream(peer)
    body = bytes(range(256)) * (STREAM_WINDOW * 25 // 32 // 256)  # 78 % of the window: past h2's half-window threshold
    peer.events.clear()
    peer.send(st.id, body)
    woken = peer.exchange()
    assert st.id in woken and st.buffered == len(body)
    assert peer.window(st.id) == STREAM_WINDOW - len(body)  # received, not acknowledged
    assert drain(core, st) == body
    assert core.next_chunk(st) is PENDING and st.buffered == 0
    peer.exchange()
    assert peer.window(st.id) == STREAM_WINDOW - len(body)  # taken by the consumer, still not acknowledged
    assert not peer.take_events(h2.events.WindowUpdated)
    core.ack(st.id, len(body))  # the consumer forwarded it: now the sender may send more
    peer.exchange()
    assert peer.window(st.id) == STREAM_WINDOW
    assert [ev.stream_id for ev in peer.take_events(h2.events.WindowUpdated)] == [st.id]


@BOTH_SIDES
def test_padding_is_credited_when_the_chunk_is_taken_and_only_the_data_waits_for_ack(client_side):
    core = core_for(client_side)
    peer = Peer(core)
    st = inbound_stream(peer)
    acks = record_acks(core)
    size, pad = 100, 255
    frames = STREAM_WINDOW // 2 // (pad + 1)  # frames x (255 padding + 1 length byte): exactly half the window
    for i in range(frames):
        peer.h2.send_data(st.id, bytes([i]) * size, pad_length=pad)
    peer.exchange()
    sent = frames * (size + pad + 1)
    assert peer.window(st.id) == STREAM_WINDOW - sent and acks == []  # nothing credited on receipt
    assert drain(core, st) == b"".join(bytes([i]) * size for i in range(frames))  # padding never reaches the consumer
    peer.exchange()
    assert acks == [(st.id, pad + 1)] * frames
    assert peer.window(st.id) == STREAM_WINDOW - frames * size  # the padding came back; the data waits
    core.ack(st.id, frames * size)
    assert acks[-1] == (st.id, frames * size)


# -- reset ---------------------------------------------------------------------------------


@BOTH_SIDES
def test_reset_twice_sends_one_rst_stream_and_keeps_the_first_code(client_side):
    core = core_for(client_side)
    peer = Peer(core)
    st = inbound_stream(peer)
    core.reset(st.id, h2.errors.ErrorCodes.CANCEL)
    core.reset(st.id, h2.errors.ErrorCodes.INTERNAL_ERROR)
    peer.exchange()
    assert [(ev.stream_id, ev.error_code) for ev in peer.take_events(h2.events.StreamReset)] == [
        (st.id, h2.errors.ErrorCodes.CANCEL)
    ]
    assert st.reset_code == h2.errors.ErrorCodes.CANCEL
    with pytest.raises(StreamReset):
        core.next_chunk(st)


@BOTH_SIDES
def test_reset_of_a_finished_or_unknown_stream_is_harmless(client_side):
    core = core_for(client_side)
    peer = Peer(core)
    st = inbound_stream(peer)
    if client_side:  # the request was sent whole; the response ends too
        peer.h2.send_data(st.id, b"done", end_stream=True)
    else:
        core.send_headers(st.id, RESPONSE, end_stream=True)
        peer.h2.send_data(st.id, b"done", end_stream=True)
    peer.exchange()
    assert st.ended and drain(core, st) == b"done"
    core.reset(st.id)  # both halves closed: nothing to reset
    core.reset(st.id)
    core.reset(99)  # a stream that never existed
    core.ack(st.id, 4)
    core.forget(st.id)
    core.reset(st.id)  # and after the consumer let go of it
    peer.exchange()
    assert not peer.take_events(h2.events.StreamReset)
    assert not peer.take_events(h2.events.ConnectionTerminated) and not core.closed
    other = inbound_stream(peer)  # the connection is as good as before
    peer.h2.send_data(other.id, b"next")
    peer.exchange()
    assert drain(core, other) == b"next"


@BOTH_SIDES
@pytest.mark.parametrize("how", ["local-close", "peer-goaway"])
def test_reset_after_the_connection_closed_is_harmless(client_side, how):
    core = core_for(client_side)
    peer = Peer(core)
    st = inbound_stream(peer)
    peer.h2.send_data(st.id, b"partial")
    peer.exchange()
    if how == "local-close":
        core.close()
    else:
        peer.h2.close_connection()
    peer.exchange()
    assert core.closed and core.close_reason == ("local-close" if how == "local-close" else "goaway")
    assert st.reset_code == h2.errors.ErrorCodes.CANCEL  # the unfinished stream is not left half-done
    core.reset(st.id)
    core.reset(st.id, h2.errors.ErrorCodes.INTERNAL_ERROR)
    core.reset(12345)
    core.ack(st.id, 7)
    core.forget(st.id)
    core.close()
    assert core.data_to_send() == b""  # after the GOAWAY, nothing more goes out
    assert st.reset_code == h2.errors.ErrorCodes.CANCEL
    with pytest.raises(ConnectionClosed):
        core.send_headers(st.id, RESPONSE)


# -- a misbehaving peer closes the whole connection ------------------------------------------


@BOTH_SIDES
def test_oversized_headers_close_the_connection_with_enhance_your_calm(client_side):
    core = core_for(client_side)
    peer = Peer(core)
    open_st = inbound_stream(peer)  # a stream in flight when the bad block arrives
    big = [(b"x-big", b"a" * (MAX_HEADER_LIST_SIZE + 1))]
    if client_side:
        st = core.send_request(REQUEST, end_stream=True)
        peer.exchange()
        peer.h2.send_headers(st.id, RESPONSE + big)
    else:
        peer.h2.send_headers(peer.h2.get_next_available_stream_id(), REQUEST + big, end_stream=True)
    with pytest.raises(ConnectionClosed) as exc:
        core.receive_data(peer.h2.data_to_send())
    assert exc.value.args == ("oversized-headers",)
    assert core.closed and core.close_reason == "oversized-headers"
    assert not core.new_requests  # the oversized request never reaches a handler
    assert open_st.reset_code == h2.errors.ErrorCodes.CANCEL
    assert_goaway(peer, h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)


@BOTH_SIDES
def test_protocol_error_closes_with_protocol_error_and_resets_every_open_stream(client_side):
    core = core_for(client_side)
    peer = Peer(core)
    streams = [inbound_stream(peer) for _ in range(3)]
    peer.h2.send_data(streams[0].id, b"half a body")
    peer.h2.send_data(streams[2].id, b"whole", end_stream=True)
    peer.exchange()
    assert streams[2].ended
    with pytest.raises(ConnectionClosed) as exc:
        core.receive_data(DATA_ON_STREAM_0)
    assert exc.value.args == ("protocol-error",)
    assert core.closed and core.close_reason == "protocol-error"
    assert streams[0].reset_code == streams[1].reset_code == h2.errors.ErrorCodes.CANCEL
    for st in streams[:2]:  # an unfinished stream hands out what arrived, then its reset
        drain(core, st)
        with pytest.raises(StreamReset):
            core.next_chunk(st)
    assert drain(core, streams[2]) == b"whole" and core.next_chunk(streams[2]) is None  # a finished one stays finished
    assert all(st.finished for st in streams)
    assert_goaway(peer, h2.errors.ErrorCodes.PROTOCOL_ERROR)
    with pytest.raises(ConnectionClosed):
        core.send_data(streams[1].id, b"more")


# -- outbound flow control -------------------------------------------------------------------


@BOTH_SIDES
@pytest.mark.parametrize(
    ("stream_window", "connection_window", "size"),
    [
        (1 << 20, 4 << 20, 3 << 20),  # a large window, smaller than the body: one call fills it
        (1 << 20, 4 << 20, 300_000),  # the body fits: all of it, END_STREAM on its last frame only
        (65535, 0, 200_000),  # the protocol's defaults, and never a WINDOW_UPDATE
    ],
    ids=["window-smaller-than-body", "body-fits", "default-window"],
)
def test_send_data_fills_the_whole_window_in_16k_frames_in_one_call(
    client_side, stream_window, connection_window, size
):
    core = core_for(client_side)
    settings = {
        h2.settings.SettingCodes.MAX_FRAME_SIZE: 16384,
        h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: stream_window,
    }
    peer = Peer(core, settings, connection_window)
    st = outbound_stream(peer)
    window = core.sendable(st.id)
    assert window == min(stream_window, 65535 + connection_window)
    body = bytes(range(251)) * (size // 251 + 1)
    body = body[:size]
    taken = core.send_data(st.id, memoryview(body), end_stream=True)  # ONE call
    assert taken == min(window, size)
    peer.events += peer.h2.receive_data(core.data_to_send())
    frames = peer.take_events(h2.events.DataReceived)
    assert len(frames) == -(-taken // 16384)
    assert all(len(f.data) <= 16384 for f in frames)
    assert b"".join(f.data for f in frames) == body[:taken]
    ended = [f.stream_ended is not None for f in frames]
    assert ended == [False] * (len(frames) - 1) + [taken == size]
    if taken < size:
        assert core.send_data(st.id, memoryview(body)[taken:], end_stream=True) == 0  # the window is spent


@BOTH_SIDES
def test_send_data_resumes_when_the_window_reopens(client_side):
    core = core_for(client_side)
    peer = Peer(core, {h2.settings.SettingCodes.MAX_FRAME_SIZE: 16384})
    st = outbound_stream(peer)
    body = b"z" * 100_000
    view = memoryview(body)
    got = b""
    while view:
        n = core.send_data(st.id, view, end_stream=True)
        assert n > 0, "stalled with the window open"
        view = view[n:]
        peer.events += peer.h2.receive_data(core.data_to_send())
        for f in peer.take_events(h2.events.DataReceived):
            got += f.data
            peer.h2.acknowledge_received_data(f.flow_controlled_length, f.stream_id)
        assert st.id in peer.exchange() or not view  # the peer's WINDOW_UPDATE wakes the writer
    assert got == body


# -- letting go of a stream ------------------------------------------------------------------


def test_forget_acks_unread_data_so_the_connection_window_recovers():
    core = LeanServerCore()
    peer = Peer(core)
    per_stream = STREAM_WINDOW * 29 // 32  # most of a stream's window
    count = -(-CONNECTION_WINDOW // 2 // per_stream)  # past h2's half-window threshold for the connection
    streams = []
    for _ in range(count):
        st = inbound_stream(peer)
        peer.send(st.id, b"u" * per_stream)
        streams.append(st)
    peer.exchange()
    assert peer.h2.outbound_flow_control_window == CONNECTION_WINDOW - count * per_stream
    for st in streams:
        core.forget(st.id)  # the handler ended without reading the body
    assert not core.streams
    peer.exchange()
    assert peer.h2.outbound_flow_control_window == CONNECTION_WINDOW
    # more DATA for a forgotten stream is acknowledged on arrival, never buffered
    credit = record_credit(core)
    peer.h2.send_data(streams[0].id, b"late")
    peer.exchange()
    assert credit == [4] and not streams[0].chunks


@BOTH_SIDES
def test_resetting_streams_with_unread_data_gives_their_bytes_back_to_the_connection_window(client_side):
    core = core_for(client_side)
    peer = Peer(core)
    per_stream = STREAM_WINDOW * 29 // 32  # most of a stream's window
    count = -(-CONNECTION_WINDOW // 2 // per_stream)
    for batch in range(0, count, 64):  # in batches: the peer's h2 opens at most 100 streams at once
        streams = []
        for _ in range(min(64, count - batch)):
            st = inbound_stream(peer)
            peer.send(st.id, b"u" * per_stream)
            streams.append(st)
        peer.exchange()
        for st in streams:  # read_body over its limit, a relay cancelling, a client releasing an unfinished response
            core.reset(st.id)
            core.forget(st.id)
        peer.exchange()
    assert peer.h2.outbound_flow_control_window == CONNECTION_WINDOW  # else ~140 such resets stall the connection


# -- the Trio driver over memory streams -----------------------------------------------------


async def _echo_reversed(stream: Stream) -> None:
    body = bytearray()
    while (chunk := await stream.receive_chunk()) is not None:
        body += chunk
    stream.send_headers([(b":status", b"200"), (b"content-length", str(len(body) * 2).encode())])
    await stream.send_data(bytes(body[::-1]))
    await stream.send_data(bytes(body), end_stream=True)


async def test_trio_request_and_response_bodies_larger_than_the_stream_window():
    client_end, server_end = trio.testing.memory_stream_pair()
    server = TrioH2(server_end, client_side=False, peer="test-client")
    client = TrioH2(client_end, client_side=True, peer="test-server")
    body = bytes(range(256)) * (3 * STREAM_WINDOW // 256)  # 3 windows each way: only acks keep it moving
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.run, _echo_reversed)
        nursery.start_soon(client.run)
        with trio.fail_after(10):
            stream = await client.open_stream(REQUEST)
            await stream.send_data(body, end_stream=True)
            headers = await stream.receive_headers()
            got = bytearray()
            while (chunk := await stream.receive_chunk()) is not None:
                got += chunk
            client.release(stream)
            client.close()
            await server.closed.wait()
    assert header(headers, b":status") == b"200"
    assert bytes(got) == body[::-1] + body
    assert not server.core.streams and not client.core.streams


async def test_trio_client_reset_cancels_the_server_handler_and_only_that_request():
    client_end, server_end = trio.testing.memory_stream_pair()
    started, cancelled = trio.Event(), trio.Event()

    async def handler(stream: Stream) -> None:
        if header(stream.headers, b":path") == b"/slow":
            started.set()
            try:
                await trio.sleep_forever()
            finally:
                cancelled.set()
        await _echo_reversed(stream)

    server = TrioH2(server_end, client_side=False)
    client = TrioH2(client_end, client_side=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.run, handler)
        nursery.start_soon(client.run)
        with trio.fail_after(10):
            slow = await client.open_stream(request_headers("GET", "/slow", "x"), end_stream=True)
            await started.wait()
            slow.reset(h2.errors.ErrorCodes.CANCEL)
            await cancelled.wait()  # the RST_STREAM cancelled the handler's cancel scope
            fine = await client.open_stream(REQUEST)
            await fine.send_data(b"abc", end_stream=True)
            assert header(await fine.receive_headers(), b":status") == b"200"
            assert await fine.read_body() == b"cbaabc"
            client.close()
            await server.closed.wait()
    assert not server.core.streams  # both requests finished and were let go of


async def test_trio_server_takes_a_steady_upload_longer_than_headers_timeout(autojump_clock):
    """headers_timeout bounds one frame's arrival: a body written 1,000 B every 60 ms, never on a
    frame boundary, for three times the timeout, is taken whole (it used to be closed as
    slow-headers once the first partial frame was `headers_timeout` old)."""
    from gateway.protocol.frames import DATA, END_STREAM, frame
    from topology.spec.model import Limits

    client_end, server_end = trio.testing.memory_stream_pair()
    limits = Limits(headers_timeout=1.0)

    async def count(stream: Stream) -> None:
        body = await stream.read_body()
        stream.send_headers([(b":status", b"200"), (b"received", str(len(body)).encode())], end_stream=True)

    server = TrioH2(server_end, client_side=False, limits=limits)
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    client.initiate_connection()
    client.send_headers(1, REQUEST)
    frames = [frame(DATA, 0, 1, b"u" * 4096) for _ in range(14)] + [frame(DATA, END_STREAM, 1)]
    body = b"".join(frames)  # 57,470 B: within the protocol's first 65,535-byte windows
    pieces = [body[i : i + 1000] for i in range(0, len(body), 1000)]
    assert len(pieces) * 0.06 > 3 * limits.headers_timeout
    status = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.run, count)
        await client_end.send_all(client.data_to_send())
        for piece in pieces:
            await client_end.send_all(piece)
            await trio.sleep(0.06)  # the upload's pace (virtual time), not a wait for something
        while not status:
            data = await client_end.receive_some()
            assert data, f"the server closed the connection: {server.core.close_reason}"
            for ev in client.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    status = dict(ev.headers)
        server.close()
    assert server.core.close_reason != "slow-headers"
    assert status[b":status"] == b"200" and status[b"received"] == str(14 * 4096).encode()
