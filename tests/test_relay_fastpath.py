"""The relay's cheaper path: whole TLS reads through h2 in one pass, no eager frame formatting, and
bodies, flow control and resets still correct end to end through the three relays, whatever
frame size the peer keeps."""

from __future__ import annotations

import binascii
import ssl
from pathlib import Path

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import hyperframe.frame
import msgspec
import pytest
import trio
import trio.testing

from gateway.business.clock import Clock
from gateway.protocol.driver import Stream
from gateway.protocol.h2trio import TrioH2
from gateway.protocol.http import request_headers
from gateway.protocol.streams import header
from gateway.transport.tls import client_context, server_context
from tests.conftest import TEST_TIME
from topology.launch.loopback import run_topology
from topology.spec.model import Limits

KIOSK, ROUTER = "kiosk-a1-1", "store-router-a1"
KiB, MiB = 1024, 1 << 20
TLS_RECORD = 16 * KiB


@pytest.fixture
def net(relay_net):
    """Every test here runs with the EC routers and DMZ relays pooled, then paired."""
    return relay_net


def _hyperframe_text(data: bytes | None) -> str:
    """hyperframe 6.1's own `_raw_data_repr`, kept here as the reference."""
    if not data:
        return "None"
    r = binascii.hexlify(data).decode("ascii")
    if len(r) > 20:
        r = r[:20] + "..."
    return "<hex:" + r + ">"


@pytest.mark.parametrize("size", [0, 1, 9, 10, 11, 12, 64 * KiB])
def test_frame_repr_reads_as_hyperframes_without_hexlifying_the_whole_payload(size):
    data = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    assert hyperframe.frame._raw_data_repr(data) == _hyperframe_text(data)
    frame = hyperframe.frame.DataFrame(1, data=data)
    assert _hyperframe_text(data) in repr(frame)


# -- whole TLS reads, over a memory stream (no sockets) ------------------------------------------


def _tls_pair(pki) -> tuple[trio.SSLStream, trio.SSLStream]:
    client_end, server_end = trio.testing.memory_stream_pair()
    ca = Path(pki.network_ca_path)
    chain, key = pki.node_paths(ROUTER)
    server = trio.SSLStream(server_end, server_context(Path(chain), Path(key), ca, False, "h2"), server_side=True)
    chain, key = pki.node_paths(KIOSK)
    client = trio.SSLStream(client_end, client_context(Path(chain), Path(key), ca, False), server_hostname=ROUTER)
    return client, server


async def _count_upload(stream: Stream) -> None:
    size = len(await stream.read_body(limit=64 * MiB))
    stream.send_headers([(b":status", b"200"), (b"bench-received", str(size).encode())], end_stream=True)


async def test_the_reader_takes_every_tls_record_already_received_in_one_pass(net):
    client_tls, server_tls = _tls_pair(net.pki)
    server = TrioH2(server_tls, client_side=False)
    client = TrioH2(client_tls, client_side=True)
    feeds: list[int] = []
    receive = server.core.receive_data
    server.core.receive_data = lambda data: feeds.append(len(data)) or receive(data)
    body = b"z" * MiB
    uploads = 4  # streams at once: one stream's window alone keeps only 4 records in flight

    async def upload() -> None:
        stream = await client.open_stream(request_headers("POST", "/up", ROUTER))
        await stream.send_data(body, end_stream=True)
        assert header(await stream.receive_headers(), b"bench-received") == str(len(body)).encode()
        client.release(stream)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server_tls.do_handshake)
        await client_tls.do_handshake()
        nursery.start_soon(server.run, _count_upload)
        nursery.start_soon(client.run)
        with trio.fail_after(30):
            async with trio.open_nursery() as clients:
                for _ in range(uploads):
                    clients.start_soon(upload)
            client.close()
            await server.closed.wait()
    records = uploads * len(body) // TLS_RECORD
    assert sum(feeds) >= uploads * len(body)
    assert len(feeds) < records / 2  # one record per pass would be 256 passes through h2
    assert max(feeds) > 4 * TLS_RECORD


# -- through the three relays, from a peer with its own frame size --------------------------------


async def _raw_client(net, frame_size: int) -> tuple[trio.SSLStream, h2.connection.H2Connection]:
    """A kiosk's connection to its store router over `ssl` + `h2` alone, advertising `frame_size`
    and the protocol's default 65,535-byte windows."""
    chain, key = net.pki.node_paths(KIOSK)
    ctx = ssl.create_default_context(cafile=str(net.pki.network_ca_path))
    ctx.load_cert_chain(chain, key)
    ctx.set_alpn_protocols(["h2"])
    router, kiosk = net.topo.node(ROUTER), net.topo.node(KIOSK)
    tcp = await trio.open_tcp_stream(router.address, router.port, local_address=kiosk.address)
    tls = trio.SSLStream(tcp, ctx, server_hostname=router.id)
    await tls.do_handshake()
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.local_settings = h2.settings.Settings(
        client=True,
        initial_values={
            h2.settings.SettingCodes.MAX_FRAME_SIZE: frame_size,
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
        },
    )
    conn.initiate_connection()
    conn.max_inbound_frame_size = frame_size  # h2 would wait for the SETTINGS ACK, which may come behind the first DATA
    await tls.send_all(conn.data_to_send())
    return tls, conn


def _headers(method: str, path: str) -> list[tuple[bytes, bytes]]:
    return [
        (b":method", method.encode()),
        (b":scheme", b"https"),
        (b":authority", ROUTER.encode()),
        (b":path", path.encode()),
    ]


async def _exchange(tls, conn, sid: int, body: bytes = b"") -> tuple[dict, bytes, int]:
    """Send `body` on stream `sid` as the peer's windows allow, read the whole answer, acking each
    DATA frame as it comes (stream and connection); the answer's headers, body, largest frame."""
    got, largest, headers, done = bytearray(), 0, {}, False
    view = memoryview(body)
    while not done:
        while view and (room := min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)) > 0:
            conn.send_data(sid, bytes(view[:room]), end_stream=len(view) <= room)
            view = view[room:]
        await tls.send_all(conn.data_to_send())
        data = await tls.receive_some(256 * KiB)
        if not data:
            raise ConnectionError(f"{ROUTER} closed the connection")
        for event in conn.receive_data(data):  # h2 raises if the router overran a window or the frame size
            if isinstance(event, h2.events.ResponseReceived):
                headers = dict(event.headers)
            elif isinstance(event, h2.events.DataReceived):
                got += event.data
                largest = max(largest, event.flow_controlled_length)
                conn.acknowledge_received_data(event.flow_controlled_length, sid)
            elif isinstance(event, h2.events.StreamEnded):
                done = True
            elif isinstance(event, (h2.events.StreamReset, h2.events.ConnectionTerminated)):
                raise ConnectionError(f"{ROUTER} ended the exchange: {event}")
    await tls.send_all(conn.data_to_send())
    return headers, bytes(got), largest


@pytest.mark.parametrize("frame_size", [16 * KiB, MiB], ids=["16k-frames", "1m-frames"])
async def test_a_download_arrives_byte_for_byte_within_the_peers_frame_size(net, frame_size):
    tls, conn = await _raw_client(net, frame_size)
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, _headers("GET", f"/bench/blob?size={3 * MiB}"), end_stream=True)
    with trio.fail_after(60):
        headers, body, largest = await _exchange(tls, conn, sid)
    assert headers[b":status"] == b"200"
    assert body == b"k" * (3 * MiB)  # the origin's pattern, every byte of it, in order
    assert largest <= frame_size
    if frame_size > 16 * KiB:
        assert largest > 16 * KiB  # a peer taking larger frames gets them, not 16 KiB ones
    await tls.aclose()


@pytest.mark.parametrize("frame_size", [16 * KiB, MiB], ids=["16k-frames", "1m-frames"])
async def test_an_upload_larger_than_every_window_reaches_the_origin_whole(net, frame_size):
    # 3 MiB against 64 KiB (the peer's) and 128 KiB (each hop's) stream windows: it moves only as
    # each relay acks what the next hop took, so this is flow control end to end, both ways.
    tls, conn = await _raw_client(net, frame_size)
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, _headers("POST", f"/bench/blob?size={64 * KiB}"))
    with trio.fail_after(60):
        headers, body, _ = await _exchange(tls, conn, sid, b"u" * (3 * MiB))
    assert headers[b":status"] == b"200" and headers[b"bench-received"] == str(3 * MiB).encode()
    assert body == b"k" * (64 * KiB)
    await tls.aclose()


async def _read_until(tls, conn, done, responded: set[int]) -> None:
    """Read and answer the router until `done()`; DATA is acked as it comes, the ids of streams
    whose response headers arrived go into `responded`."""
    while not done():
        data = await tls.receive_some(256 * KiB)
        if not data:
            raise ConnectionError(f"{ROUTER} closed the connection")
        for event in conn.receive_data(data):
            assert not isinstance(event, h2.events.ConnectionTerminated), event
            if isinstance(event, h2.events.ResponseReceived):
                responded.add(event.stream_id)
            elif isinstance(event, h2.events.DataReceived) and event.flow_controlled_length:
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        await tls.send_all(conn.data_to_send())


RACE_ROUNDS = 320  # x one 64 KiB chunk a hop would lose per round: past each hop's 16 MiB connection window


async def _reset_once_window_full(tls, conn, sid: int, window: int) -> None:
    """Read stream `sid`'s DATA without acking it until the router has filled our stream window
    (so the router waits for window with a chunk in hand), then reset the stream: the reset races
    the next DATA frame at every hop behind it."""
    received = 0
    while received < window:
        data = await tls.receive_some(256 * KiB)
        if not data:
            raise ConnectionError(f"{ROUTER} closed the connection")
        for event in conn.receive_data(data):
            assert not isinstance(event, (h2.events.ConnectionTerminated, h2.events.StreamReset)), event
            if isinstance(event, h2.events.DataReceived) and event.stream_id == sid:
                received += event.flow_controlled_length
    conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
    await tls.send_all(conn.data_to_send())


async def test_resets_racing_data_give_back_every_byte_of_window_on_every_hop(net):
    # Each round: a 3 MiB download that the peer stops reading once its 65,535-byte stream window
    # is full, then cancels. Every relay then holds a chunk taken from its upstream and not yet
    # sent on; unless the cancelled chunk is acked upstream anyway, each round shrinks every
    # hop's connection window by a chunk, and after RACE_ROUNDS the connection stalls for good.
    tls, conn = await _raw_client(net, 16 * KiB)
    conn.increment_flow_control_window(2**31 - 1 - 65535)  # our connection window never limits: only the stream's
    await tls.send_all(conn.data_to_send())
    with trio.fail_after(120):
        for _ in range(RACE_ROUNDS):
            sid = conn.get_next_available_stream_id()
            conn.send_headers(sid, _headers("GET", f"/bench/blob?size={3 * MiB}"), end_stream=True)
            await tls.send_all(conn.data_to_send())
            await _reset_once_window_full(tls, conn, sid, 65535)
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, _headers("GET", f"/bench/blob?size={3 * MiB}"), end_stream=True)
    with trio.fail_after(30):
        headers, body, _ = await _exchange(tls, conn, sid)
    assert headers[b":status"] == b"200" and body == b"k" * (3 * MiB)
    await tls.aclose()


@pytest.fixture
async def idle_net(topo, state, nursery):
    """The store routers close idle connections after 0.5 s, slow readers only after 30 s."""
    limits = {"defaults": Limits(), "store-router": Limits(idle_timeout=0.5, slow_read_timeout=30.0)}
    running = await nursery.start(
        lambda task_status: run_topology(
            msgspec.structs.replace(topo, limits=limits), state, clock=Clock(TEST_TIME), task_status=task_status
        )
    )
    yield running
    running.stop()


async def test_a_connection_with_a_request_crossing_the_relay_is_not_idle(idle_net):
    # The relay forwards in its readers, with no handler task per request; a download whose reader
    # pauses longer than idle_timeout is still a request in flight, not an idle connection.
    tls, conn = await _raw_client(idle_net, 16 * KiB)
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, _headers("GET", f"/bench/blob?size={MiB}"), end_stream=True)
    await tls.send_all(conn.data_to_send())
    body, held, paused, ended, status = bytearray(), 0, False, False, None
    with trio.fail_after(30):
        while not ended:
            data = await tls.receive_some(256 * KiB)
            assert data, f"{ROUTER} closed the connection"
            for event in conn.receive_data(data):
                assert not isinstance(event, (h2.events.ConnectionTerminated, h2.events.StreamReset)), event
                if isinstance(event, h2.events.ResponseReceived):
                    status = dict(event.headers)[b":status"]
                elif isinstance(event, h2.events.DataReceived):
                    body += event.data
                    held += event.flow_controlled_length
                elif isinstance(event, h2.events.StreamEnded):
                    ended = True
            if not paused and held >= 65535:  # the window is full: the router can send nothing more
                paused = True
                await trio.sleep(1.5)  # the pause under test: three idle timeouts, nothing sent
            if paused and held:
                conn.acknowledge_received_data(held, sid)
                held = 0
            await tls.send_all(conn.data_to_send())
    assert status == b"200" and body == b"k" * MiB
    assert idle_net.servers[ROUTER].denials["idle"] == 0
    await tls.aclose()
