"""Every node's Prometheus metrics, scraped from a running topology with a real TLS client: the
counters move with real requests and denials, only the monitoring principal may scrape (the store
side never reaches the center, not even for metrics), and no personal data is in the text."""

from __future__ import annotations

import shutil
import ssl

import pytest
import trio
from trio.testing import memory_stream_pair

from gateway.node.metrics import read_request_head
from gateway.protocol.http import request_headers
from gateway.protocol.messages import IssueRequest
from kiosk_emu.kiosk import issue_at
from topology.check.scrape import sample
from topology.policy.monitoring import (
    METRICS_PORT,
    MONITORING_ADDRESS,
    MONITORING_PRINCIPAL,
    MetricsAllowList,
    metrics_reachability,
)
from topology.spec.model import STORE_KINDS

MUNI_A, MUNI_C = "131016", "271004"
REFUSED = (OSError, ssl.SSLError, trio.BrokenResourceError, trio.TooSlowError)


def _client_tls(net, identity: str) -> ssl.SSLContext:
    """A client context with the certificate of `identity`: the monitoring principal or a node."""
    chain, key = net.pki.principal_paths(identity) if identity == MONITORING_PRINCIPAL else net.pki.node_paths(identity)
    ctx = ssl.create_default_context(cafile=str(net.pki.network_ca_path))
    ctx.load_cert_chain(str(chain), str(key))
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


async def scrape(net, node_id: str, *, source: str = MONITORING_ADDRESS, identity: str = MONITORING_PRINCIPAL) -> str:
    """GET /metrics over HTTP/1.1 and mutual TLS from `source`; the body, or an exception if refused."""
    node = net.topo.node(node_id)
    with trio.fail_after(10):
        tcp = await trio.open_tcp_stream(node.address, METRICS_PORT, local_address=source)
        tls = trio.SSLStream(tcp, _client_tls(net, identity), server_hostname=node_id)
        try:
            await tls.send_all(f"GET /metrics HTTP/1.1\r\nhost: {node_id}\r\naccept: text/plain\r\n\r\n".encode())
            answer = b""
            while data := await tls.receive_some(65536):
                answer += data
        finally:
            await trio.aclose_forcefully(tls)
    head, _, body = answer.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise ConnectionError(f"scrape of {node_id} answered {head[:40]!r}")
    return body.decode()


async def test_scrape_answers_prometheus_text_for_every_server_node(net):
    for node_id in net.servers:
        text = await scrape(net, node_id)
        assert sample(text, "konbini_node_info", node=node_id, kind=net.topo.node(node_id).kind) == 1.0
        assert sample(text, "konbini_scrapes_total") == 1.0  # this scrape, counted as it is answered


async def test_a_kiosk_refused_around_its_store_router_is_a_peer_address_denial_in_the_metrics(net):
    with pytest.raises((*REFUSED, ConnectionError)):
        await net.context("kiosk-a1-1").connect(net.topo.node("issuance-center"))
    text = await scrape(net, "issuance-center")
    assert sample(text, "konbini_denials_total", reason="peer-address") == 1.0
    assert sample(text, "konbini_tls_handshakes_total", result="ok") == 0.0  # refused before TLS


async def test_an_issuance_moves_the_center_and_relay_counters(net):
    card = net.cards.ensure_pool(1)[0]
    r = await issue_at(net, "kiosk-a1-1", card, "1234", IssueRequest(MUNI_A, "residence-record"))
    assert r.status == "issued"
    center = await scrape(net, "issuance-center")
    assert sample(center, "konbini_issuances_total", cert_type="residence-record") == 1.0
    assert sample(center, "konbini_notices_total", result="new") == 1.0
    assert sample(center, "konbini_notices_awaited") == 0.0  # the notice is in
    assert sample(center, "konbini_requests_total", method="POST") >= 4  # session, auth, issue, notice
    assert sample(center, "konbini_tls_handshakes_total", result="ok") >= 1
    assert sample(center, "konbini_streams_in_flight") == 0.0
    for relay in ("store-router-a1", "ec-router-a", "dmz-relay-a"):
        text = await scrape(net, relay)
        assert sample(text, "konbini_relayed_bytes_total", direction="response") >= r.document_bytes
        assert sample(text, "konbini_relayed_bytes_total", direction="request") > 0
        assert sample(text, "konbini_connections_total") >= 1
    # no personal data: neither the card's id nor its certificate's fingerprint, nor the issuance
    for node_id in net.servers:
        text = await scrape(net, node_id)
        assert card.card_id not in text and card.fingerprint not in text and r.issuance_id not in text


async def test_a_refused_issuance_is_counted_by_its_reason(net):
    card = net.cards.ensure_pool(2)[1]
    r = await issue_at(net, "kiosk-b1-1", card, "1234", IssueRequest(MUNI_C, "residence-record"))
    assert (r.status, r.reason) == ("refused", "municipality-not-participating")
    text = await scrape(net, "issuance-center")
    assert sample(text, "konbini_refusals_total", reason="municipality-not-participating") == 1.0
    assert sample(text, "konbini_issuances_total", cert_type="residence-record") == 0.0


async def test_upstream_unreachable_is_counted_by_the_relay(net):
    # the center stops accepting the DMZ relay (another node's allow-list): the relay's next hop is gone
    net.servers["issuance-center"].allow = net.servers["ec-router-a"].allow
    ec = net.topo.node("ec-router-a")
    async with trio.open_nursery() as nursery:
        conn = await net.context("store-router-a1").connect(ec)
        nursery.start_soon(conn.run)
        st = await conn.open_stream(request_headers("GET", "/bench/x?size=0", ec.id), end_stream=True)
        headers = await st.receive_headers()
        assert dict(headers)[b":status"] == b"502"
        conn.close()
    text = await scrape(net, "dmz-relay-a")
    assert sample(text, "konbini_upstream_failures_total", reason="unreachable") >= 1


@pytest.mark.parametrize("identity", ["kiosk-a1-1", "store-router-a1"])
async def test_store_side_node_cannot_scrape_the_center_from_its_own_address(net, identity):
    source = net.topo.node(identity).address
    with pytest.raises((*REFUSED, ConnectionError)):
        await scrape(net, "issuance-center", source=source, identity=identity)
    text = await scrape(net, "issuance-center")
    assert sample(text, "konbini_denials_total", reason="peer-address") == 1.0  # before the TLS handshake


@pytest.mark.parametrize("identity", ["kiosk-a1-1", "store-router-a1", "store-controller-a1"])
async def test_store_side_certificate_is_refused_even_from_the_monitoring_address(net, identity):
    with pytest.raises((*REFUSED, ConnectionError)):
        await scrape(net, "issuance-center", identity=identity)
    text = await scrape(net, "issuance-center")
    assert sample(text, "konbini_denials_total", reason="peer-identity") == 1.0


async def test_the_scrape_port_answers_only_get_metrics(net):
    node = net.topo.node("issuance-center")
    tcp = await trio.open_tcp_stream(node.address, METRICS_PORT, local_address=MONITORING_ADDRESS)
    tls = trio.SSLStream(tcp, _client_tls(net, MONITORING_PRINCIPAL), server_hostname=node.id)
    await tls.send_all(b"POST /v1/session HTTP/1.1\r\nhost: issuance-center\r\ncontent-length: 0\r\n\r\n")
    answer = b""
    with trio.fail_after(10):
        while data := await tls.receive_some(65536):
            answer += data
    await trio.aclose_forcefully(tls)
    assert answer.startswith(b"HTTP/1.1 403")
    assert sample(await scrape(net, node.id), "konbini_denials_total", reason="request-not-allowed") == 1.0


def test_no_topology_node_may_reach_any_metrics_port(topo):
    matrix = metrics_reachability(topo)
    allowed = {(r.src, r.dst) for r in matrix if r.allowed}
    assert allowed == {(MONITORING_PRINCIPAL, n.id) for n in topo.nodes.values() if n.is_server}
    store_side = [r for r in matrix if topo.nodes[r.dst].kind in STORE_KINDS or r.src in topo.nodes]
    assert store_side and not any(r.allowed for r in store_side if r.src in topo.nodes)
    checks = MetricsAllowList(topo, "loopback")
    for node in topo.nodes.values():
        assert not checks.check_address(node.address).allowed
        assert not checks.check_identity(MONITORING_ADDRESS, node.id).allowed


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed (make setup installs it)")
async def test_curl_with_the_monitoring_certificate_scrapes_the_center(net):
    cert, key = net.pki.principal_paths(MONITORING_PRINCIPAL)
    center = net.topo.node("issuance-center")
    cmd = [
        "curl",
        "-sS",
        "-m",
        "20",
        "--cacert",
        str(net.pki.network_ca_path),
        "--cert",
        str(cert),
        "--key",
        str(key),
        "--interface",
        MONITORING_ADDRESS,
        f"https://{center.address}:{METRICS_PORT}/metrics",
    ]
    with trio.fail_after(30):
        proc = await trio.run_process(cmd, capture_stdout=True, capture_stderr=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert sample(proc.stdout.decode(), "konbini_node_info", node="issuance-center") == 1.0


def test_a_nodes_metrics_are_made_at_first_use_and_keep_collectors_registered_before():
    """Start-up does not pay for fifteen series per node; a collector registered before the first
    scrape (an app's own state) is still in it, and the node's counters start from zero."""
    from prometheus_client.core import GaugeMetricFamily

    from gateway.node.metrics import NodeMetrics

    class AppState:
        def collect(self):
            g = GaugeMetricFamily("konbini_test_app_state", "An app's state, read at scrape time.")
            g.add_metric([], 7)
            yield g

    m = NodeMetrics("store-router-a1", "store_router")
    m.register(AppState())
    assert "registry" not in vars(m)  # nothing made yet
    m.request("POST")
    assert "registry" in vars(m)
    text = m.exposition().decode()
    assert sample(text, "konbini_node_info", node="store-router-a1", kind="store_router") == 1.0
    assert sample(text, "konbini_requests_total", method="POST") == 1.0
    assert sample(text, "konbini_test_app_state") == 7.0
    with pytest.raises(AttributeError):
        _ = m.no_such_series  # a typo is still an error, not a silent new series


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"GET /metrics HTTP/1.1\r\nhost: n\r\n\r\n", ("GET", "/metrics")),
        (b"GET /metrics HTTP/1.1\nhost: n\n\n", ("GET", "/metrics")),  # bare LF, as h11 reads it
        (b"GET /metrics\r\n\r\n", None),  # no HTTP version
        (b"GET /metrics HTTP/1.1\r\n\r\n", None),  # HTTP/1.1 without host
        (b"GET /metrics HTTP/1.1\r\nx: " + b"y" * 9000 + b"\r\n\r\n", None),  # over REQUEST_HEAD_LIMIT
    ],
)
async def test_the_scrape_port_reads_a_request_head_as_h11_does(head, expected):
    """The scrape port's request reader (gateway/node/metrics.py), over an in-memory stream left open
    after the head: it answers from the head alone, and what is not a request is None."""
    client, server = memory_stream_pair()
    await client.send_all(head)
    with trio.fail_after(5):  # a bound on a hang, not a timing: the head is all there is
        assert await read_request_head(server) == expected
