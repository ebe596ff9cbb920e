"""Hostile HTTP/2 peers at a store router (docs/hostile.md): each attack is closed within
its bound, counted as a denial by reason, and another kiosk's issuance through the same router
completes meanwhile. The attacker is kiosk-a1-2 (allowed address, its own certificate) speaking
hand-made frames; the well-behaved kiosk is kiosk-a1-1."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import h2.config
import h2.connection
import h2.errors
import hpack
import msgspec
import pytest
import trio
import trio.lowlevel

from gateway.business.clock import Clock
from gateway.protocol.frames import MAX_FRAME_SIZE, STREAM_WINDOW
from gateway.protocol.messages import IssueRequest
from gateway.transport.tls import client_context
from kiosk_emu.kiosk import issue_at
from tests.conftest import TEST_TIME
from topology.launch.loopback import run_topology
from topology.spec.load import DEFAULT_TOPOLOGY, TopologyError, load_topology
from topology.spec.model import Limits

ROUTER, ATTACKER, GOOD = "store-router-a1", "kiosk-a1-2", "kiosk-a1-1"
CALM = h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
# the store routers' limits in these tests: the default counts, timeouts short enough for a test
TIGHT = Limits(
    max_connections_per_peer=4,
    handshake_timeout=0.5,
    preface_timeout=0.5,
    headers_timeout=1.0,
    slow_read_timeout=1.0,
    flood_window=10.0,
    max_resets=100,
    max_pings=100,
    max_settings=100,
    max_empty_data=100,
)
FLOOD_BOUND = 2.0  # seconds from the first frame to the close, for every flood
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@pytest.fixture
async def net(topo, state, nursery):
    tight = msgspec.structs.replace(topo, limits={"defaults": Limits(), "store-router": TIGHT})
    running = await nursery.start(
        lambda task_status: run_topology(tight, state, clock=Clock(TEST_TIME), task_status=task_status)
    )
    yield running
    running.stop()


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream_id) + payload


SETTINGS = frame(4, 0, 0)
GET = [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/bench/x?size=10"), (b":authority", ROUTER.encode())]


async def tcp_from(net, kiosk: str = ATTACKER) -> trio.SocketStream:
    router = net.topo.node(ROUTER)
    return await trio.open_tcp_stream(router.address, router.port, local_address=net.topo.node(kiosk).address)


async def tls_from(net, kiosk: str = ATTACKER) -> trio.SSLStream:
    chain, key = net.pki.node_paths(kiosk)
    ctx = client_context(Path(chain), Path(key), Path(net.pki.network_ca_path))
    tls = trio.SSLStream(await tcp_from(net, kiosk), ctx, server_hostname=ROUTER)
    await tls.do_handshake()
    return tls


class Attack:
    """One attacker connection: a reader task notes GOAWAY and the close; `sent` counts frames."""

    def __init__(self, tls: trio.SSLStream) -> None:
        self.tls = tls
        self.goaway: int | None = None
        self.closed = trio.Event()
        self.sent = 0
        self.t0 = time.perf_counter()
        self.closed_after = float("inf")

    async def read(self) -> None:
        buf = b""
        try:
            while data := await self.tls.receive_some(1 << 16):
                buf += data
                while len(buf) >= 9 and len(buf) >= 9 + (n := int.from_bytes(buf[:3], "big")):
                    if buf[3] == 7:  # GOAWAY: last stream id, error code
                        self.goaway = int.from_bytes(buf[13:17], "big")
                    buf = buf[9 + n :]
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the router closed (TLS without close_notify once it gave up on us)
        self.closed_after = time.perf_counter() - self.t0
        self.closed.set()

    async def send(self, data: bytes, frames: int) -> bool:
        """False once the router has closed the connection."""
        if self.closed.is_set():
            return False
        try:
            await self.tls.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return False
        self.sent += frames
        return True


async def _issue_into(net, card, result: dict) -> None:
    """The well-behaved kiosk's issuance through the router under attack, and how long it took."""
    t0 = time.perf_counter()
    r = await issue_at(net, GOOD, card, "1234", IssueRequest("131016", "residence-record"))
    result["status"], result["s"] = r.status, time.perf_counter() - t0


async def under_attack(net, attack, bound: float) -> tuple[Attack, float]:
    """Run `attack(a)` from the attacker while kiosk-a1-1 issues through the same router; the
    attacker must be closed within `bound` seconds. Returns the attack and the issuance's seconds."""
    a = Attack(await tls_from(net))
    card = net.cards.ensure_pool(1)[0]
    result = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.read)
        nursery.start_soon(_issue_into, net, card, result)
        with trio.fail_after(bound + 1):  # + 1: the test's own slack, the bound is asserted below
            await attack(a)
            await a.closed.wait()
    assert a.closed_after <= bound, (a.closed_after, bound)
    assert result["status"] == "issued"
    return a, result["s"]


async def flood(net, opening: bytes, chunk: bytes, frames_per_chunk: int, reason: str) -> Attack:
    async def attack(a: Attack) -> None:
        await a.send(PREFACE + SETTINGS + opening, 0)
        while await a.send(chunk, frames_per_chunk):
            await trio.lowlevel.checkpoint()  # let the router and the good kiosk run, as a real network would

    a, good_s = await under_attack(net, attack, FLOOD_BOUND)
    assert a.goaway == CALM
    await net.servers[ROUTER].until_denied(reason)
    print(f"{reason}: closed after {a.sent} frames, {a.closed_after:.2f} s; good issuance {good_s * 1000:.0f} ms")
    return a


def _rapid_reset_pairs(first: int, count: int) -> bytes:
    h2c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    h2c.initiate_connection()
    h2c.data_to_send()
    h2c.update_settings({})  # nothing; keeps h2's stream ids ours
    h2c.data_to_send()
    h2c.highest_outbound_stream_id = first - 2
    for _ in range(count):
        sid = h2c.get_next_available_stream_id()
        h2c.send_headers(sid, GET, end_stream=True)
        h2c.reset_stream(sid)
    return h2c.data_to_send()


async def test_rapid_reset_closes_the_connection_with_enhance_your_calm(net):
    pairs = 50

    async def attack(a: Attack) -> None:
        await a.send(PREFACE + SETTINGS, 0)
        sid = 1
        while await a.send(_rapid_reset_pairs(sid, pairs), pairs):
            sid += 2 * pairs
            await trio.lowlevel.checkpoint()

    a, good_s = await under_attack(net, attack, FLOOD_BOUND)
    assert a.goaway == CALM
    await net.servers[ROUTER].until_denied("rapid-reset")
    print(
        f"rapid-reset: closed after {a.sent} HEADERS+RST_STREAM pairs, {a.closed_after:.2f} s; good {good_s * 1000:.0f} ms"
    )


async def test_ping_flood_closes_the_connection(net):
    await flood(net, b"", frame(6, 0, 0, b"12345678") * 20, 20, "ping-flood")


async def test_settings_flood_closes_the_connection(net):
    await flood(net, b"", SETTINGS * 20, 20, "settings-flood")


async def test_empty_data_flood_closes_the_connection(net):
    post = [(b":method", b"POST")] + GET[1:]
    headers = frame(1, 0x4, 1, hpack.Encoder().encode(post, huffman=False))  # END_HEADERS, the body stays open
    await flood(net, headers, frame(0, 0, 1) * 20, 20, "empty-data-flood")


@pytest.mark.parametrize("size", [100, 16384])
async def test_continuation_flood_closes_the_connection(net, size):
    # a header block that never ends: HEADERS without END_HEADERS, then CONTINUATION after CONTINUATION
    start = frame(1, 0x1, 1, hpack.Encoder().encode(GET, huffman=False))
    await flood(
        net, start, frame(9, 0, 1, b"\x00" * size) * 4, 4, "continuation-flood"
    )  # h2's 64 frames or our 36 KiB cap


async def test_hpack_bomb_closes_the_connection(net):
    # one 4000-byte header into the dynamic table, then 1000 one-byte references to it: a 5 KiB
    # block that would decode to 4 MB; the decoder stops at max_header_list_size (16 KiB)
    block = hpack.Encoder().encode(GET + [(b"x-a", b"a" * 4000)], huffman=False) + b"\xbe" * 1000
    a = await flood(net, frame(1, 0x5, 1, block), SETTINGS, 0, "oversized-headers")
    assert a.goaway == CALM


async def test_zero_window_reader_is_closed_and_the_router_holds_one_window(net):
    async def attack(a: Attack) -> None:
        zero_window = frame(4, 0, 0, struct.pack(">HI", 0x4, 0))  # SETTINGS_INITIAL_WINDOW_SIZE = 0
        get = [(b":method", b"GET")] + [h for h in GET[1:] if h[0] != b":path"] + [(b":path", b"/bench/x?size=4194304")]
        await a.send(PREFACE + zero_window + frame(1, 0x5, 1, hpack.Encoder().encode(get, huffman=False)), 2)
        # reads everything (the reader task), never sends WINDOW_UPDATE

    a, good_s = await under_attack(net, attack, TIGHT.slow_read_timeout + 1.0)
    assert a.goaway == CALM
    await net.servers[ROUTER].until_denied("slow-read")
    assert net.app(ROUTER).max_buffered <= STREAM_WINDOW + MAX_FRAME_SIZE
    print(f"slow-read: closed after {a.closed_after:.2f} s; good {good_s * 1000:.0f} ms")


async def test_tcp_without_a_tls_handshake_is_closed(net):
    tcp = await tcp_from(net)
    t0 = time.perf_counter()
    card = net.cards.ensure_pool(1)[0]
    async with trio.open_nursery() as nursery:
        good = {}
        nursery.start_soon(lambda: _issue_into(net, card, good))
        with trio.fail_after(TIGHT.handshake_timeout + 1):
            try:
                while await tcp.receive_some(1024):
                    pass
            except OSError:
                pass  # closed by the router: EOF or reset
        closed_after = time.perf_counter() - t0
    assert closed_after <= TIGHT.handshake_timeout + 1.0
    assert good["status"] == "issued"
    await net.servers[ROUTER].until_denied("handshake-timeout")
    print(f"handshake-timeout: closed after {closed_after:.2f} s; good {good['s'] * 1000:.0f} ms")


async def test_tls_without_the_http2_preface_is_closed(net):
    a, good_s = await under_attack(net, lambda a: trio.lowlevel.checkpoint(), TIGHT.preface_timeout + 1.0)
    assert a.goaway == CALM
    await net.servers[ROUTER].until_denied("preface-timeout")
    print(f"preface-timeout: closed after {a.closed_after:.2f} s; good {good_s * 1000:.0f} ms")


async def test_headers_dribbled_a_byte_at_a_time_are_closed(net):
    headers = frame(1, 0x5, 1, hpack.Encoder().encode(GET, huffman=False))

    async def attack(a: Attack) -> None:
        await a.send(PREFACE + SETTINGS, 0)
        for i in range(len(headers)):
            if not await a.send(headers[i : i + 1], 0):
                return
            await trio.sleep(0.1)  # slowloris: the dribble itself, not a wait for something

    a, good_s = await under_attack(net, attack, TIGHT.headers_timeout + 1.0)
    assert a.goaway == CALM
    await net.servers[ROUTER].until_denied("slow-headers")
    print(f"slow-headers: closed after {a.closed_after:.2f} s; good {good_s * 1000:.0f} ms")


async def test_connections_beyond_the_per_peer_limit_are_refused_before_tls(net):
    held = []
    for _ in range(TIGHT.max_connections_per_peer):
        tls = await tls_from(net)
        await tls.send_all(PREFACE + SETTINGS)
        held.append(tls)
    with pytest.raises((OSError, trio.BrokenResourceError)):
        tls = await tls_from(net)
        await tls.send_all(PREFACE + SETTINGS)
        await tls.receive_some(1024)
        assert await tls.receive_some(1024) == b""
        raise OSError("closed")
    await net.servers[ROUTER].until_denied("too-many-connections")
    card = net.cards.ensure_pool(1)[0]
    r = await issue_at(net, GOOD, card, "1234", IssueRequest("131016", "residence-record"))
    assert r.status == "issued"  # another address is not limited by this one
    for tls in held:
        await trio.aclose_forcefully(tls)


def test_bad_limits_in_the_topology_file_name_file_line_and_field(tmp_path):
    path = tmp_path / "t.yaml"
    text = DEFAULT_TOPOLOGY.read_text()
    path.write_text(
        text + "\nlimits:\n  defaults: {idle_timeout: 30}\n  store-router:\n    max_pings: 0\n  toaster: {}\n"
    )
    with pytest.raises(TopologyError) as err:
        load_topology(path)
    lines = len(text.splitlines())
    problems = [str(p) for p in err.value.problems]
    assert f"{path}:{lines + 5}: limits.store-router.max_pings: Expected `int` >= 1" in problems
    assert any(p.startswith(f"{path}:{lines + 6}: limits.toaster: unknown node kind") for p in problems)


def test_limits_for_a_kind_override_the_files_defaults(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text(
        DEFAULT_TOPOLOGY.read_text() + "\nlimits:\n  defaults: {idle_timeout: 30}\n  store-router: {max_pings: 5}\n"
    )
    topo = load_topology(path)
    assert topo.limits_for("store-router") == Limits(idle_timeout=30.0, max_pings=5)
    assert topo.limits_for("ec-router") == Limits(idle_timeout=30.0)
    assert load_topology(DEFAULT_TOPOLOGY).limits_for("ec-router") == Limits()
