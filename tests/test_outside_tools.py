"""The outside tools' verdicts (topology/check/outside.py) read from saved output of the real tools:
testssl.sh 3.0.8 and `openssl s_client` against konbini nodes in netns mode (pass) and against an
`openssl s_server` offering TLS 1.2 with a CBC cipher and no client authentication (fail); nmap
from the Wi-Fi and store namespaces (pass) and against a host with an open and closed ports (fail)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from topology.check.outside import (
    OPENSSL_WRAPPER,
    UNROUTED,
    read_nmap,
    read_sclient,
    read_testssl,
    tls_targets,
)
from topology.netns.plan import build_plan

DATA = Path(__file__).parent / "data" / "outside"


def _json(name: str) -> list[dict]:
    return json.loads((DATA / name).read_text())


def test_testssl_sees_tls13_only_and_no_weak_cipher_on_a_node() -> None:
    v = read_testssl(_json("testssl-tls13-only.json"))
    assert v["ok"] and v["tls13"] and v["older_offered"] == [] and v["weak_offered"] == []


def test_testssl_fails_a_tls12_server_with_a_cbc_cipher() -> None:
    v = read_testssl(_json("testssl-tls12-weak.json"))
    assert not v["ok"] and not v["tls13"]
    assert v["older_offered"] == ["TLS1_2"] and v["weak_offered"] == ["cipherlist_AVERAGE"]


def test_testssl_output_cut_short_is_a_failure() -> None:
    findings = [f for f in _json("testssl-tls13-only.json") if not f["id"].startswith("cipherlist_")]
    v = read_testssl(findings)
    assert not v["ok"] and "cipherlist_NULL" in v["weak_offered"]


def test_sclient_sees_a_node_ask_for_a_certificate_and_refuse_without_one() -> None:
    line = read_sclient((DATA / "sclient-no-cert-line.txt").read_text())
    assert line["ok"] and line["alert"]
    metrics = read_sclient((DATA / "sclient-no-cert-metrics.txt").read_text(), http=True)  # reset, no HTTP response
    assert metrics["ok"] and not metrics["answered"]
    # on an h2 port a hang-up alone is no refusal (an accepting server hangs up on HTTP/1.1 too)
    assert not read_sclient((DATA / "sclient-no-cert-metrics.txt").read_text(), http=False)["ok"]


def test_sclient_fails_a_server_without_client_authentication() -> None:
    v = read_sclient((DATA / "sclient-no-client-auth.txt").read_text(), http=True)
    assert not v["ok"] and not v["certificate_request"] and v["answered"]


def test_nmap_from_wifi_reaches_nothing_of_the_store() -> None:
    hosts = read_nmap((DATA / "nmap-wifi-to-store.xml").read_text())
    assert len(hosts) == 4 and all(h["reachable"] == [] and h["filtered"] == 1027 for h in hosts.values())


def test_nmap_from_a_store_reaches_its_ec_router_only() -> None:
    hosts = read_nmap((DATA / "nmap-store-to-center.xml").read_text())
    assert hosts["198.18.0.1"]["reachable"] == []  # the issuance center
    assert hosts["198.18.10.1"]["reachable"] == ["8443/open"]  # the control: nmap does see an open port there


def test_nmap_counts_closed_ports_as_reachable() -> None:
    hosts = read_nmap((DATA / "nmap-open-and-closed.xml").read_text())
    assert hosts["127.0.0.1"]["reachable"] == ["22/closed", "4433/open", "8443/closed"]


def test_openssl_wrapper_points_feature_probes_at_an_unrouted_address(topo) -> None:
    assert f"-connect {UNROUTED}:4433" in OPENSSL_WRAPPER and topo.by_address(UNROUTED) is None


def test_every_server_kind_gets_a_tls_target_with_an_admitted_source(topo, monkeypatch) -> None:
    plan = build_plan(topo, "x")
    # the kernel's source choice, as `ip route get` gives it in netns mode: a namespace's first address
    firsts = {plan.namespace(s): plan.local_addresses(s)[0] for s in plan.sites}
    firsts[plan.monitoring.namespace] = plan.monitoring.address
    monkeypatch.setattr("topology.check.outside._kernel_source", lambda ns, addr: firsts[ns])
    targets = tls_targets(topo, plan)
    assert {t.kind for t in targets} == {n.kind for n in topo.nodes.values() if n.is_server}
    line = {t.kind for t in targets if t.surface == "line"}
    assert line == {"ec-router", "dmz-relay", "issuance-center", "municipality"}
    assert all(t.port == 9464 and t.source == "monitoring" for t in targets if t.surface == "metrics")


def test_testssl_that_could_not_connect_says_so() -> None:
    findings = [
        {"id": "optimal_proto", "finding": "Your OpenSSL cannot connect to 198.18.11.1:9464."},
        {"id": "scanTime", "finding": "Scan interrupted"},
    ]
    v = read_testssl(findings)
    assert not v["ok"] and not v["scanned"] and "cannot connect" in v["summary"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_openssl_wrapper_reads_a_tls13_client_auth_handshake_as_connected(tmp_path) -> None:
    """testssl.sh's "can I connect" probe against a TLS 1.3 server that requires a client
    certificate: plain s_client's exit status is a race the alert usually wins; the wrapper's
    is 0 every time, and a refused protocol or a closed port still fail."""
    key, cert = tmp_path / "k.pem", tmp_path / "c.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-subj",
            "/CN=node",
            "-days",
            "1",
        ],
        check=True,
        capture_output=True,
    )
    wrapper = tmp_path / "openssl"
    wrapper.write_text(OPENSSL_WRAPPER)
    wrapper.chmod(0o755)
    port = _free_port()
    server = subprocess.Popen(
        [
            "openssl",
            "s_server",
            "-accept",
            f"127.0.0.1:{port}",
            "-cert",
            str(cert),
            "-key",
            str(key),
            "-Verify",
            "1",
            "-tls1_3",
            "-quiet",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(50):  # until it listens
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)

        def probe(binary: str, *extra: str) -> int:
            return subprocess.run(
                [binary, "s_client", "-connect", f"127.0.0.1:{port}", "-msg", *extra],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=15,
            ).returncode

        plain = [probe("openssl") for _ in range(10)]
        wrapped = [probe(str(wrapper)) for _ in range(10)]
        assert wrapped == [0] * 10, (plain, wrapped)
        assert probe(str(wrapper), "-tls1_2") != 0  # refused before the client-certificate check
    finally:
        server.kill()
        server.wait()
    assert probe(str(wrapper)) != 0  # nothing listening
