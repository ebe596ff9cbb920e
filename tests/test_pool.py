"""Pooled upstreams without sockets: several kiosks' connections into one relay, their streams
spliced onto a few shared upstream connections (`Carrier`s) that the pool picks, bytes moved by
hand. Each test names what pooling must keep true; each was checked to fail on a broken variant
of the code (named in the test)."""

from __future__ import annotations

import io
from pathlib import Path

import jsonschema
import msgspec
import pytest
import trio
import yaml

from gateway.business.clock import Clock
from gateway.protocol.errors import StreamReset
from gateway.protocol.frames import CANCEL, INTERNAL_ERROR
from gateway.protocol.h2lean import LeanClientCore, LeanServerCore
from gateway.protocol.http import request_headers
from gateway.protocol.interfaces import Core
from gateway.protocol.splice import Carrier, Pair, Splice
from gateway.protocol.streams import Headers, header
from gateway.transport.pool import Member, UpstreamPool
from kiosk_emu.kiosk import Kiosk
from tests.conftest import TEST_TIME
from topology.cli.expand import write_expanded
from topology.launch.loopback import run_topology
from topology.spec.expand import json_schema
from topology.spec.load import DEFAULT_TOPOLOGY, check_file, load_topology, read_yaml
from topology.spec.model import RELAY_KINDS, Limits, UpstreamConnections


def stamp(pair: Pair, headers: Headers) -> Headers:
    return headers


class Origin:
    """One pooled upstream connection: the relay's client core and the next hop's server core."""

    def __init__(self, name: str, max_streams: int = 1000) -> None:
        self.up = LeanClientCore()
        self.server = LeanServerCore(limits=Limits(max_concurrent_streams=max_streams))
        self.member = Member(name, Carrier(self.up))
        self.requests: list = []  # streams that reached the next hop, in order


class Relay:
    """`kiosks` downstream connections into one relay whose requests go out on the pool's carriers."""

    def __init__(self, kiosks: int, pool: UpstreamPool) -> None:
        self.pool = pool
        self.kiosks = [LeanClientCore() for _ in range(kiosks)]
        self.downs = [LeanServerCore(limits=Limits()) for _ in range(kiosks)]
        self.splices = [Splice(down, stamp=stamp) for down in self.downs]
        self.origins: list[Origin] = []
        self.parked = 0

    def add(self, origin: Origin, now: float = 0.0) -> Origin:
        self.pool.dialled(origin.member, now)
        self.origins.append(origin)
        self.pump()
        return origin

    def origin_of(self, st) -> Origin:
        return next(o for o in self.origins if st in o.requests)

    def pump(self) -> None:
        while True:
            moved = False
            for kiosk, down, splice in zip(self.kiosks, self.downs, self.splices, strict=True):
                if data := kiosk.data_to_send():
                    woken = down.receive_data(data)
                    while down.new_requests:
                        st = down.new_requests.popleft()
                        member = self.pool.pick()
                        if member is None:
                            self.parked += 1
                            continue
                        assert splice.open(st, st.headers or [], 0.0, member.carrier) is not None
                    splice.down_events(woken)
                    moved = True
                if data := down.data_to_send():
                    kiosk.receive_data(data)
                    moved = True
            for o in self.origins:
                if data := o.up.data_to_send():
                    o.server.receive_data(data)
                    while o.server.new_requests:
                        o.requests.append(o.server.new_requests.popleft())
                    moved = True
                if data := o.server.data_to_send():
                    o.member.carrier.events(o.up.receive_data(data))
                    moved = True
            if not moved:
                return

    def get(self, kiosk: int, path: str = "/v1/x"):
        st = self.kiosks[kiosk].send_request(request_headers("GET", path, "relay"), end_stream=True)
        self.pump()
        return st

    def answer(self, origin_st, body: bytes = b"doc") -> None:
        o = self.origin_of(origin_st)
        o.server.send_headers(origin_st.id, [(b":status", b"200")])
        o.server.send_data(origin_st.id, body, end_stream=True)
        self.pump()


def body_of(core: Core, st) -> bytes:
    out = b""
    while (chunk := core.take_chunk(st)) is not None:
        out += chunk
        core.ack(st.id, len(chunk))
    return out


def test_many_kiosk_connections_share_one_upstream_connection_and_each_gets_its_own_answer():
    relay = Relay(3, UpstreamPool(streams=100))
    origin = relay.add(Origin("dmz"))
    streams = [relay.get(k, f"/v1/k{k}") for k in range(3)]
    assert len(origin.requests) == 3 and len(relay.origins) == 1
    for st in reversed(origin.requests):  # answered out of order
        path = dict(st.headers)[b":path"]
        relay.answer(st, b"for " + path)
    for k, st in enumerate(streams):
        assert st.ended and body_of(relay.kiosks[k], st) == f"for /v1/k{k}".encode()


def test_a_connection_at_its_stream_limit_makes_the_pool_dial_another():
    # broken variant checked: `has_room` without the `streams` bound puts the third request on the first connection
    pool = UpstreamPool(streams=2)
    relay = Relay(2, pool)
    first = relay.add(Origin("dmz"))
    relay.get(0)
    assert not pool.wants_dial()
    relay.get(1)
    assert pool.pick() is None and pool.wants_dial()  # full: the next connection is dialled ahead of need
    second = relay.add(Origin("dmz"))
    relay.get(0)
    assert (len(first.requests), len(second.requests)) == (2, 1)


def test_the_next_hops_max_concurrent_streams_bounds_a_connection_below_the_configured_limit():
    # broken variant checked: `has_room` without `can_open_stream` opens a stream the next hop refuses
    pool = UpstreamPool(streams=100)
    relay = Relay(1, pool)
    relay.add(Origin("dmz", max_streams=1))
    relay.get(0)
    assert pool.pick() is None and pool.wants_dial()


def test_the_pool_dials_no_more_than_its_connections_per_next_hop():
    pool = UpstreamPool(streams=1, connections=2)
    relay = Relay(1, pool)
    relay.add(Origin("dmz"))
    relay.add(Origin("dmz"))
    assert not pool.may_dial("dmz") and pool.may_dial("dmz-b")


def test_a_connection_idle_for_idle_timeout_is_closed_and_a_busy_one_is_not():
    # broken variant checked: `expired` that does not reset `idle_since` while busy closes a connection with a request on it
    pool = UpstreamPool(streams=1, idle_timeout=10.0)
    relay = Relay(1, pool)
    busy = relay.add(Origin("dmz"), now=0.0)
    idle = relay.add(Origin("dmz"), now=0.0)
    relay.get(0)  # on the oldest connection with room: `busy`
    assert busy.requests and not idle.requests
    assert pool.expired(5.0) == [] and pool.next_expiry() == 10.0
    assert pool.expired(10.0) == [idle.member]
    assert pool.members == [busy.member]  # the busy one stays, however long its request takes
    assert pool.expired(100.0) == []
    relay.answer(busy.requests[0])
    assert pool.expired(101.0) == [] and pool.expired(111.0) == [busy.member]


def test_a_dead_connection_resets_exactly_its_own_streams_and_is_replaced():
    # broken variant checked: `Carrier.close` resetting every stream of each kiosk connection it
    # touched resets kiosk 0's request on the connection that is still alive
    pool = UpstreamPool(streams=2)
    relay = Relay(2, pool)
    dying = relay.add(Origin("dmz"))
    living = relay.add(Origin("dmz"))
    a, b = relay.get(0), relay.get(1)  # on `dying`, the oldest with room
    c, d = relay.get(0), relay.get(1)  # on `living`
    pool.lost(dying.member)
    dying.up._close("eof")
    assert dying.member.carrier.close() == {relay.splices[0], relay.splices[1]}  # the driver flushes both
    relay.pump()
    assert a.reset_code == CANCEL and b.reset_code == CANCEL
    assert c.reset_code is None and d.reset_code is None
    assert pool.members == [living.member] and pool.wants_dial()  # full: a replacement is dialled
    for st in living.requests:
        relay.answer(st)
    assert body_of(relay.kiosks[0], c) == b"doc" and body_of(relay.kiosks[1], d) == b"doc"


def test_one_kiosk_resetting_its_request_does_not_touch_anothers_on_the_same_upstream_connection():
    # broken variant checked: `_service` resetting the carrier's every stream on a downstream
    # reset cancels kiosk 1's request too
    relay = Relay(2, UpstreamPool())
    origin = relay.add(Origin("dmz"))
    a, b = relay.get(0), relay.get(1)
    relay.kiosks[0].reset(a.id, CANCEL)
    relay.pump()
    first, second = origin.requests
    assert first.reset_code == CANCEL and second.reset_code is None
    relay.answer(second)
    assert b.ended and body_of(relay.kiosks[1], b) == b"doc"
    assert not origin.member.carrier.pairs


def test_a_kiosk_connection_dying_resets_its_streams_upstream_and_no_one_elses():
    # broken variant checked: `Splice.close` resetting every pair of the carriers it used resets
    # kiosk 1's request too
    relay = Relay(2, UpstreamPool())
    origin = relay.add(Origin("dmz"))
    relay.get(0, "/a1"), relay.get(0, "/a2")
    b = relay.get(1, "/b")
    relay.splices[0].close()  # kiosk 0's connection is gone
    relay.pump()
    assert [st.reset_code for st in origin.requests] == [CANCEL, CANCEL, None]
    relay.answer(origin.requests[2])
    assert b.ended and body_of(relay.kiosks[1], b) == b"doc"
    assert list(origin.member.carrier.pairs.values()) == []


def test_an_upstream_reset_reaches_only_the_kiosk_whose_request_it_was():
    relay = Relay(2, UpstreamPool())
    origin = relay.add(Origin("dmz"))
    a, b = relay.get(0), relay.get(1)
    origin.server.reset(origin.requests[0].id, INTERNAL_ERROR)
    relay.pump()
    assert a.reset_code == CANCEL and b.reset_code is None


def test_balance_spreads_requests_over_the_connections_in_turn():
    # broken variant checked: `pick` ignoring `spread` puts every request on the first connection
    pool = UpstreamPool(spread=True)
    relay = Relay(1, pool)
    one, two = relay.add(Origin("dmz-a")), relay.add(Origin("dmz-b"))
    for _ in range(4):
        relay.get(0)
    assert (len(one.requests), len(two.requests)) == (2, 2)


# -- the topology file -----------------------------------------------------------------------


def _variant(tmp_path: Path, change) -> Path:
    data = read_yaml(DEFAULT_TOPOLOGY)
    change(data)
    path = tmp_path / "variant.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_ec_routers_and_dmz_relays_pool_and_store_routers_pair_unless_the_file_says_otherwise():
    topo = load_topology(DEFAULT_TOPOLOGY)
    way = {n.id: topo.upstream_connections_for(n).mode for n in topo.nodes.values() if n.kind in RELAY_KINDS}
    assert way["store-router-a1"] == "paired"
    assert way["ec-router-a"] == way["dmz-relay-b"] == "pooled"


def test_the_file_sets_the_way_per_relay_kind_and_a_node_overrides_its_kind(tmp_path):
    def change(data):
        data["upstream_connections"] = {"ec-router": {"mode": "paired"}, "dmz-relay": {"streams": 7}}
        data["nodes"]["ec-router-b"]["upstream_connections"] = {"mode": "pooled", "idle_timeout": 5}

    path = _variant(tmp_path, change)
    assert check_file(path) == []
    topo = load_topology(path)
    assert topo.upstream_connections_for(topo.node("ec-router-a")).mode == "paired"
    assert topo.upstream_connections_for(topo.node("ec-router-b")) == UpstreamConnections(idle_timeout=5.0)
    assert topo.upstream_connections_for(topo.node("dmz-relay-a")) == UpstreamConnections(streams=7)
    schema = jsonschema.Draft202012Validator(json_schema())
    assert [e.message for e in schema.iter_errors(read_yaml(path))] == []


def test_konbini_expand_writes_the_files_upstream_connections_out(tmp_path):
    def change(data):
        data["upstream_connections"] = {"dmz-relay": {"mode": "paired"}}
        data["nodes"]["ec-router-b"]["upstream_connections"] = {"streams": 3}

    topo = load_topology(_variant(tmp_path, change))
    out = io.StringIO()
    write_expanded(topo, out)
    (tmp_path / "expanded.yaml").write_text(out.getvalue())
    again = load_topology(tmp_path / "expanded.yaml")
    assert again.upstream_connections == topo.upstream_connections
    assert again.node("ec-router-b").upstream_connections == UpstreamConnections(streams=3)


def test_upstream_connections_on_a_node_that_relays_nothing_or_for_an_unknown_kind_is_a_problem(tmp_path):
    def change(data):
        data["upstream_connections"] = {"municipality": {"mode": "pooled"}, "dmz-relay": {"mode": "shared"}}
        data["nodes"]["ocsp"]["upstream_connections"] = {"mode": "pooled"}

    problems = [f"{p.field}: {p.message}" for p in check_file(_variant(tmp_path, change))]
    assert any(p.startswith("upstream_connections.municipality: not a relay kind") for p in problems), problems
    assert any(p.startswith("upstream_connections.dmz-relay") for p in problems), problems
    assert any(p.startswith("nodes.ocsp.upstream_connections: a ocsp relays nothing") for p in problems), problems


# -- a running topology ----------------------------------------------------------------------

KIOSKS = ("kiosk-a1-1", "kiosk-a1-2", "kiosk-a2-1", "kiosk-a2-2", "kiosk-a3-1", "kiosk-a3-2")


def _gauge(app, name: str) -> dict[tuple[str, ...], float]:
    return {
        tuple(s.labels.values()): s.value for family in app.collect() if family.name == name for s in family.samples
    }


async def test_pooled_relays_carry_every_kiosks_streams_on_one_upstream_connection_paired_ones_one_each(relay_net):
    net = relay_net
    pooled = net.app("ec-router-a").pool is not None
    dmz_before = net.servers["dmz-relay-a"].connections
    size = 1 << 20  # more than the windows: every stream stays open until its kiosk reads
    async with trio.open_nursery() as nursery:
        streams = []
        for kiosk_id in KIOSKS:
            conn = await Kiosk(net.context(kiosk_id), net.state_dir).connect()
            nursery.start_soon(conn.run)
            router = net.topo.node(kiosk_id).upstream
            streams.append(
                await conn.open_stream(request_headers("GET", f"/bench/blob?size={size}", router), end_stream=True)
            )
        with trio.fail_after(30):
            answers = [await stream.receive_headers() for stream in streams]
        conns = _gauge(net.app("ec-router-a"), "konbini_upstream_connections")
        carried = _gauge(net.app("ec-router-a"), "konbini_upstream_connection_streams")
        with trio.fail_after(30):
            bodies = [len(await stream.read_body(limit=size)) for stream in streams]
        for stream in streams:
            stream.conn.close()
    assert bodies == [size] * len(KIOSKS)
    for answer in answers:  # every hop's server-timing, as paired
        timings = b",".join(v for k, v in answer if k == b"server-timing")
        assert all(hop in timings for hop in (b"store-router-a", b"ec-router-a", b"dmz-relay-a")), timings
    if pooled:
        assert net.servers["dmz-relay-a"].connections - dmz_before == 1
        assert conns == {("dmz-relay-a", "pooled"): 1} and carried == {("dmz-relay-a", "0"): len(KIOSKS)}
    else:
        assert net.servers["dmz-relay-a"].connections - dmz_before == len(KIOSKS)
        assert conns == {("dmz-relay-a", "paired"): len(KIOSKS)} and carried == {}


@pytest.fixture
async def tight_net(topo, state, nursery):
    """The EC routers pool at most 2 connections of 1 stream each, closed after 0.5 s idle."""
    way = UpstreamConnections(streams=1, connections=2, idle_timeout=0.5)
    tight = msgspec.structs.replace(topo, upstream_connections={"ec-router": way})
    running = await nursery.start(
        lambda task_status: run_topology(tight, state, clock=Clock(TEST_TIME), task_status=task_status)
    )
    yield running
    running.stop()


async def _kiosk(net, kiosk_id: str, nursery):
    conn = await Kiosk(net.context(kiosk_id), net.state_dir).connect()
    nursery.start_soon(conn.run)
    return conn


def _get(conn, size: int):
    router = conn.peer
    return conn.open_stream(request_headers("GET", f"/bench/blob?size={size}", router), end_stream=True)


async def _until(condition) -> None:
    """Poll `condition` (a state change in another task), bounded by the caller's fail_after."""
    while not condition():
        await trio.sleep(0.01)


async def test_a_pooled_relay_dials_another_connection_at_the_stream_limit_and_refuses_past_its_connections(
    tight_net,
):
    # The second request reaches the EC router while its second connection is still being dialled
    # (dialled ahead once the first one is full), so it waits parked, then goes out on it.
    # broken variant checked: without `may_dial`'s bound a third connection is dialled and the
    # third request answered
    net, size = tight_net, 1 << 20
    pool = net.app("ec-router-a").pool
    async with trio.open_nursery() as nursery:
        kiosks = [await _kiosk(net, k, nursery) for k in ("kiosk-a1-1", "kiosk-a2-1", "kiosk-a3-1")]
        first, second = await _get(kiosks[0], size), await _get(kiosks[1], size)
        with trio.fail_after(30):
            await first.receive_headers()
            await second.receive_headers()
        assert [m.streams for m in pool.members] == [1, 1]
        third = await _get(kiosks[2], size)
        with trio.fail_after(30), pytest.raises(StreamReset):
            await third.receive_headers()  # refused unprocessed: both connections full, no third one
        with trio.fail_after(30):
            assert len(await first.read_body(limit=size)) == size
            assert len(await second.read_body(limit=size)) == size
            again = await _get(kiosks[2], 10)
            assert header(await again.receive_headers(), b":status") == b"200"  # room again
        for conn in kiosks:
            conn.close()
    assert len(pool.members) <= 2


async def test_a_pooled_connection_idle_for_its_timeout_is_closed_and_the_next_request_dials_again(tight_net):
    net = tight_net
    pool = net.app("ec-router-a").pool
    dmz = net.servers["dmz-relay-a"]
    async with trio.open_nursery() as nursery:
        kiosk = await _kiosk(net, "kiosk-a1-1", nursery)
        with trio.fail_after(30):
            assert header(await (await _get(kiosk, 10)).receive_headers(), b":status") == b"200"
            before = dmz.connections
            await _until(lambda: not pool.members)  # idle 0.5 s: closed
            assert header(await (await _get(kiosk, 10)).receive_headers(), b":status") == b"200"
        assert dmz.connections == before + 1 and len(pool.members) == 1
        kiosk.close()


async def test_a_pooled_connection_dying_resets_the_streams_it_carried_and_the_kiosks_connections_stay(net):
    # broken variant checked: without `Carrier.close` in `_run_member`, the kiosks wait for ever
    size = 1 << 20
    pool = net.app("ec-router-a").pool
    async with trio.open_nursery() as nursery:
        kiosks = [await _kiosk(net, k, nursery) for k in ("kiosk-a1-1", "kiosk-a2-1")]
        streams = [await _get(conn, size) for conn in kiosks]
        with trio.fail_after(30):
            for stream in streams:
                await stream.receive_headers()
        (dying,) = pool.members
        dying.scope.cancel()  # the upstream connection ends under both requests
        with trio.fail_after(30):
            for stream in streams:
                with pytest.raises(StreamReset):
                    await stream.read_body(limit=size)
            again = [await _get(conn, 10) for conn in kiosks]  # the same kiosk connections
            for stream in again:
                assert header(await stream.receive_headers(), b":status") == b"200"
        assert dying not in pool.members and len(pool.members) == 1
        for conn in kiosks:
            conn.close()
