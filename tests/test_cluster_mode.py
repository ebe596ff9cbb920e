"""Cluster mode for real on one loopback: four nodes of the default topology (store router, EC
router, DMZ relay, issuance center), each in its own `nodehost --mode cluster` process, each in
its own mount namespace with a private /etc/hosts that maps the Service names (the node ids) to
distinct 127.0.0.x addresses, and its PKI Secret (exactly `pki_files`, what the export ships)
bind-mounted read-only. A request goes kiosk → router → EC router → DMZ relay → center with every
hop dialling the next by name; a peer with the wrong certificate is refused by the app allow-list,
because in cluster mode the address check is NetworkPolicy's (gateway/node/cluster.py)."""

from __future__ import annotations

import base64
import json
import os
import selectors
import shlex
import shutil
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from gateway.node.cluster import (
    BY_NETWORK_POLICY,
    CLUSTER,
    ByCertificate,
    node_allowlists,
    scrape_allowlist,
)
from gateway.node.server import NodeContext, connect_h2
from gateway.protocol.errors import ConnectionClosed, LinkDown, StreamReset
from gateway.protocol.http import request_headers
from gateway.protocol.streams import header
from topology.export.k8s import STATE, TOPOLOGY_PATH, KubeOptions, export_k8s, pki_files
from topology.export.netpol import NODE_LABEL
from topology.pki import PKI
from topology.policy.monitoring import METRICS_PORT, MONITORING_PRINCIPAL
from topology.spec.load import load_topology

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DEFAULT = ROOT / "topology" / "default.yaml"
CHAIN = {
    "store-router-a1": "127.0.0.21",
    "ec-router-a": "127.0.0.22",
    "dmz-relay-a": "127.0.0.23",
    "issuance-center": "127.0.0.24",
    "ocsp": "127.0.0.25",
    "muni-a": "127.0.0.26",
}
KIOSK = "kiosk-a1-1"
REFUSED = (
    OSError,
    ssl.SSLError,
    trio.BrokenResourceError,
    trio.TooSlowError,
    ConnectionError,
    StreamReset,
    ConnectionClosed,
)

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("mount") is None,
    reason="CLUSTER-MODE PROCESS TEST SKIPPED: needs root and util-linux unshare/mount (private /etc/hosts per node)",
)


# -- pure: the allow-lists by certificate ------------------------------------------------------


def test_cluster_allowlist_leaves_the_address_to_network_policy_and_checks_the_certificate():
    topo = load_topology(DEFAULT)
    allow = node_allowlists(topo, CLUSTER)["ec-router-a"]
    assert isinstance(allow, ByCertificate)
    assert allow.check_address("10.244.3.7") is BY_NETWORK_POLICY  # a pod address the topology never names
    assert allow.check_identity("10.244.3.7", "store-router-a1").rule == "nodes.ec-router-a.allow[0]"
    assert (
        allow.check_identity("10.244.3.7", "kiosk-a1-1").reason == "peer-identity"
    )  # a kiosk never reaches the EC router
    assert allow.check_identity("10.244.3.7", "store-router-b1").reason == "peer-identity"  # another operator's store
    assert allow.check_request("store-router-a1", "POST", "/v1/session").allowed
    assert allow.check_request("store-router-a1", "GET", "/admin").reason == "request-not-allowed"


def test_cluster_scrape_port_admits_only_the_monitoring_certificate():
    scrape = scrape_allowlist(load_topology(DEFAULT), CLUSTER)
    assert scrape.check_identity("10.0.0.9", MONITORING_PRINCIPAL).allowed
    assert scrape.check_identity("10.0.0.9", "store-router-a1").reason == "peer-identity"
    assert not scrape.check_request("GET", "/v1/session").allowed


def test_cluster_context_binds_all_and_dials_the_service_name():
    topo = load_topology(DEFAULT)
    ctx = NodeContext(topo, topo.node("store-router-a1"), pki=None, mode=CLUSTER)
    assert ctx.address == "0.0.0.0"
    assert ctx.address_of(topo.node("ec-router-a")) == "ec-router-a"


# -- for real: separate processes, names from a private hosts file -----------------------------


@dataclass
class Pod:
    """What the export gives one node's pod: its container args and its PKI Secret, as files."""

    args: list[str]
    state: Path


def _pods(tmp: Path, topo, issuer: PKI, node_ids) -> dict[str, Pod]:
    """The exported manifests, unpacked: each pod's args (paths moved into `tmp`) and its Secret's
    files written where the volume would mount them (`items`: Secret key -> path under STATE/pki)."""
    files = {n.id: pki_files(issuer, n) for n in topo.nodes.values() if n.is_server or n.kind == "kiosk"}
    manifests = export_k8s(topo, KubeOptions(topology_text=DEFAULT.read_text()), files)
    secrets = {s["metadata"]["name"]: s["data"] for s in manifests["20-pki-secrets.yaml"]}
    pods = {}
    for w in manifests["50-nodes.yaml"] + manifests["60-kiosk-load.yaml"]:
        node_id = w["spec"]["template"]["metadata"]["labels"][NODE_LABEL]
        if node_id not in node_ids:
            continue
        spec = w["spec"]["template"]["spec"]
        (volume,) = [v["secret"] for v in spec["volumes"] if v["name"] == "pki"]
        state = tmp / node_id
        for item in volume["items"]:
            (state / "pki" / item["path"]).parent.mkdir(parents=True, exist_ok=True)
            (state / "pki" / item["path"]).write_bytes(base64.b64decode(secrets[volume["secretName"]][item["key"]]))
        moved = {
            TOPOLOGY_PATH: str(DEFAULT),
            STATE: str(state),
            "python": sys.executable,
            "konbini": str(BIN / "konbini"),
        }
        pods[node_id] = Pod([moved.get(a, a) for a in spec["containers"][0]["args"]], state)
    assert set(pods) == set(node_ids)
    return pods


def _in_pod(pod: Pod, hosts: Path, extra: list[str], **popen) -> subprocess.Popen:
    """The pod's args in a private mount namespace: its own /etc/hosts, its PKI Secret read-only."""
    pki = pod.state / "pki"
    script = (
        f"mount --bind {hosts} /etc/hosts && mount --bind {pki} {pki} && mount -o remount,bind,ro {pki} {pki} && "
        f"exec {shlex.join(pod.args + extra)}"
    )
    return subprocess.Popen(
        ["unshare", "-m", "sh", "-c", script], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen
    )


def _wait_ready(procs: dict[str, subprocess.Popen], timeout: float = 60.0) -> None:
    """Block on each process's stdout until it says "ready" (or fails), within one deadline."""
    deadline = time.monotonic() + timeout
    for node_id, proc in procs.items():
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            if not sel.select(max(0.0, deadline - time.monotonic())):
                raise AssertionError(f"{node_id} not ready in {timeout} s")
        line = proc.stdout.readline()
        if line != b"ready\n":
            proc.kill()
            raise AssertionError(f"{node_id} did not start: {line!r} {proc.stderr.read().decode()[-2000:]}")


def _client_tls(issuer: PKI, identity: str, alpn: str) -> ssl.SSLContext:
    chain, key = issuer.principal_paths(identity) if identity == MONITORING_PRINCIPAL else issuer.node_paths(identity)
    ctx = ssl.create_default_context(cafile=str(issuer.network_ca_path))
    ctx.load_cert_chain(str(chain), str(key))
    ctx.set_alpn_protocols([alpn])
    return ctx


async def _bench_get(issuer: PKI, size: int) -> tuple[int, int]:
    """As kiosk-a1-1: GET /bench through the chain; (status, body bytes)."""
    conn = await connect_h2(CHAIN["store-router-a1"], 8443, "store-router-a1", _client_tls(issuer, "kiosk-a1-1", "h2"))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.run)
        stream = await conn.open_stream(
            request_headers("GET", f"/bench/x?size={size}", "store-router-a1"), end_stream=True
        )
        status = int(header(await stream.receive_headers(), b":status"))
        body = await stream.read_body()
        conn.close()
    return status, len(body)


async def _scrape(issuer: PKI, node_id: str) -> str:
    tcp = await trio.open_tcp_stream(CHAIN[node_id], METRICS_PORT)
    tls = trio.SSLStream(tcp, _client_tls(issuer, MONITORING_PRINCIPAL, "http/1.1"), server_hostname=node_id)
    await tls.send_all(f"GET /metrics HTTP/1.1\r\nhost: {node_id}\r\n\r\n".encode())
    answer = b""
    while data := await tls.receive_some(65536):
        answer += data
    await trio.aclose_forcefully(tls)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:80]
    return answer.decode()


async def _refused_as(issuer: PKI, identity: str, node_id: str) -> None:
    """Present `identity`'s (valid, same-CA) certificate to `node_id`; the node must close on it."""
    refused = False
    try:
        with trio.fail_after(10):
            conn = await connect_h2(CHAIN[node_id], 8443, node_id, _client_tls(issuer, identity, "h2"))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(conn.run)
                stream = await conn.open_stream(request_headers("GET", "/bench/x?size=1", node_id), end_stream=True)
                await stream.receive_headers()
    except* REFUSED:
        refused = True
    assert refused, f"{node_id} answered {identity}"


def _denials(metrics: str, reason: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(f'konbini_denials_total{{reason="{reason}"}}'):
            return float(line.split()[-1])
    return 0.0


IN_HOURS = "2026-11-25T10:00:00+09:00"  # within service hours whatever the wall clock says


@needs_root
def test_cluster_mode_nodes_dial_upstreams_by_service_name_and_refuse_the_wrong_certificate(tmp_path):
    topo = load_topology(DEFAULT)
    issuer = PKI.ensure(tmp_path / "issuer", topo)
    pods = _pods(tmp_path, topo, issuer, [*CHAIN, KIOSK])
    states = {node_id: pod.state for node_id, pod in pods.items()}
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n" + "".join(f"{ip} {name}\n" for name, ip in CHAIN.items()))
    secret_files = {node_id: sorted(p.relative_to(s) for p in (s / "pki").rglob("*")) for node_id, s in states.items()}
    procs = {
        node_id: _in_pod(pods[node_id], hosts, ["--bind", CHAIN[node_id], "--clock", IN_HOURS], stdin=subprocess.PIPE)
        for node_id in CHAIN
    }
    try:
        _wait_ready(procs)
        # the kiosk's load Job, as exported: `konbini issue --cluster`, one whole issuance by name
        job = _in_pod(pods[KIOSK], hosts, ["--clock", IN_HOURS], stdin=subprocess.DEVNULL)
        job_out, job_err = job.communicate(timeout=120)
        assert job.returncode == 0, job_out.decode() + job_err.decode()[-2000:]
        issued = json.loads(job_out)

        async def scenario() -> tuple[tuple[int, int], str, str]:
            got = await _bench_get(issuer, 200_000)
            await _refused_as(issuer, "kiosk-a1-1", "ec-router-a")  # a kiosk skipping its store router
            await _refused_as(issuer, "ec-router-b", "dmz-relay-a")  # another operator's EC router
            with pytest.raises(LinkDown) as wrong_name:  # a name the server's certificate does not carry
                await connect_h2(
                    CHAIN["ec-router-a"], 8443, "dmz-relay-a", _client_tls(issuer, "store-router-a1", "h2")
                )
            assert isinstance(wrong_name.value.__cause__, ssl.SSLCertVerificationError)
            return got, await _scrape(issuer, "ec-router-a"), await _scrape(issuer, "dmz-relay-a")

        (status, size), ec_metrics, dmz_metrics = trio.run(scenario)
    finally:
        for proc in procs.values():
            proc.stdin.close()  # nodehost stops at EOF on stdin
        for proc in procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    assert issued["status"] == "issued" and issued["signature_valid"] is True, issued
    assert [hop["node"] for hop in issued["hops"]][:4] == [
        "issuance-center",
        "dmz-relay-a",
        "ec-router-a",
        "store-router-a1",
    ]
    assert (status, size) == (200, 200_000)  # through three relays, each dialling the next by its Service name
    assert (
        _denials(ec_metrics, "peer-identity") == 1
    )  # the address passed (NetworkPolicy's job), the certificate did not
    assert _denials(dmz_metrics, "peer-identity") == 1
    assert _denials(ec_metrics, "peer-address") == 0
    for node_id, state in states.items():  # the read-only Secret mount: nothing added, nothing changed
        assert sorted(p.relative_to(state) for p in (state / "pki").rglob("*")) == secret_files[node_id]
    assert all(proc.returncode == 0 for proc in procs.values()), {
        n: p.stderr.read().decode()[-500:] for n, p in procs.items()
    }
