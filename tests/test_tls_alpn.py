"""ALPN at a konbini server's door, in memory (two ssl.SSLObjects over MemoryBIOs, no sockets): a
client offering h2 among others gets h2; one offering only other protocols fails its handshake
with a no_application_protocol alert (RFC 7301 §3.2), not a completed handshake and a close."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from gateway.transport.tls import server_context
from tests.memtls import handshake
from topology.pki import PKI

SERVER, CLIENT = "store-router-a1", "kiosk-a1-1"


def _handshake(pki: PKI, offer: list[str]) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    server_ctx = server_context(*(Path(p) for p in pki.node_paths(SERVER)), Path(pki.network_ca_path))
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # a fresh one: client_context's is shared and h2 only
    client_ctx.load_cert_chain(*pki.node_paths(CLIENT))
    client_ctx.load_verify_locations(pki.network_ca_path)
    client_ctx.set_alpn_protocols(offer)
    server, client, _ = handshake(server_ctx, client_ctx, SERVER)
    return server, client


@pytest.fixture
def pki(state: Path, topo) -> PKI:
    return PKI.ensure(state, topo)


def test_a_client_offering_h2_among_others_gets_h2(pki):
    server, client = _handshake(pki, ["http/1.1", "h2"])
    assert server.selected_alpn_protocol() == client.selected_alpn_protocol() == "h2"


def test_a_client_offering_only_http_1_1_gets_a_no_application_protocol_alert(pki):
    with pytest.raises(ssl.SSLError) as err:
        _handshake(pki, ["http/1.1"])
    assert err.value.reason in ("NO_APPLICATION_PROTOCOL", "TLSV1_ALERT_NO_APPLICATION_PROTOCOL")
