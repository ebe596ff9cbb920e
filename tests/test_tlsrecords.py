"""TLSRecords (gateway.protocol.tlsrecords): an established TLS 1.3 session driven without trio's
SSLStream machinery, against trio's SSLStream on the other end (and OpenSSL underneath both).

Bulk both ways at once with every byte in order, the server's held-back session tickets going out
ahead of the first record (without them the peer read a bad record MAC), close_notify and a bare
EOF both reading as the end, a corrupted record raising BrokenResourceError, and TLS 1.2 staying
on trio's SSLStream."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trio
import trio.testing

from gateway.protocol.tlsrecords import TLSRecords, lean_tls
from gateway.transport.tls import client_context, server_context
from topology.pki import PKI

ROUTER, KIOSK = "store-router-a1", "kiosk-a1-1"


def _contexts(state: Path, topo, tls12: bool = False) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    pki = PKI.load(state, topo)
    ca = Path(pki.network_ca_path)
    chain, key = pki.node_paths(ROUTER)
    server = server_context(Path(chain), Path(key), ca, False, "h2")
    chain, key = pki.node_paths(KIOSK)
    client = client_context(Path(chain), Path(key), ca, False)
    if tls12:
        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client.load_cert_chain(chain, key)
        client.load_verify_locations(ca)
        client.maximum_version = ssl.TLSVersion.TLSv1_2
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server.load_cert_chain(*pki.node_paths(ROUTER))
        server.load_verify_locations(ca)
        server.verify_mode = ssl.CERT_REQUIRED
    return server, client


async def _pair(state, topo, tls12: bool = False, wire=None):
    server_ctx, client_ctx = _contexts(state, topo, tls12)
    client_end, server_end = wire or trio.testing.memory_stream_pair()
    server = trio.SSLStream(server_end, server_ctx, server_side=True)
    client = trio.SSLStream(client_end, client_ctx, server_hostname=ROUTER)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.do_handshake)
        await client.do_handshake()
    return client, server


async def _read_exactly(stream, n: int) -> bytes:
    got = bytearray()
    while len(got) < n:
        data = await stream.receive_some(1 << 20)
        assert data, f"ended after {len(got)} of {n} bytes"
        got += data
    return bytes(got)


@pytest.mark.parametrize("lean_side", ["server", "client", "both"])
async def test_bulk_both_ways_at_once_arrives_whole_and_in_order(state, topo, lean_side) -> None:
    client, server = await _pair(state, topo)
    if lean_side in ("server", "both"):
        server = lean_tls(server)
        assert isinstance(server, TLSRecords)
    if lean_side in ("client", "both"):
        client = lean_tls(client)
        assert isinstance(client, TLSRecords)
    down = b"".join(bytes([i]) * (250_000 + i) for i in range(12))
    up = b"".join(bytes([i]) * (70_000 + 7 * i) for i in range(20))
    got = {}

    async def send(stream, chunks) -> None:
        for chunk in chunks:
            await stream.send_all(chunk)

    async def read(name, stream, n) -> None:
        got[name] = await _read_exactly(stream, n)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send, server, [down[i : i + 250_000] for i in range(0, len(down), 250_000)])
            nursery.start_soon(send, client, [up[i : i + 70_000] for i in range(0, len(up), 70_000)])
            nursery.start_soon(read, "down", client, len(down))
            nursery.start_soon(read, "up", server, len(up))
    assert got == {"down": down, "up": up}


async def test_close_notify_and_a_bare_eof_both_read_as_the_end(state, topo) -> None:
    client, server = await _pair(state, topo)
    lean = lean_tls(server)
    await client.send_all(b"last words")
    await client.aclose()  # close_notify, then the transport closes
    with trio.fail_after(5):
        assert await _read_exactly(lean, 10) == b"last words"
        assert await lean.receive_some() == b""
    client_end, server_end = trio.testing.memory_stream_pair()
    client, server = await _pair(state, topo, wire=(client_end, server_end))
    lean = lean_tls(server)
    await client_end.aclose()  # the socket ends with no close_notify
    with trio.fail_after(5):
        assert await lean.receive_some() == b""


async def test_a_corrupted_record_raises_broken_resource(state, topo) -> None:
    client_end, server_end = trio.testing.memory_stream_pair()
    client, server = await _pair(state, topo, wire=(client_end, server_end))
    lean = lean_tls(server)
    await client_end.send_all(b"\x17\x03\x03\x00\x20" + b"\x00" * 32)  # an application-data record of noise
    with trio.fail_after(5), pytest.raises(trio.BrokenResourceError):
        await lean.receive_some()


async def test_tls12_stays_on_trios_sslstream(state, topo) -> None:
    client, server = await _pair(state, topo, tls12=True)
    assert server._ssl_object.version() == "TLSv1.2"
    assert lean_tls(server) is server and lean_tls(client) is client


async def test_send_now_gives_the_kernel_what_it_takes_and_send_all_sends_the_rest_first(state, topo) -> None:
    a, b = trio.socket.socketpair()
    client, server = await _pair(state, topo, wire=(trio.SocketStream(a), trio.SocketStream(b)))
    lean = lean_tls(server)
    assert lean.can_send_now
    first = bytes(range(256)) * 40_000  # 10 MB: far beyond the socket buffer, so some stays unsent
    whole = lean.send_now(first)
    assert not whole and lean.unsent > 0
    expected = first + b"after"
    got = {}

    async def read() -> None:
        got["all"] = await _read_exactly(client, len(expected))

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            await lean.send_all(b"after")  # what send_now left goes out ahead of it
    assert got["all"] == expected and lean.unsent == 0
    assert lean.send_now(b"small") and await _read_exactly(client, 5) == b"small"
