"""Per-hop enforcement and robustness of the Trio servers: deny early, stream with bounded memory,
and drop a misbehaving peer without disturbing anyone else."""

from __future__ import annotations

import shutil
import sqlite3
import ssl
from pathlib import Path

import pytest
import trio

from gateway.business.clock import Clock
from gateway.node.server import NodeContext, NodeStartError, connect_h2
from gateway.protocol.frames import MAX_FRAME_SIZE, STREAM_WINDOW
from gateway.protocol.h2trio import TrioH2
from gateway.protocol.http import request_headers
from gateway.protocol.streams import header
from gateway.transport.tls import client_context
from kiosk_emu.kiosk import Kiosk
from topology import pki as pki_module
from topology.pki import PKI
from topology.policy.compiler import AllowList, compile_allowlists

REFUSED = (OSError, ssl.SSLError, trio.BrokenResourceError, trio.TooSlowError, ConnectionError)


@pytest.fixture
def net(relay_net):
    """Every test here runs with the EC routers and DMZ relays pooled, then paired."""
    return relay_net


@pytest.mark.parametrize("target", ["issuance-center", "dmz-relay-a", "ec-router-a"])
async def test_kiosk_connecting_around_its_store_router_is_refused(net, target):
    ctx = net.context("kiosk-a1-1")
    with pytest.raises(REFUSED):
        await ctx.connect(net.topo.node(target))
    assert net.servers[target].denials["peer-address"] == 1  # refused before the TLS handshake


async def test_store_router_of_one_operator_cannot_use_the_other_operators_ec_router(net):
    ctx = net.context("store-router-a1")
    with pytest.raises(REFUSED):
        await ctx.connect(net.topo.node("ec-router-b"))
    assert net.servers["ec-router-b"].denials["peer-address"] == 1


async def test_a_nodes_allow_lists_are_compiled_at_its_first_connection_and_decide_as_compiled_at_start(net):
    """A national node process holds 12,000 allow-lists, most never asked; compiling them all was
    a fifth of its start."""
    server, admin = net.servers["ec-router-b"], net.admin_servers["kiosk-a1-1"]
    assert server.allow._compiled is None and admin.allow._compiled is None
    ctx = net.context("store-router-a1")
    with pytest.raises(REFUSED):
        await ctx.connect(net.topo.node("ec-router-b"))
    assert server.denials["peer-address"] == 1
    assert isinstance(server.allow._compiled, AllowList) and admin.allow._compiled is None
    at_start = compile_allowlists(net.topo, net.mode, ["ec-router-b"])["ec-router-b"]
    b1 = net.topo.node("store-router-b1")
    for ip in (b1.address, ctx.address, "127.0.0.1"):
        assert server.allow.check_address(ip) == at_start.check_address(ip)
        assert server.allow.check_identity(ip, b1.id) == at_start.check_identity(ip, b1.id)
    for identity, method, path in (
        (b1.id, "POST", "/v1/issue"),
        (b1.id, "DELETE", "/v1/x"),
        (ctx.node.id, "POST", "/v1/x"),
    ):
        assert server.allow.check_request(identity, method, path) == at_start.check_request(identity, method, path)


def _ctx_with_cert_of(net, node_id: str) -> ssl.SSLContext:
    chain, key = net.pki.node_paths(node_id)
    client_context.cache_clear()
    return client_context(Path(chain), Path(key), Path(net.pki.network_ca_path))


async def test_node_presenting_another_nodes_certificate_is_refused(net):
    # From kiosk-a1-1's address, with kiosk-a1-2's (valid, allowed) certificate: identity and address disagree.
    router = net.topo.node("store-router-a1")
    conn = await connect_h2(
        router.address,
        router.port,
        router.id,
        _ctx_with_cert_of(net, "kiosk-a1-2"),
        local_address=net.topo.node("kiosk-a1-1").address,
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.run)
        with trio.fail_after(5):
            await conn.closed.wait()  # the router closes right after the handshake
    assert net.servers["store-router-a1"].denials["peer-identity"] == 1


async def test_client_without_a_certificate_is_refused(net):
    router = net.topo.node("store-router-a1")
    ctx = ssl.create_default_context(cafile=str(net.pki.network_ca_path))
    ctx.set_alpn_protocols(["h2"])
    tcp = await trio.open_tcp_stream(router.address, router.port, local_address=net.topo.node("kiosk-a1-1").address)
    tls = trio.SSLStream(tcp, ctx, server_hostname=router.id)
    with pytest.raises(REFUSED):
        await tls.do_handshake()
        await tls.send_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        assert await tls.receive_some(100) == b""  # TLS 1.3: the refusal arrives after the client's Finished
        raise ConnectionError("closed")
    assert net.servers["store-router-a1"].denials["tls-handshake"] == 1


async def _open_kiosk(net, kiosk_id: str, nursery) -> TrioH2:
    conn = await Kiosk(net.context(kiosk_id), net.state_dir).connect()
    nursery.start_soon(conn.run)
    return conn


async def test_relay_memory_stays_bounded_while_a_large_document_streams_to_a_slow_reader(net):
    size = 24 << 20  # 24 MiB, about 100x the per-stream window
    async with trio.open_nursery() as nursery:
        conn = await _open_kiosk(net, "kiosk-a3-1", nursery)
        stream = await conn.open_stream(
            request_headers("GET", f"/bench/blob?size={size}", "store-router-a3"), end_stream=True
        )
        await stream.receive_headers()
        got = 0
        while (chunk := await stream.receive_chunk()) is not None:
            got += len(chunk)
            if got < 4 << 20:
                await trio.sleep(0.001)  # a slow printer for the first MiBs: back-pressure must reach the center
        conn.close()
    assert got == size
    for relay in ("store-router-a3", "ec-router-a", "dmz-relay-a"):
        held = net.app(relay).max_buffered
        assert 0 < held <= STREAM_WINDOW + MAX_FRAME_SIZE, (relay, held)


async def test_malformed_http2_from_one_peer_closes_only_that_connection(net):
    router = net.topo.node("store-router-a1")
    async with trio.open_nursery() as nursery:
        good = await _open_kiosk(net, "kiosk-a1-1", nursery)
        slow = await good.open_stream(request_headers("GET", "/bench/blob?size=4194304", router.id), end_stream=True)
        await slow.receive_headers()
        # a second kiosk speaks TLS correctly, then sends garbage instead of HTTP/2 frames
        ctx = _ctx_with_cert_of(net, "kiosk-a1-2")
        tcp = await trio.open_tcp_stream(router.address, router.port, local_address=net.topo.node("kiosk-a1-2").address)
        bad = trio.SSLStream(tcp, ctx, server_hostname=router.id)
        await bad.do_handshake()
        # the preface and an empty SETTINGS, then a DATA frame on stream 0 (forbidden by RFC 9113 §6.1)
        settings = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
        await bad.send_all(
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + settings + b"\x00\x00\x05\x00\x00\x00\x00\x00\x00hello"
        )
        with trio.fail_after(5):
            while await bad.receive_some(65536):
                pass  # GOAWAY, then the router closes
        got = 0
        while (chunk := await slow.receive_chunk()) is not None:
            got += len(chunk)
        assert got == 4194304  # the well-behaved peer's stream went on
        good.close()
    assert net.servers["store-router-a1"].denials["protocol-error"] == 1


async def test_oversized_headers_close_that_connection_while_other_streams_go_on(net):
    router = net.topo.node("store-router-a1")
    async with trio.open_nursery() as nursery:
        good = await _open_kiosk(net, "kiosk-a1-1", nursery)
        slow = await good.open_stream(request_headers("GET", "/bench/blob?size=2097152", router.id), end_stream=True)
        await slow.receive_headers()
        bad = await _open_kiosk(net, "kiosk-a1-2", nursery)
        await bad.open_stream(
            request_headers("GET", "/bench/blob?size=1", router.id, [(b"x-big", b"a" * 40000)]), end_stream=True
        )
        with trio.fail_after(5):
            await bad.closed.wait()
        got = 0
        while (chunk := await slow.receive_chunk()) is not None:
            got += len(chunk)
        assert got == 2097152
        status = header(
            await (
                await good.open_stream(request_headers("GET", "/bench/blob?size=10", router.id), end_stream=True)
            ).receive_headers(),
            b":status",
        )
        assert status == b"200"  # and new requests still work
        good.close()
    assert net.servers["store-router-a1"].denials["oversized-headers"] == 1


async def test_a_bad_query_is_answered_400_not_a_crash(net):
    async with trio.open_nursery() as nursery:
        conn = await _open_kiosk(net, "kiosk-a1-1", nursery)
        stream = await conn.open_stream(
            request_headers("GET", "/bench/blob?size=lots", "store-router-a1"), end_stream=True
        )
        status = header(await stream.receive_headers(), b":status")
        body = await stream.read_body()
        conn.close()
    assert status == b"400" and b"bad-request" in body


async def test_a_node_makes_its_tls_context_at_its_first_connection_and_a_missing_key_stops_its_start(
    topo, state, tmp_path, monkeypatch
):
    """Start only checks that the node has an identity in the PKI (a large topology's start went
    mostly to OpenSSL key decoding, then to files, for nodes never dialled); the context and the
    files `ssl` reads are made when a peer connects."""
    copy = tmp_path / "state"
    shutil.copytree(state / "pki", copy / "pki", ignore=shutil.ignore_patterns("store-router-a1.*"))
    monkeypatch.setattr(pki_module, "FILES_UP_TO", 0)  # as a national file's: no node's files written at ensure
    pki = PKI.ensure(copy, topo)
    ctx = NodeContext(topo, topo.node("store-router-a1"), pki, "loopback", Clock())
    ctx.check_tls_files()
    assert not ctx._tls  # nothing made yet
    assert not (copy / "pki" / "nodes" / "store-router-a1.pem").exists()  # nor written out of nodes.db
    assert ctx.server_tls() is ctx.server_tls()  # made once, then the same one

    with sqlite3.connect(copy / "pki" / "nodes.db") as db:
        db.execute("DELETE FROM node WHERE id = 'store-router-a1'")
    (copy / "pki" / "nodes" / "store-router-a1.key").unlink()
    moved = PKI.load(copy, topo)
    with pytest.raises(NodeStartError, match="store-router-a1: no certificate or key for it in"):
        NodeContext(topo, topo.node("store-router-a1"), moved, "loopback", Clock()).check_tls_files()
