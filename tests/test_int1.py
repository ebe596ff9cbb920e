"""INT-1 on shared connections, without sockets: the ways real proxies have handed one client's
response to another, replayed against konbini's lean cores and the relay's splice (docs/int1.md).

Each case is a `check_*` function that raises (AssertionError, or ConnectionClosed where a core
gives up) when a response reaches the wrong stream. The plain test runs it on the real code; its
mutation test runs it again on a deliberately broken variant of the component where the bug
lived, monkeypatched for that test alone, and requires the check to catch it. So a check that
cannot fail cannot pass here.

- redis-py 2023 (the ChatGPT exposure): a request cancelled after it was sent and before its
  response was read, the connection then reused for the next request;
- HAProxy 2019: a header block (trailers) arriving on a stream already reset must still be
  HPACK-decoded, or the connection's dynamic table drifts and later streams read other streams'
  headers;
- Tomcat CVE-2020-17527: a header value carried over from a previous stream on the connection;
- one stream failing (reset by either side, or late) must not truncate or reset the other
  streams sharing its connections.
"""

from __future__ import annotations

import hpack
import pytest

from gateway.protocol import fieldcodec
from gateway.protocol import splice as splice_module
from gateway.protocol.errors import ConnectionClosed
from gateway.protocol.fieldcodec import FieldDecoder, FieldEncoder
from gateway.protocol.frames import END_HEADERS, END_STREAM, HEADERS, PREFACE, SETTINGS, frame
from gateway.protocol.h2lean import LeanClientCore, LeanCore, LeanServerCore
from gateway.protocol.http import request_headers
from gateway.protocol.splice import Pair, Splice
from gateway.protocol.streams import Headers, StreamState
from tests.h2peer import H2End
from topology.spec.model import Limits

CAUGHT = (AssertionError, ConnectionClosed)
STAMP = (b"server-timing", b"relay;dur=0.1")


def carried(splice: Splice, pair: Pair) -> tuple[object, dict[int, Pair]]:
    """The core of the upstream connection that carries `pair`, and that connection's pairs by
    upstream stream id: the splice's own (paired relays) or the pair's carrier's (pooled)."""
    carrier = getattr(pair, "carrier", None)
    if carrier is not None:
        return carrier.core, carrier.pairs
    return splice.up, splice.by_up


def caught(check, *args) -> bool:
    """Whether `check` found the wrong delivery it looks for."""
    try:
        check(*args)
    except CAUGHT:
        return True
    return False


def drain(core, st: StreamState) -> bytes:
    out = []
    while (chunk := core.take_chunk(st)) is not None:
        out.append(chunk)
        core.ack(st.id, len(chunk))
    return b"".join(out)


class Wire:
    """A client core and a server core joined back to back; bytes move when the test says."""

    def __init__(self, client, server) -> None:
        self.client, self.server = client, server
        self.requests: dict[int, StreamState] = {}

    def to_server(self) -> None:
        if data := self.client.data_to_send():
            self.server.receive_data(data)
            while self.server.new_requests:
                st = self.server.new_requests.popleft()
                self.requests[st.id] = st

    def to_client(self) -> None:
        if data := self.server.data_to_send():
            self.client.receive_data(data)

    def pump(self) -> None:
        while self.client.pending_output or self.server.pending_output:
            self.to_server()
            self.to_client()


class Hop:
    """kiosk → [down | splice | up] → origin: a relay's two lean cores spliced as `Relay` splices
    them; the kiosk and the origin are h2 itself (`H2End`), whose HPACK encoder indexes every field
    it may (the lean encoder never does), so the relay's decoders keep a dynamic table on both sides."""

    def __init__(self, response_timeout: float = 30.0) -> None:
        self.now = 0.0
        self.kiosk, self.down = H2End(client_side=True), LeanServerCore(limits=Limits())
        self.up, self.origin = LeanClientCore(), H2End(client_side=False)
        self.splice = Splice(
            self.down, self.up, stamp=self.stamp, clock=lambda: self.now, response_timeout=response_timeout
        )
        self.requests: dict[int, StreamState] = {}  # what reached the origin, by its stream id
        self.late: list[StreamState] = []  # what the relay answered 504
        self.pump()

    @staticmethod
    def stamp(pair: Pair, headers: Headers) -> Headers:
        return [*headers, STAMP]

    def kiosk_to_relay(self) -> bool:
        if not (data := self.kiosk.data_to_send()):
            return False
        woken = self.down.receive_data(data)
        while self.down.new_requests:
            st = self.down.new_requests.popleft()
            assert self.splice.open(st, st.headers or [], 0.0) is not None
        self.splice.down_events(woken)
        return True

    def relay_to_origin(self) -> bool:
        if not (data := self.up.data_to_send()):
            return False
        self.origin.receive_data(data)
        while self.origin.new_requests:
            st = self.origin.new_requests.popleft()
            self.requests[st.id] = st
        return True

    def origin_to_relay(self) -> bool:
        if not (data := self.origin.data_to_send()):
            return False
        self.splice.up_events(self.up.receive_data(data))
        return True

    def relay_to_kiosk(self) -> bool:
        if not (data := self.down.data_to_send()):
            return False
        self.kiosk.receive_data(data)
        return True

    def pump(self) -> None:
        while self.kiosk_to_relay() | self.relay_to_origin() | self.origin_to_relay() | self.relay_to_kiosk():
            pass

    def tick(self, seconds: float) -> None:
        self.now += seconds
        self.late += self.splice.overdue(self.now)
        self.pump()


def origin_request(hop: Hop, path: bytes) -> StreamState:
    return next(st for st in hop.requests.values() if (b":path", path) in (st.headers or []))


# -- redis-py 2023: a cancelled request's connection reused ---------------------------------------


def check_a_cancelled_requests_late_response_never_reaches_the_next_request(client_class=LeanClientCore) -> None:
    """Request A is sent and answered whole (its response on the wire, unread), then cancelled by its
    caller (`H2Driver.release`: reset, forget) before its response is read; the next request on the
    same connection must read its own response, never A's."""
    wire = Wire(client_class(), LeanServerCore(limits=Limits()))
    a = wire.client.send_request(request_headers("POST", "/v1/document", "muni-a"), end_stream=True)
    wire.to_server()
    origin_a = wire.requests[a.id]
    wire.server.send_headers(origin_a.id, [(b":status", b"200"), (b"konbini-issuance-id", b"iss-A")])
    wire.server.send_data(origin_a.id, b"%PDF resident A")
    wire.server.end_stream(origin_a.id, [(b"konbini-binding", b"bind-A")])
    wire.client.reset(a.id)  # the caller gave up: A's response is on its way and nobody reads it
    wire.client.forget(a.id)
    b = wire.client.send_request(request_headers("POST", "/v1/document", "muni-a"), end_stream=True)
    wire.to_client()  # A's response arrives after B went out
    wire.to_server()
    if b.id in wire.requests and wire.requests[b.id] is not origin_a:
        origin_b = wire.requests[b.id]
        wire.server.send_headers(origin_b.id, [(b":status", b"200"), (b"konbini-issuance-id", b"iss-B")])
        wire.server.send_data(origin_b.id, b"%PDF resident B")
        wire.server.end_stream(origin_b.id, [(b"konbini-binding", b"bind-B")])
    wire.pump()
    assert b.headers == [(b":status", b"200"), (b"konbini-issuance-id", b"iss-B")], b.headers
    assert drain(wire.client, b) == b"%PDF resident B"
    assert b.trailers == [(b"konbini-binding", b"bind-B")] and b.ended


def test_a_cancelled_requests_late_response_never_reaches_the_next_request():
    """Checked: fails on a client core that gives the cancelled stream's id to the next request
    (the next test): B reads A's headers."""
    check_a_cancelled_requests_late_response_never_reaches_the_next_request()


def test_the_cancelled_request_check_catches_a_client_that_reuses_the_cancelled_stream(monkeypatch):
    """Broken variant: a client core that hands a cancelled stream's id to the next request (the
    connection goes back to the pool as if the cancelled request had never been sent), so the
    response still in flight for it is read by the next caller, as redis-py's was."""

    def forget(self, stream_id: int) -> None:
        LeanCore.forget(self, stream_id)
        if stream_id == self._next_id - 2:
            self._next_id = stream_id

    monkeypatch.setattr(LeanClientCore, "forget", forget)
    assert caught(check_a_cancelled_requests_late_response_never_reaches_the_next_request)


def check_a_cancelled_request_through_the_relay_leaves_the_next_its_own_response() -> None:
    """The same through a relay: the kiosk cancels A while A's whole response crosses the relay;
    B, opened next on the same connections, gets B's headers, body and trailers."""
    hop = Hop()
    a = hop.kiosk.send_request(request_headers("GET", "/a", "center"), end_stream=True)
    hop.pump()
    oa = origin_request(hop, b"/a")
    hop.origin.send_headers(oa.id, [(b":status", b"200"), (b"konbini-issuance-id", b"iss-A")])
    hop.origin.send_data(oa.id, b"%PDF resident A")
    hop.origin.end_stream(oa.id, [(b"konbini-binding", b"bind-A")])
    hop.kiosk.reset(a.id)
    hop.kiosk.forget(a.id)
    hop.kiosk_to_relay()  # the cancel reaches the relay, then B does, both before A's answer
    b = hop.kiosk.send_request(request_headers("GET", "/b", "center"), end_stream=True)
    hop.kiosk_to_relay()
    hop.origin_to_relay()
    hop.pump()
    ob = origin_request(hop, b"/b")
    if ob.reset_code is None:
        hop.origin.send_headers(ob.id, [(b":status", b"200"), (b"konbini-issuance-id", b"iss-B")])
        hop.origin.send_data(ob.id, b"%PDF resident B")
        hop.origin.end_stream(ob.id, [(b"konbini-binding", b"bind-B")])
        hop.pump()
    assert b.headers == [(b":status", b"200"), (b"konbini-issuance-id", b"iss-B"), STAMP], b.headers
    assert drain(hop.kiosk, b) == b"%PDF resident B"
    assert b.trailers == [(b"konbini-binding", b"bind-B")]
    assert not hop.splice.by_down


def test_a_cancelled_request_through_the_relay_leaves_the_next_its_own_response():
    """Checked: fails on a splice that hands a cancelled request's upstream stream to the next
    request (the next test): B reads `iss-A`."""
    check_a_cancelled_request_through_the_relay_leaves_the_next_its_own_response()


def test_the_relay_cancel_check_catches_a_splice_that_pairs_by_position(monkeypatch):
    """Broken variant: a splice that, when a kiosk cancels, forgets the pair downstream but keeps
    the upstream stream and hands it to the next request (a FIFO of upstream streams, as a
    connection pool of HTTP/1.1 connections would): B reads A's response."""
    spare: list[StreamState] = []
    real_open, real_service = Splice.open, Splice._service

    def service(self, pair):
        if pair.down.reset_code is not None and not pair.over:
            self._leave(pair)
            self.down.forget(pair.down.id)
            spare.append(pair.up)  # "still good": the next request takes it
            return
        real_service(self, pair)

    def open_(self, st, headers, read_at, *rest):
        pair = real_open(self, st, headers, read_at, *rest)
        if pair is not None and spare:
            core, pairs = carried(self, pair)
            pairs.pop(pair.up.id, None)
            core.reset(pair.up.id)
            pair.up = spare.pop(0)
            pairs[pair.up.id] = pair
        return pair

    monkeypatch.setattr(Splice, "_service", service)
    monkeypatch.setattr(Splice, "open", open_)
    assert caught(check_a_cancelled_request_through_the_relay_leaves_the_next_its_own_response)


# -- HAProxy 2019: trailers on a reset stream must still be decoded ---------------------------------


def skip_blocks_of_reset_streams(monkeypatch) -> None:
    """Broken variant: a core that saves work by not decoding a header block on a stream it has
    already reset or forgotten (HAProxy's 2019 bug): its HPACK dynamic table misses the block's
    insertions, and every later index on the connection points one entry off."""
    real = LeanCore._headers

    def headers(self, woken):
        sid = self._block_stream
        state = self._state.get(sid)
        if (state is None and not self._idle(sid)) or (state is not None and state.reset):
            self._block = None
            return
        real(self, woken)

    monkeypatch.setattr(LeanCore, "_headers", headers)


def check_a_client_core_decodes_trailers_on_a_stream_it_reset() -> None:
    """The server's encoder indexes A's fields, A is reset, A's trailers (a new entry) cross the
    reset, then B's response refers to an earlier entry by index: B must read its own field."""
    client, enc = LeanClientCore(), hpack.Encoder()
    a = client.send_request(request_headers("GET", "/a", "center"), end_stream=True)
    b = client.send_request(request_headers("GET", "/b", "center"), end_stream=True)
    client.data_to_send()
    a_head = [(b":status", b"200"), (b"konbini-issuance-id", b"iss-A"), (b"content-type", b"application/pdf")]
    client.receive_data(frame(HEADERS, END_HEADERS, a.id, enc.encode(a_head)))
    client.reset(a.id)
    client.forget(a.id)
    client.receive_data(frame(HEADERS, END_HEADERS | END_STREAM, a.id, enc.encode([(b"konbini-binding", b"bind-A")])))
    b_head = [(b":status", b"200"), (b"content-type", b"application/pdf")]
    client.receive_data(frame(HEADERS, END_HEADERS | END_STREAM, b.id, enc.encode(b_head)))
    assert b.headers == b_head, b.headers


def check_a_server_core_decodes_trailers_on_a_stream_it_reset() -> None:
    """The request side: the client's trailers on A arrive after the server reset A; B's request,
    whose fields refer to A's by index, must reach the server as the client sent it."""
    server, enc = LeanServerCore(limits=Limits()), hpack.Encoder()
    server.receive_data(PREFACE + frame(SETTINGS, 0, 0))
    a_head = [*request_headers("POST", "/a", "center"), (b"konbini-card", b"card-A"), (b"konbini-kiosk", b"kiosk-a1-1")]
    server.receive_data(frame(HEADERS, END_HEADERS, 1, enc.encode(a_head)))
    server.new_requests.clear()
    server.reset(1)  # refused: say a body it does not want
    server.forget(1)
    server.receive_data(frame(HEADERS, END_HEADERS | END_STREAM, 1, enc.encode([(b"konbini-sum", b"sum-a")])))
    b_head = [*request_headers("POST", "/b", "issuance-center"), (b"konbini-kiosk", b"kiosk-a1-1")]
    server.receive_data(frame(HEADERS, END_HEADERS | END_STREAM, 3, enc.encode(b_head)))
    (b,) = server.new_requests
    assert b.headers == b_head, b.headers


def check_trailers_on_a_reset_stream_keep_the_relays_tables_in_step() -> None:
    """Through the relay: the kiosk cancels A while the origin sends A's trailers (its encoder adds
    them to the table); B's response, whose fields the origin encodes by index, must reach the
    kiosk as the origin sent it."""
    hop = Hop()
    a = hop.kiosk.send_request(request_headers("GET", "/a", "center"), end_stream=True)
    b = hop.kiosk.send_request(request_headers("GET", "/b", "center"), end_stream=True)
    hop.pump()
    oa, ob = origin_request(hop, b"/a"), origin_request(hop, b"/b")
    a_head = [(b":status", b"200"), (b"konbini-fee", b"200"), (b"konbini-issuance-id", b"iss-A")]
    hop.origin.send_headers(oa.id, [*a_head, (b"content-type", b"application/pdf")])
    hop.origin.send_data(oa.id, b"%PDF resident A")
    hop.pump()
    hop.kiosk.reset(a.id)
    hop.kiosk_to_relay()  # the relay resets A upstream; the reset has not reached the origin yet
    hop.origin.end_stream(oa.id, [(b"konbini-binding", b"bind-A")])
    hop.origin_to_relay()  # A's trailers cross the reset
    b_head = [(b":status", b"200"), (b"content-type", b"application/pdf"), (b"konbini-issuance-id", b"iss-B")]
    hop.origin.send_headers(ob.id, b_head)
    hop.origin.send_data(ob.id, b"%PDF resident B")
    hop.origin.end_stream(ob.id, [(b"konbini-binding", b"bind-B")])
    hop.pump()
    assert b.headers == [*b_head, STAMP], b.headers
    assert drain(hop.kiosk, b) == b"%PDF resident B" and b.trailers == [(b"konbini-binding", b"bind-B")]


DRIFT = [
    check_a_client_core_decodes_trailers_on_a_stream_it_reset,
    check_a_server_core_decodes_trailers_on_a_stream_it_reset,
    check_trailers_on_a_reset_stream_keep_the_relays_tables_in_step,
]


@pytest.mark.parametrize("check", DRIFT, ids=["client-core", "server-core", "relay"])
def test_header_blocks_on_reset_streams_are_decoded_so_later_streams_read_their_own_headers(check):
    """Checked: each fails on a core that skips header blocks of reset streams (the next test):
    B reads A's `konbini-issuance-id` (client core), `konbini-card` (server core), `iss-A` (relay)."""
    check()


@pytest.mark.parametrize("check", DRIFT, ids=["client-core", "server-core", "relay"])
def test_the_drift_check_catches_a_core_that_skips_blocks_of_reset_streams(check, monkeypatch):
    skip_blocks_of_reset_streams(monkeypatch)
    assert caught(check)


# -- Tomcat CVE-2020-17527: no header value carried over ---------------------------------------------


STREAMS = 24


def request_of(i: int) -> Headers:
    """Stream i's request: its own kiosk and store, and a field only some streams send."""
    extra = [(b"x-only-some", f"v{i}".encode())] if i % 3 == 0 else []
    return request_headers(
        "POST",
        f"/v1/session/s{i}/issue",
        "issuance-center",
        [(b"konbini-kiosk", f"kiosk-{i}".encode()), (b"konbini-store", f"store-{i % 5}".encode()), *extra],
    )


def response_of(i: int) -> Headers:
    extra = [(b"konbini-fee", f"{100 + i}".encode())] if i % 2 == 0 else []
    return [(b":status", b"200"), (b"konbini-issuance-id", f"iss-{i}".encode()), *extra]


def check_no_header_value_carries_over_between_streams_through_the_relay() -> None:
    """STREAMS requests on one kiosk connection through the relay to the origin, interleaved, each
    with its own values and some with a field the others lack; answered in reverse order. Every
    request and response arrives with exactly its own fields."""
    hop = Hop()
    sent = {}
    for i in range(STREAMS):
        st = hop.kiosk.send_request(request_of(i), end_stream=True)
        sent[i] = st
        if i % 4 == 3:
            hop.pump()
    hop.pump()
    by_path = {dict(st.headers)[b":path"]: st for st in hop.requests.values()}
    assert len(by_path) == STREAMS
    for i in range(STREAMS):
        got = by_path[f"/v1/session/s{i}/issue".encode()].headers
        assert got == request_of(i), (i, got)
    for i in reversed(range(STREAMS)):
        ost = by_path[f"/v1/session/s{i}/issue".encode()]
        hop.origin.send_headers(ost.id, response_of(i))
        hop.origin.end_stream(ost.id, [(b"konbini-binding", f"bind-{i}".encode())] if i % 2 else None)
        if i % 4 == 0:
            hop.pump()
    hop.pump()
    for i, st in sent.items():
        assert st.headers == [*response_of(i), STAMP], (i, st.headers)
        assert st.trailers == ([(b"konbini-binding", f"bind-{i}".encode())] if i % 2 else None), (i, st.trailers)


def test_no_header_value_carries_over_between_streams_on_a_connection():
    """Checked: fails on an encoder caching bytes by name (every `:path` is the first one's) and
    on a decoder filling fields in from the previous block (the next test)."""
    check_no_header_value_carries_over_between_streams_through_the_relay()


def encoder_caching_by_name(monkeypatch) -> None:
    """Broken variant: the encoder's byte cache keyed by the field's name (values of one name
    "rarely change"): the first stream's value is what every later stream sends."""
    real = fieldcodec._encode_field
    cache: dict[bytes, bytes] = {}

    def encode(self, headers):
        return b"".join(cache.setdefault(name, real(name, value)) for name, value in headers)

    monkeypatch.setattr(FieldEncoder, "encode", encode)


def decoder_keeping_fields(monkeypatch) -> None:
    """Broken variant: a decoder that keeps the fields of the connection's previous header block
    and fills in those the next block lacks (Tomcat's reused header buffer)."""
    real = FieldDecoder.decode

    def decode(self, data):
        fields = real(self, data)
        kept = getattr(self, "kept", [])
        names = {n for n, _ in fields}
        self.kept = [f for f in fields if not f[0].startswith(b":")]
        return fields + [f for f in kept if f[0] not in names and (fields[0][0].startswith(b":") or not fields)]

    monkeypatch.setattr(FieldDecoder, "decode", decode)


@pytest.mark.parametrize("broken", [encoder_caching_by_name, decoder_keeping_fields], ids=["encoder", "decoder"])
def test_the_carry_over_check_catches_a_core_that_reuses_a_previous_streams_value(broken, monkeypatch):
    broken(monkeypatch)
    assert caught(check_no_header_value_carries_over_between_streams_through_the_relay)


# -- one stream failing leaves the others whole ------------------------------------------------------


BODY = 200 * 1024  # over three stream windows: every response crosses in several rounds of acks


def body_of(i: int) -> bytes:
    return bytes([65 + i]) * BODY


def check_one_failing_stream_leaves_the_others_whole() -> None:
    """Eight downloads share the relay's connections, interleaved; mid-body the origin resets one,
    the kiosk cancels another, and a third gets no answer in time (504 from the relay). The other
    five arrive whole, each with its own body and trailers, and nothing is left in the splice."""
    hop = Hop(response_timeout=5.0)
    n = 8
    sent = {i: hop.kiosk.send_request(request_headers("GET", f"/doc/{i}", "center"), end_stream=True) for i in range(n)}
    hop.pump()
    origin = {i: origin_request(hop, f"/doc/{i}".encode()) for i in range(n)}
    silent, reset_by_origin, cancelled_by_kiosk = 2, 5, 6
    offset = dict.fromkeys(range(n), 0)
    for i in range(n):
        if i != silent:
            hop.origin.send_headers(origin[i].id, [(b":status", b"200")])
    got: dict[int, bytearray] = {i: bytearray() for i in range(n)}
    rounds = 0
    while any(offset[i] < BODY for i in range(n) if i not in (silent, reset_by_origin, cancelled_by_kiosk)):
        rounds += 1
        assert rounds < 1000, "the downloads stopped moving"
        for i in range(n):
            if i == silent or offset[i] >= BODY:
                continue
            if rounds == 3 and i == reset_by_origin:
                hop.origin.reset(origin[i].id)
                offset[i] = BODY
                continue
            if rounds == 3 and i == cancelled_by_kiosk:
                hop.kiosk.reset(sent[i].id)
                offset[i] = BODY
                continue
            if origin[i].reset_code is not None:
                offset[i] = BODY
                continue
            take = hop.origin.send_data(origin[i].id, memoryview(body_of(i))[offset[i] :][:16384])
            offset[i] += take
            if offset[i] >= BODY:
                hop.origin.end_stream(origin[i].id, [(b"konbini-binding", f"bind-{i}".encode())])
        hop.pump()
        for i, st in sent.items():
            if st.reset_code is None:
                got[i] += drain(hop.kiosk, st)
        hop.pump()
    hop.tick(6.0)  # past the response timeout: the silent stream is cut, and only it
    for i, st in sent.items():
        if st.reset_code is None:
            got[i] += drain(hop.kiosk, st)
    for i, st in sent.items():
        if i in (silent, reset_by_origin, cancelled_by_kiosk):
            assert i == silent or st.reset_code is not None, i
            continue
        assert st.reset_code is None and st.ended, f"stream {i} reset or cut at {len(got[i])} bytes"
        assert bytes(got[i]) == body_of(i), (i, len(got[i]))
        assert st.trailers == [(b"konbini-binding", f"bind-{i}".encode())], i
    assert [st.id for st in hop.late] == [sent[silent].id]
    assert origin[silent].reset_code is not None  # cancelled at the origin too
    assert not hop.splice.by_down


def test_one_failing_stream_leaves_the_others_whole():
    """Checked: fails on a splice that resets every request on a stream's reset (the next test):
    "stream 0 reset or cut at 32768 bytes"."""
    check_one_failing_stream_leaves_the_others_whole()


def test_the_whole_streams_check_catches_a_splice_that_takes_a_stream_error_for_the_connections(monkeypatch):
    """Broken variant: a splice that answers any stream's reset by resetting every request on the
    connection (a stream error handled as a connection error)."""
    real = Splice._service

    def service(self, pair):
        if pair.down.reset_code is not None or pair.up.reset_code is not None:
            self.close()
            return
        real(self, pair)

    monkeypatch.setattr(Splice, "_service", service)
    assert caught(check_one_failing_stream_leaves_the_others_whole)


# -- pooled relays: many clients' streams on one upstream connection ---------------------------------

Carrier = getattr(splice_module, "Carrier", None)  # a pooled relay's shared upstream connection (issue 31 item 1)
pooled_only = pytest.mark.skipif(Carrier is None, reason="relays pair only")


class PooledHop:
    """Two kiosks' connections → [down | splice] each → one carrier (a pooled upstream connection)
    → origin: the splices share the carrier as a pooled relay's do."""

    def __init__(self) -> None:
        self.kiosks = [H2End(client_side=True) for _ in range(2)]
        self.downs = [LeanServerCore(limits=Limits()) for _ in range(2)]
        self.up, self.origin = LeanClientCore(), H2End(client_side=False)
        self.carrier = Carrier(self.up)
        self.splices = [Splice(down, None, stamp=Hop.stamp, clock=lambda: 0.0) for down in self.downs]
        self.requests: dict[bytes, StreamState] = {}  # what reached the origin, by path
        self.pump()

    def pump(self) -> None:
        moved = True
        while moved:
            moved = False
            for kiosk, down, splice in zip(self.kiosks, self.downs, self.splices, strict=True):
                if not down.closed and (data := kiosk.data_to_send()):
                    woken = down.receive_data(data)
                    while down.new_requests:
                        st = down.new_requests.popleft()
                        assert splice.open(st, st.headers or [], 0.0, self.carrier) is not None
                    splice.down_events(woken)
                    moved = True
                if (data := down.data_to_send()) and not kiosk.closed:
                    kiosk.receive_data(data)
                    moved = True
            if data := self.up.data_to_send():
                self.origin.receive_data(data)
                while self.origin.new_requests:
                    st = self.origin.new_requests.popleft()
                    self.requests[dict(st.headers)[b":path"]] = st
                moved = True
            if data := self.origin.data_to_send():
                self.carrier.events(self.up.receive_data(data))
                moved = True


def check_a_dying_client_connection_leaves_the_others_on_the_carrier_whole() -> None:
    """Kiosks 0 and 1 each download three documents over one carrier, interleaved, each request
    with its own kiosk field (kiosk 0's with a field kiosk 1's lack). Midway kiosk 0's connection
    dies (its splice closes, as a relay's does at a connection's end): its three streams are reset
    at the origin; kiosk 1's three arrive whole, with their own headers, body and trailers."""
    hop = PooledHop()
    sent: dict[tuple[int, int], StreamState] = {}
    for n in range(3):
        for k, kiosk in enumerate(hop.kiosks):
            extra = [(b"x-only-kiosk-0", b"secret-0")] if k == 0 else []
            headers = request_headers(
                "GET", f"/doc/{k}/{n}", "center", [(b"konbini-kiosk", f"kiosk-{k}".encode()), *extra]
            )
            sent[k, n] = kiosk.send_request(headers, end_stream=True)
    hop.pump()
    for k, n in sent:
        got = hop.requests[f"/doc/{k}/{n}".encode()].headers
        assert (b"konbini-kiosk", f"kiosk-{k}".encode()) in got and ((b"x-only-kiosk-0", b"secret-0") in got) == (
            k == 0
        )
    origin = {key: hop.requests[f"/doc/{key[0]}/{key[1]}".encode()] for key in sent}
    bodies = {key: bytes([65 + 3 * key[0] + key[1]]) * BODY for key in sent}
    offset = dict.fromkeys(sent, 0)
    got = {key: bytearray() for key in sent}
    for key, ost in origin.items():
        hop.origin.send_headers(ost.id, [(b":status", b"200"), (b"konbini-issuance-id", f"iss-{key}".encode())])
    rounds = 0
    while any(offset[key] < BODY and origin[key].reset_code is None for key in sent if key[0] == 1):
        rounds += 1
        assert rounds < 1000, "the downloads stopped moving"
        if rounds == 3:  # kiosk 0's connection dies
            hop.splices[0].close()
            hop.downs[0].close()
        for key, ost in origin.items():
            if offset[key] >= BODY or ost.reset_code is not None:
                continue
            offset[key] += hop.origin.send_data(ost.id, memoryview(bodies[key])[offset[key] :][:16384])
            if offset[key] >= BODY:
                hop.origin.end_stream(ost.id, [(b"konbini-binding", f"bind-{key}".encode())])
        hop.pump()
        for (k, n), st in sent.items():
            if k == 1 and st.reset_code is None:
                got[k, n] += drain(hop.kiosks[1], st)
        hop.pump()
    for n in range(3):
        st = sent[1, n]
        assert st.reset_code is None and st.ended, f"kiosk 1's stream {n} reset or cut at {len(got[1, n])} bytes"
        assert st.headers == [(b":status", b"200"), (b"konbini-issuance-id", f"iss-{(1, n)}".encode()), STAMP]
        assert bytes(got[1, n]) == bodies[1, n] and st.trailers == [(b"konbini-binding", f"bind-{(1, n)}".encode())]
        assert origin[0, n].reset_code is not None, f"kiosk 0's stream {n} still runs at the origin"
    assert not hop.carrier.pairs


@pooled_only
def test_a_dying_client_connection_leaves_the_others_on_a_pooled_connection_whole():
    """Checked: fails on a splice whose close resets every request on the carriers it used, as a
    paired relay's may (the next test): "kiosk 1's stream 0 reset or cut"."""
    check_a_dying_client_connection_leaves_the_others_on_the_carrier_whole()


@pooled_only
def test_the_pooled_check_catches_a_close_that_resets_the_whole_carrier(monkeypatch):
    """Broken variant: a downstream connection's end resets every request on the upstream
    connections its requests used, other clients' included (the paired relay's rule, kept when
    the upstream became shared)."""

    def close(self) -> None:
        for carrier in {pair.carrier for pair in self.by_down.values()}:
            for pair in list(carrier.pairs.values()):
                carrier.core.reset(pair.up.id)
                pair.splice.down.reset(pair.down.id)
                pair.splice._finish(pair)

    monkeypatch.setattr(Splice, "close", close)
    assert caught(check_a_dying_client_connection_leaves_the_others_on_the_carrier_whole)
