"""The relay fast path without sockets: a kiosk core, the relay's two cores spliced, an origin core,
bytes moved between them by hand. Each test names what the splice must keep true."""

from __future__ import annotations

import pytest

from bench.h2cost import relay_hop
from gateway.protocol.frames import CANCEL, CONNECTION_WINDOW, INTERNAL_ERROR, MAX_FRAME_SIZE, STREAM_WINDOW
from gateway.protocol.h2lean import LeanClientCore, LeanServerCore
from gateway.protocol.http import request_headers
from gateway.protocol.splice import Carrier, Pair, Splice
from gateway.protocol.streams import Headers
from topology.spec.model import Limits

KiB, MiB = 1024, 1 << 20


@pytest.fixture(autouse=True, params=["paired", "pooled"])
def way(request, monkeypatch):
    """Every test runs with the upstream connection the downstream one's own (paired) and with
    it a carrier the splice is handed per request (pooled)."""
    monkeypatch.setattr(Hop, "pooled", request.param == "pooled")


class Hop:
    """kiosk → [down | splice | up] → origin, on a clock the test sets."""

    pooled = False

    def __init__(self, slow_read: float | None = None, response_timeout: float = 30.0, room=None) -> None:
        self.now = 0.0
        self.kiosk, self.down = LeanClientCore(), LeanServerCore(limits=Limits())
        self.up, self.origin = LeanClientCore(), LeanServerCore(limits=Limits())
        self.held: list[int] = []
        self.stalls = 0
        self.splice = Splice(
            self.down,
            None if self.pooled else self.up,
            stamp=self.stamp,
            observe=lambda d, n, held: self.held.append(held),
            on_stall=self._stalled,
            clock=lambda: self.now,
            response_timeout=response_timeout,
            slow_read=slow_read,
            room=room,
        )
        self.carrier = Carrier(self.up) if self.pooled else self.splice.carrier
        self.requests: list = []  # what reached the origin
        self.pump()

    def _stalled(self) -> None:
        self.stalls += 1

    @staticmethod
    def stamp(pair: Pair, headers: Headers) -> Headers:
        return [*headers, (b"server-timing", b"relay;dur=0.1")]

    def pump(self) -> None:
        """Move bytes every way until nothing moves; the relay forwards new requests at once."""
        while True:
            moved = False
            if data := self.kiosk.data_to_send():
                woken = self.down.receive_data(data)
                while self.down.new_requests:
                    st = self.down.new_requests.popleft()
                    assert self.splice.open(st, st.headers or [], 0.0, self.carrier) is not None
                self.splice.down_events(woken)
                moved = True
            if data := self.down.data_to_send():
                self.kiosk.receive_data(data)
                moved = True
            if data := self.up.data_to_send():
                self.origin.receive_data(data)
                while self.origin.new_requests:
                    self.requests.append(self.origin.new_requests.popleft())
                moved = True
            if data := self.origin.data_to_send():
                self.carrier.events(self.up.receive_data(data))
                moved = True
            if not moved:
                return

    def get(self, path: str = "/bench/blob", body: bytes = b""):
        st = self.kiosk.send_request(request_headers("POST" if body else "GET", path, "relay"), end_stream=not body)
        if body:
            self.kiosk.send_data(st.id, body, end_stream=True)
        self.pump()
        return st


def _drain(core: LeanClientCore, st) -> bytes:
    out = []
    while (chunk := core.take_chunk(st)) is not None:
        out.append(chunk)
        core.ack(st.id, len(chunk))
    return b"".join(out)


def test_a_response_crosses_the_hop_with_its_body_trailers_and_this_hops_timing():
    hop = Hop()
    ks = hop.get()
    origin_st = hop.requests[0]
    body = bytes(range(256)) * 1024  # 256 KiB: more than a stream window, so acks must flow back
    hop.origin.send_headers(origin_st.id, [(b":status", b"200")])
    sent, received = 0, bytearray()
    while sent < len(body):
        sent += hop.origin.send_data(origin_st.id, memoryview(body)[sent:])
        hop.pump()
        received += _drain(hop.kiosk, ks)  # the kiosk reads and acks: windows reopen hop by hop
        hop.pump()
    hop.origin.end_stream(origin_st.id, [(b"konbini-binding", b"sig")])
    hop.pump()
    received += _drain(hop.kiosk, ks)
    assert (b"server-timing", b"relay;dur=0.1") in ks.headers
    assert bytes(received) == body
    assert ks.trailers == [(b"konbini-binding", b"sig")] and ks.ended
    assert not hop.splice.by_down and not hop.carrier.pairs  # the pair left the splice


def test_an_upload_larger_than_the_windows_reaches_the_origin_whole_and_the_hop_holds_one_window():
    hop = Hop()
    body = b"u" * (2 * MiB)
    ks = hop.kiosk.send_request(request_headers("POST", "/up", "relay"), end_stream=False)
    sent = 0
    received = bytearray()
    origin_st = None
    while sent < len(body) or not (origin_st is not None and origin_st.ended):
        if sent < len(body):
            sent += hop.kiosk.send_data(ks.id, memoryview(body)[sent:], end_stream=True)
        hop.pump()
        if origin_st is None and hop.requests:
            origin_st = hop.requests[0]
        if origin_st is not None:
            received += _drain(hop.origin, origin_st)
        hop.pump()
    assert bytes(received) == body
    assert max(hop.held) <= STREAM_WINDOW + MAX_FRAME_SIZE


def test_a_kiosk_reset_cancels_the_stream_upstream_and_gives_back_every_byte_of_window():
    hop = Hop()
    ks = hop.get()
    origin_st = hop.requests[0]
    hop.origin.send_headers(origin_st.id, [(b":status", b"200")])
    for _ in range(2):  # the kiosk does not read: its window fills, then the relay holds the next chunk
        hop.origin.send_data(origin_st.id, b"d" * hop.origin.sendable(origin_st.id))
        hop.pump()
    assert hop.splice.by_down[ks.id].response is not None  # still crossing, a chunk in hand
    hop.kiosk.reset(ks.id, CANCEL)
    hop.pump()
    assert origin_st.reset_code == CANCEL
    assert not hop.splice.by_down
    # every byte the relay received from the origin was acked, the chunk in hand too (h2 sends the
    # connection's WINDOW_UPDATE in batches, so the relay's own count is the one to look at)
    assert hop.up._processed == CONNECTION_WINDOW - hop.up.recv_window > 0


def test_an_origin_reset_reaches_the_kiosk():
    hop = Hop()
    ks = hop.get()
    hop.origin.reset(hop.requests[0].id, INTERNAL_ERROR)
    hop.pump()
    assert ks.reset_code == CANCEL and not hop.splice.by_down


def test_a_request_not_answered_in_time_is_handed_back_and_reset_upstream():
    hop = Hop(response_timeout=5.0)
    ks = hop.get()
    assert hop.splice.next_deadline() == pytest.approx(5.0)
    assert hop.splice.overdue(4.9) == []
    late = hop.splice.overdue(5.0)
    assert [st.id for st in late] == [ks.id]
    hop.pump()
    assert hop.requests[0].reset_code == CANCEL and not hop.splice.by_down


def test_a_kiosk_keeping_its_window_shut_is_reported_after_slow_read():
    hop = Hop(slow_read=1.0)
    hop.get()
    origin_st = hop.requests[0]
    hop.origin.send_headers(origin_st.id, [(b":status", b"200")])
    hop.origin.send_data(origin_st.id, b"x" * (hop.origin.sendable(origin_st.id)))
    hop.pump()  # the kiosk's 128 KiB stream window is full; the relay has the origin's 128 KiB in hand
    hop.origin.send_data(origin_st.id, b"y")
    hop.pump()
    assert hop.stalls == 1
    assert not hop.splice.stalled(0.5) and hop.splice.next_deadline() == pytest.approx(1.0)
    assert hop.splice.stalled(1.0)


def test_a_response_waits_unacked_upstream_while_the_downstream_output_queue_is_full():
    room = [0]
    hop = Hop(room=lambda: room[0])
    ks = hop.get()
    origin_st = hop.requests[0]
    hop.origin.send_headers(origin_st.id, [(b":status", b"200")])
    hop.origin.send_data(origin_st.id, b"r" * (64 * KiB), end_stream=True)
    hop.pump()
    assert ks.headers is not None and not ks.chunks  # headers went; no room for the body
    up_st = hop.splice.by_down[ks.id].up
    assert up_st.buffered + len(hop.splice.by_down[ks.id].response or b"") == 64 * KiB  # held once, unacked
    room[0] = 16 * KiB
    hop.splice.drained()
    hop.pump()
    assert sum(len(c) for c, _ in ks.chunks) == 16 * KiB and not ks.ended
    room[0] = 1 << 30
    hop.splice.drained()
    hop.pump()
    assert sum(len(c) for c, _ in ks.chunks) == 64 * KiB and ks.ended and not hop.splice.by_down


def test_a_second_request_on_the_connection_gets_its_own_upstream_stream():
    hop = Hop()
    a, b = hop.get("/a"), hop.get("/b")
    first, second = hop.requests
    assert [h for h in first.headers if h[0] == b":path"] == [(b":path", b"/a")]
    assert [h for h in second.headers if h[0] == b":path"] == [(b":path", b"/b")]
    hop.origin.send_headers(second.id, [(b":status", b"204")], end_stream=True)
    hop.origin.send_headers(first.id, [(b":status", b"200")], end_stream=True)
    hop.pump()
    assert (a.headers[0], b.headers[0]) == ((b":status", b"200"), (b":status", b"204"))


def test_the_h2cost_bench_takes_every_request_across_the_hop():
    assert relay_hop(50, 0) > 0 and relay_hop(20, 64 * KiB) > 0  # raises if a request stayed half across


def test_a_request_beyond_the_upstreams_stream_limit_is_not_opened():
    kiosk, down = LeanClientCore(), LeanServerCore(limits=Limits())
    up, origin = LeanClientCore(), LeanServerCore(limits=Limits(max_concurrent_streams=1))
    for client, server in ((kiosk, down), (up, origin)):
        server.receive_data(client.data_to_send())
        client.receive_data(server.data_to_send())
        server.receive_data(client.data_to_send())
    splice = Splice(down, up, stamp=Hop.stamp)
    for path in ("/a", "/b"):
        kiosk.send_request(request_headers("GET", path, "relay"), end_stream=True)
    down.receive_data(kiosk.data_to_send())
    first, second = down.new_requests
    assert splice.open(first, first.headers, 0.0) is not None
    assert splice.open(second, second.headers, 0.0) is None  # the relay refuses it (REFUSED_STREAM), unprocessed
    assert len(splice.by_down) == 1


def test_answered_requests_behind_a_slow_one_do_not_pile_up_in_the_deadline_queue():
    hop = Hop()
    slow = hop.get("/slow")
    for _ in range(300):
        hop.get("/fast")
        fast = hop.requests[-1]
        hop.origin.send_headers(fast.id, [(b":status", b"204")], end_stream=True)
        hop.pump()
    assert len(hop.splice.by_down) == 1 and len(hop.splice.unanswered) <= 4 + 64 + 1
    assert hop.splice.overdue(30.0) == [hop.down.streams[slow.id]]  # the slow one still times out


def test_a_steady_upload_longer_than_the_response_timeout_is_not_cut_and_its_timeout_runs_from_its_end():
    hop = Hop(response_timeout=5.0)
    ks = hop.kiosk.send_request(request_headers("POST", "/up", "relay"), end_stream=False)
    origin_st = None
    for second in range(12):  # 1 KiB a second for 12 s: each piece moves the request on
        hop.now = float(second)
        hop.kiosk.send_data(ks.id, b"u" * KiB)
        hop.pump()
        assert hop.splice.overdue(hop.now) == []
        origin_st = origin_st or hop.requests[0]
        _drain(hop.origin, origin_st)
        hop.pump()
    hop.now = 12.0
    hop.kiosk.end_stream(ks.id)
    hop.pump()
    assert origin_st.ended  # the request is whole upstream: 5 s for the answer from now
    assert hop.splice.next_deadline() == pytest.approx(17.0)
    assert hop.splice.overdue(16.9) == []
    assert [st.id for st in hop.splice.overdue(17.0)] == [ks.id]


def test_an_upload_that_stops_moving_is_cut_off_after_the_response_timeout():
    hop = Hop(response_timeout=5.0)
    ks = hop.kiosk.send_request(request_headers("POST", "/up", "relay"), end_stream=False)
    hop.now = 2.0
    hop.kiosk.send_data(ks.id, b"u" * KiB)
    hop.pump()
    assert hop.splice.next_deadline() == pytest.approx(7.0)  # from the body's last progress
    assert hop.splice.overdue(6.9) == []
    assert [st.id for st in hop.splice.overdue(7.0)] == [ks.id]
    hop.pump()
    assert hop.requests[0].reset_code == CANCEL and not hop.splice.by_down
