"""TLS 1.3 session resumption between hops: in memory (two ssl.SSLObjects over MemoryBIOs), that a
resumed session still carries the certificate identity of its full handshake and lives no longer
than TICKET_LIFETIME; on the default topology, that a node or kiosk dialling again resumes, and that
the allow-lists judge a resumed connection as they judge a full one."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest
import trio
import uvloop

from gateway.node.server import connect_h2
from gateway.protocol.http import request_headers
from gateway.protocol.streams import header
from gateway.transport.resumption import SessionCache, sessions_of
from gateway.transport.tls import TICKET_LIFETIME, peer_identity, server_context
from kiosk_emu.kiosk import Kiosk
from kiosk_emu.load import h2asyncio
from tests.memtls import handshake
from topology.pki import PKI

ROUTER, OTHER_ROUTER, KIOSK, OTHER_KIOSK = "store-router-a1", "store-router-a2", "kiosk-a1-1", "kiosk-a1-2"


@pytest.fixture
def pki(state: Path, topo) -> PKI:
    return PKI.ensure(state, topo)


def _server_ctx(pki: PKI, node: str) -> ssl.SSLContext:
    return server_context(*(Path(p) for p in pki.node_paths(node)), Path(pki.network_ca_path))


def _fresh_client_ctx(pki: PKI, node: str) -> ssl.SSLContext:
    """Not client_context's shared one: a test may change its certificate, and its sessions start empty."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(*pki.node_paths(node))
    ctx.load_verify_locations(pki.network_ca_path)
    ctx.set_alpn_protocols(["h2"])
    return ctx


def _connect(server_ctx, client_ctx, server_name: str, session=None) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """A handshake, then one record from the server, which brings the client its ticket."""
    server, client, pipes = handshake(server_ctx, client_ctx, server_name, session)
    server.write(b"settings")
    pipes[2].write(pipes[1].read())
    assert client.read(100) == b"settings"
    return server, client


def test_a_resumed_session_carries_the_identity_of_its_certificate_handshake(pki):
    server_ctx, client_ctx = _server_ctx(pki, ROUTER), _fresh_client_ctx(pki, KIOSK)
    _, first = _connect(server_ctx, client_ctx, ROUTER)
    assert first.session.has_ticket
    server, client = _connect(server_ctx, client_ctx, ROUTER, first.session)
    assert client.session_reused and server.session_reused
    assert peer_identity(server.getpeercert()) == KIOSK


def test_a_ticket_lives_for_the_ticket_lifetime(pki):
    _, client = _connect(_server_ctx(pki, ROUTER), _fresh_client_ctx(pki, KIOSK), ROUTER)
    assert client.session.ticket_lifetime_hint == TICKET_LIFETIME


def test_a_ticket_from_one_server_is_not_resumed_by_another(pki):
    # each server context seals its tickets with its own random key: the other cannot open it
    client_ctx = _fresh_client_ctx(pki, KIOSK)
    _, first = _connect(_server_ctx(pki, ROUTER), client_ctx, ROUTER)
    server, client = _connect(_server_ctx(pki, OTHER_ROUTER), client_ctx, OTHER_ROUTER, first.session)
    assert not client.session_reused and not server.session_reused
    assert peer_identity(server.getpeercert()) == KIOSK  # a full handshake, its certificate verified


def test_a_client_resuming_another_identitys_session_is_that_identity_not_its_certificates(pki):
    # A resumption sends no certificate: the server knows the client by the ticket alone, so a
    # client cannot show a second certificate beside a ticket and be judged by that certificate.
    server_ctx, client_ctx = _server_ctx(pki, ROUTER), _fresh_client_ctx(pki, KIOSK)
    _, first = _connect(server_ctx, client_ctx, ROUTER)
    client_ctx.load_cert_chain(*pki.node_paths(OTHER_KIOSK))
    server, client = _connect(server_ctx, client_ctx, ROUTER, first.session)
    assert server.session_reused
    assert peer_identity(server.getpeercert()) == KIOSK


class _Connection:
    def __init__(self, session) -> None:
        self.session = session


class _Session:
    def __init__(self, has_ticket: bool, time: int = 1000, lifetime: int = 3600) -> None:
        self.has_ticket, self.time, self.timeout, self.ticket_lifetime_hint = has_ticket, time, 7200, lifetime


def test_cache_offers_the_newest_session_once_its_ticket_has_arrived():
    cache = SessionCache(clock=lambda: 1000)
    assert cache.offer(ROUTER) is None
    pending = _Connection(_Session(has_ticket=False))
    cache.remember(ROUTER, pending)
    assert cache.offer(ROUTER) is None  # the handshake is done, the ticket not yet read
    pending.session = ticketed = _Session(has_ticket=True)
    assert cache.offer(ROUTER) is ticketed
    cache.remember(ROUTER, _Connection(_Session(has_ticket=False)))
    assert cache.offer(ROUTER) is ticketed  # the newer connection has no ticket yet: the older one's
    assert cache.offer(OTHER_ROUTER) is None


def test_cache_drops_a_session_past_its_tickets_lifetime():
    now = 1000
    cache = SessionCache(clock=lambda: now)
    cache.remember(ROUTER, _Connection(_Session(has_ticket=True, time=1000, lifetime=3600)))
    now = 4599
    assert cache.offer(ROUTER) is not None
    now = 4600
    assert cache.offer(ROUTER) is None


async def _get(net, conn, path: str, authority: str) -> bytes:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.run)
        stream = await conn.open_stream(request_headers("GET", path, authority), end_stream=True)
        status = header(await stream.receive_headers(), b":status")
        conn.close()
    return status


async def test_a_kiosk_dialling_its_router_again_resumes_and_is_still_judged_per_request(net):
    router, kiosk = net.topo.node(ROUTER), net.topo.node(KIOSK)
    ctx = _fresh_client_ctx(net.pki, KIOSK)  # no session yet: client_context's is shared by the process's tests
    assert (
        await _get(
            net,
            await connect_h2(router.address, router.port, router.id, ctx, local_address=kiosk.address),
            "/bench/blob?size=10",
            router.id,
        )
        == b"200"
    )
    assert net.servers[ROUTER].resumed == 0
    again = await connect_h2(router.address, router.port, router.id, ctx, local_address=kiosk.address)
    # the allow-list still applies to each request of the resumed connection
    assert await _get(net, again, "/admin/anything", router.id) == b"403"
    assert net.servers[ROUTER].resumed == 1
    assert net.servers[ROUTER].denials["request-not-allowed"] == 1


async def test_each_relay_hop_resumes_when_a_reconnecting_kiosk_makes_it_dial_again(net):
    # A relay dials its upstream for a kiosk connection; after its first, each of its dials resumes
    # (its first too, if an earlier test in this process left a session in its shared context).
    for _ in range(3):
        conn = await Kiosk(net.context(KIOSK), net.state_dir).connect()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.run)
            stream = await conn.open_stream(request_headers("GET", "/bench/blob?size=10", ROUTER), end_stream=True)
            assert header(await stream.receive_headers(), b":status") == b"200"
            while await stream.receive_chunk() is not None:
                pass
            conn.close()
    for hop in (ROUTER, "ec-router-a", "dmz-relay-a", "issuance-center"):
        server = net.servers[hop]
        assert server.connections >= 1 and server.resumed >= server.connections - 1, hop


async def test_a_session_from_one_kiosk_does_not_pass_from_another_kiosks_address(net):
    router = net.topo.node(ROUTER)
    ctx = _fresh_client_ctx(net.pki, KIOSK)
    first = await connect_h2(router.address, router.port, router.id, ctx, local_address=net.topo.node(KIOSK).address)
    assert await _get(net, first, "/bench/blob?size=10", router.id) == b"200"
    ctx.load_cert_chain(*net.pki.node_paths(OTHER_KIOSK))  # its own certificate now, the other's ticket still
    conn = await connect_h2(
        router.address, router.port, router.id, ctx, local_address=net.topo.node(OTHER_KIOSK).address
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.run)
        with trio.fail_after(5):
            await conn.closed.wait()  # the router closes right after the handshake
    assert net.servers[ROUTER].resumed == 1
    assert net.servers[ROUTER].denials["peer-identity"] == 1


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])  # the load generator's workers run uvloop
def test_the_load_generators_kiosk_dialling_again_resumes(pki, loop):
    """kiosk_emu's asyncio client (connect_h2 in h2asyncio) against an asyncio TLS server that
    answers with an empty SETTINGS frame: the second connection resumes the first one's ticket."""
    client_ctx = _fresh_client_ctx(pki, KIOSK)
    reused: list[bool] = []
    served_twice = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        reused.append(writer.get_extra_info("ssl_object").session_reused)
        if len(reused) == 2:
            served_twice.set()
        writer.write(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")  # SETTINGS, empty
        await reader.read()
        writer.close()

    async def dial_twice() -> None:
        server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=_server_ctx(pki, ROUTER))
        port = server.sockets[0].getsockname()[1]
        async with server:
            first = await h2asyncio.connect_h2("127.0.0.1", port, ROUTER, client_ctx)
            for _ in range(500):  # the ticket comes with the server's first record
                if sessions_of(client_ctx).offer(ROUTER) is not None:
                    break
                await asyncio.sleep(0.01)
            first.close()
            second = await h2asyncio.connect_h2("127.0.0.1", port, ROUTER, client_ctx)
            await asyncio.wait_for(served_twice.wait(), 5)
            second.close()

    (uvloop.run if loop == "uvloop" else asyncio.run)(dial_twice())
    assert reused == [False, True]
