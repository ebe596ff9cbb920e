"""`konbini export k8s` without a cluster: every manifest validates against the Kubernetes schemas
(kubernetes-validate, strict), and the NetworkPolicies allow exactly the policy compiler's
reachability matrix, pair by pair, as network-config-analyzer (an independent NetworkPolicy
evaluator from IBM) computes their connectivity. Deliberately wrong policies must be caught by
the same check. Plus the Containerfile linted with hadolint, and the compose file's networks.
"""

from __future__ import annotations

import base64
import copy
import re
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import msgspec
import pytest
import yaml
from cryptography import x509

from topology.cli.main import main
from topology.export.compose import export_compose
from topology.export.k8s import ExportError, KubeOptions, dump, export_k8s, pki_files
from topology.export.netpol import NODE_LABEL, impairment_text, node_labels
from topology.pki import PKI
from topology.policy.compiler import reachability
from topology.spec.load import load_topology

ROOT = Path(__file__).resolve().parent.parent
TOPOLOGIES = ("default.yaml", "realistic.yaml")
K8S_VERSION = "1.35"  # validated against this release's strict schemas (shipped in kubernetes-validate)
BIN = Path(sys.executable).parent


def _export(name, tmp_path_factory):
    path = ROOT / "topology" / name
    topo = load_topology(path)
    pki = PKI.ensure(tmp_path_factory.mktemp("state"), topo)
    files = {n.id: pki_files(pki, n) for n in topo.nodes.values() if n.is_server or n.kind == "kiosk"}
    opts = KubeOptions(namespace="konbini", image="registry.example/konbini:1", topology_text=path.read_text())
    return topo, export_k8s(topo, opts, files)


@pytest.fixture(scope="module", params=TOPOLOGIES)
def exported(request, tmp_path_factory):
    return _export(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def default_exported(tmp_path_factory):
    return _export("default.yaml", tmp_path_factory)


def _all(manifests):
    return [doc for docs in manifests.values() for doc in docs]


def _of_kind(manifests, *kinds):
    return [d for d in _all(manifests) if d["kind"] in kinds]


# -- schemas ----------------------------------------------------------------------------------


def _validate(doc) -> None:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError as exc:  # a warning in its CLI; a failure here
        raise AssertionError(exc.message) from None


def test_every_manifest_validates_against_the_strict_kubernetes_schemas(exported):
    _, manifests = exported
    docs = _all(manifests)
    for doc in docs:
        _validate(doc)
    # and survives the trip through the YAML files `kubectl apply` reads
    for name, file_docs in manifests.items():
        assert list(yaml.safe_load_all(dump(file_docs))) == file_docs, name
    assert {d["kind"] for d in docs} == {
        "Namespace", "ConfigMap", "Secret", "NetworkPolicy", "Service", "Deployment", "StatefulSet", "Job"}


def test_strict_validation_rejects_an_unknown_field(exported):
    """The schema check can fail: a misspelt probe field is refused, not ignored."""
    _, manifests = exported
    bad = copy.deepcopy(_of_kind(manifests, "Deployment")[0])
    container = bad["spec"]["template"]["spec"]["containers"][0]
    container["readinessProbes"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="readinessProbes"):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


# -- what the manifests say -------------------------------------------------------------------


def test_services_carry_node_ids_so_the_certificates_still_verify(exported):
    topo, manifests = exported
    services = {s["metadata"]["name"]: s for s in _of_kind(manifests, "Service")}
    assert set(services) == {n.id for n in topo.nodes.values() if n.is_server}
    secrets = {s["metadata"]["name"]: s for s in _of_kind(manifests, "Secret")}
    for name, service in services.items():
        node = topo.node(name)
        assert service["spec"]["selector"] == {NODE_LABEL: name}
        assert node.port in [p["port"] for p in service["spec"]["ports"]]
        pem = base64.b64decode(secrets[f"{name}-pki"]["data"][f"nodes.{name}.pem"])
        sans = x509.load_pem_x509_certificate(pem).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert name in sans.get_values_for_type(x509.DNSName)  # what the client's server_hostname checks


def test_workloads_are_labelled_probed_and_mount_their_pki_read_only(exported):
    topo, manifests = exported
    workloads = _of_kind(manifests, "Deployment", "StatefulSet", "Job")
    assert {w["spec"]["template"]["metadata"]["labels"][NODE_LABEL] for w in workloads} == {
        n.id for n in topo.nodes.values() if n.is_server or n.kind == "kiosk"}
    secrets = {s["metadata"]["name"] for s in _of_kind(manifests, "Secret")}
    for w in workloads:
        labels = w["spec"]["template"]["metadata"]["labels"]
        node = topo.node(labels[NODE_LABEL])
        assert labels == node_labels(node) and (node.operator is None or labels["konbini.dev/operator"] == node.operator)
        pod = w["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["securityContext"]["readOnlyRootFilesystem"] and pod["securityContext"]["runAsNonRoot"]
        assert container["resources"]["requests"]["memory"] and container["resources"]["limits"]["memory"]
        pki_mount = next(m for m in container["volumeMounts"] if m["name"] == "pki")
        assert pki_mount["readOnly"] is True
        pki_volume = next(v for v in pod["volumes"] if v["name"] == "pki")
        assert pki_volume["secret"]["secretName"] == f"{node.id}-pki" in secrets
        if node.is_server:
            assert container["readinessProbe"]["tcpSocket"]["port"] == node.port == container["ports"][0]["containerPort"]
            assert w["kind"] == ("StatefulSet" if node.kind == "issuance-center" else "Deployment")
        else:
            assert w["kind"] == "Job" and "--kiosk" in container["args"] and node.id in container["args"]


def test_only_the_ocsp_responder_and_kiosks_receive_the_jpki_ca_key(exported):
    topo, manifests = exported
    holders = {s["metadata"]["labels"][NODE_LABEL] for s in _of_kind(manifests, "Secret") if "jpki-ca.key" in s["data"]}
    assert holders == {n.id for n in topo.nodes.values() if n.kind in ("ocsp", "kiosk")}
    assert not any("network-ca.key" in s["data"] for s in _of_kind(manifests, "Secret"))


def test_impaired_lines_become_annotations_with_a_note(exported):
    topo, manifests = exported
    impaired = [line for line in topo.lines if impairment_text(line.impair)]
    assert impaired, "both shipped topologies impair some line"
    policies = {p["metadata"]["name"]: p for p in _of_kind(manifests, "NetworkPolicy")}
    for line in impaired:
        for end in (line.a, line.b):
            notes = {**policies.get(f"{end}-ingress", {}).get("metadata", {}).get("annotations", {}),
                     **policies.get(f"{end}-egress", {}).get("metadata", {}).get("annotations", {})}
            assert f"impair.konbini.dev/{line.id}" in notes, (line.id, end)
            assert "Kubernetes does not apply" in notes["konbini.dev/impair-note"]


def test_a_node_id_that_is_no_service_name_is_refused():
    topo = load_topology(ROOT / "topology" / "default.yaml")
    node = msgspec.structs.replace(topo.node("ocsp"), id="OCSP_1")
    renamed = msgspec.structs.replace(topo, nodes={**topo.nodes, node.id: node})
    with pytest.raises(ExportError, match="'OCSP_1' is not a Kubernetes name"):
        export_k8s(renamed, KubeOptions(), {})


# -- NetworkPolicy equivalence, by network-config-analyzer ------------------------------------

_CONN = re.compile(r"^(?P<src>\S+) => (?P<dst>\S+) : (?P<conn>.+)$")
_ENDPOINT = re.compile(r"^(?P<ns>[^/]+)/(?P<name>[^\[]+)\[(?P<kind>\w+)\]$")
_PROTO = re.compile(r"\{protocols:(?P<protos>[A-Z, ]+?)(?:,dst_ports:(?P<ports>[0-9,\- ]+))?\}")
# Stand-ins the analysis needs and the export leaves to the cluster: Wi-Fi runs no workload but
# is a policy subject (it must reach nothing), and the cluster DNS is what `<node>-egress` opens.
_CLUSTER = """
apiVersion: v1
kind: Namespace
metadata: {name: kube-system, labels: {kubernetes.io/metadata.name: kube-system}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: coredns, namespace: kube-system}
spec:
  selector: {matchLabels: {k8s-app: kube-dns}}
  template: {metadata: {labels: {k8s-app: kube-dns}}, spec: {containers: [{name: dns, image: coredns}]}}
"""


def _stand_ins(topo, namespace) -> list[dict]:
    return [{"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": n.id, "namespace": namespace},
             "spec": {"selector": {"matchLabels": {NODE_LABEL: n.id}},
                      "template": {"metadata": {"labels": node_labels(n)}, "spec": {"containers": [{"name": "x", "image": "x"}]}}}}
            for n in topo.nodes.values() if not (n.is_server or n.kind == "kiosk")]


def _ports(text: str | None) -> set[int | str]:
    if text is None:
        return {"*"}
    out: set[int | str] = set()
    for part in text.replace(" ", "").split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def analyzed_connectivity(manifests, topo, workdir: Path) -> set[tuple[str, str, str, int | str]]:
    """(source, destination, protocol, port) the policies let through, by network-config-analyzer.

    Endpoints are named by node id (from the workloads' labels); outside the namespace by
    "ns/name", and "*" for any address (an ip block)."""
    workdir.mkdir(parents=True, exist_ok=True)
    workloads = _of_kind(manifests, "Deployment", "StatefulSet", "Job") + _stand_ins(topo, "konbini")
    (workdir / "policies.yaml").write_text(dump(_of_kind(manifests, "NetworkPolicy")))
    (workdir / "pods.yaml").write_text(dump(workloads + _of_kind(manifests, "Namespace")) + "---\n" + _CLUSTER)
    report = workdir / "connectivity.txt"
    run = subprocess.run(
        [sys.executable, "-m", "nca", "--connectivity", str(workdir / "policies.yaml"), "--pod_list", str(workdir / "pods.yaml"),
         "--ns_list", str(workdir / "pods.yaml"), "-o", "txt_no_fw_rules", "-f", str(report)],
        capture_output=True, text=True, timeout=120,
    )
    assert report.exists(), run.stdout + run.stderr
    node_of = {f"{w['metadata']['namespace']}/{w['metadata']['name']}": w["spec"]["template"]["metadata"]["labels"].get(NODE_LABEL)
               for w in workloads}
    found: set[tuple[str, str, str, int | str]] = set()
    for line in report.read_text().splitlines():
        m = _CONN.match(line.strip())
        if m is None:
            continue
        ends = []
        for end in (m["src"], m["dst"]):
            e = _ENDPOINT.match(end)
            ends.append((node_of.get(f"{e['ns']}/{e['name']}") or f"{e['ns']}/{e['name']}") if e else "*")
        if m["conn"].strip() == "All connections":
            found.add((ends[0], ends[1], "*", "*"))
            continue
        conns = list(_PROTO.finditer(m["conn"]))
        assert conns, f"unparsed connection in the analyzer's report: {line}"
        for c in conns:
            for proto in c["protos"].replace(" ", "").split(","):
                found.update((ends[0], ends[1], proto, port) for port in _ports(c["ports"]))
    assert found, report.read_text()
    return found


def policy_differences(topo, connectivity) -> list[str]:
    """Where the analysed connectivity and the compiler's reachability matrix disagree, pair by pair."""
    nodes = set(topo.nodes)
    inside = {c for c in connectivity if c[0] in nodes or c[1] in nodes}
    diffs = []
    for r in reachability(topo):
        got = (r.src, r.dst, "TCP", r.port) in inside
        if got != r.allowed:
            diffs.append(f"{r.src} -> {r.dst}:{r.port}: matrix says {'allow' if r.allowed else 'deny'}, policies {'allow' if got else 'deny'}")
    pairs = {(r.src, r.dst, "TCP", r.port) for r in reachability(topo)}  # reported above
    dialers = {r.src for r in reachability(topo) if r.allowed}
    dns = {(src, "kube-system/coredns", proto, 53) for src in dialers for proto in ("TCP", "UDP")}
    diffs += [f"{c[0]} -> {c[1]} {c[2]}/{c[3]}: allowed by the policies, in no allow-list" for c in sorted(inside - pairs - dns, key=str)]
    diffs += [f"{c[0]} -> {c[1]} {c[2]}/{c[3]}: DNS missing" for c in sorted(dns - inside, key=str)]
    return diffs


def test_network_policies_allow_exactly_the_reachability_matrix(exported, tmp_path):
    topo, manifests = exported
    matrix = reachability(topo)
    assert len(matrix) == 798 and sum(r.allowed for r in matrix) >= 38  # 39 nodes x 21 servers, minus self
    assert policy_differences(topo, analyzed_connectivity(manifests, topo, tmp_path)) == []


def _mutated(manifests, mutate):
    out = copy.deepcopy(manifests)
    policies = {p["metadata"]["name"]: p for p in out["30-network-policies.yaml"]}
    mutate(policies)
    return out


def test_the_equivalence_check_catches_a_removed_allow_and_an_added_forbidden_pair(default_exported, tmp_path):
    topo, manifests = default_exported

    def drop_dmz_relay_a(p):  # the center no longer lets operator a's DMZ relay in
        rules = p["issuance-center-ingress"]["spec"]["ingress"]
        rules[0]["from"] = [peer for peer in rules[0]["from"] if peer["podSelector"]["matchLabels"][NODE_LABEL] != "dmz-relay-a"]

    def kiosk_to_center(p):  # SEC-SN-3: a kiosk straight to the issuance center, opened on both ends
        port = topo.node("issuance-center").port
        p["kiosk-a1-1-egress"]["spec"]["egress"].append(
            {"to": [{"podSelector": {"matchLabels": {NODE_LABEL: "issuance-center"}}}], "ports": [{"protocol": "TCP", "port": port}]})
        p["issuance-center-ingress"]["spec"]["ingress"].append(
            {"from": [{"podSelector": {"matchLabels": {NODE_LABEL: "kiosk-a1-1"}}}], "ports": [{"protocol": "TCP", "port": port}]})

    removed = policy_differences(topo, analyzed_connectivity(_mutated(manifests, drop_dmz_relay_a), topo, tmp_path / "removed"))
    assert removed == ["dmz-relay-a -> issuance-center:8443: matrix says allow, policies deny"]
    added = policy_differences(topo, analyzed_connectivity(_mutated(manifests, kiosk_to_center), topo, tmp_path / "added"))
    assert added == ["kiosk-a1-1 -> issuance-center:8443: matrix says deny, policies allow"]


# -- the CLI, the image, compose --------------------------------------------------------------


def test_export_command_writes_the_manifests(tmp_path, capsys):
    assert main(["export", "k8s", "--out", str(tmp_path / "k8s"), "--state", str(tmp_path / "st"), "--namespace", "kb"]) == 0
    assert "manifests in" in capsys.readouterr().out
    written = sorted(p.name for p in (tmp_path / "k8s").iterdir())
    assert written[0] == "00-namespace.yaml" and "30-network-policies.yaml" in written
    docs = list(yaml.safe_load_all((tmp_path / "k8s" / "30-network-policies.yaml").read_text()))
    assert all(d["metadata"]["namespace"] == "kb" for d in docs)
    assert main(["export", "k8s", "--out", str(tmp_path / "bad"), "--state", str(tmp_path / "st"), "--namespace", "Bad_NS"]) == 2
    assert capsys.readouterr().err.startswith("konbini: ")


def test_containerfile_passes_hadolint():
    run = subprocess.run([str(BIN / "hadolint"), "--failure-threshold", "info", str(ROOT / "Containerfile")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    text = (ROOT / "Containerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim-bookworm$", text, re.M) and "requirements.lock" in text
    assert re.search(r"^USER 10001", text, re.M)


def test_compose_networks_mirror_the_lines(tmp_path):
    topo = load_topology(ROOT / "topology" / "default.yaml")
    doc = export_compose(topo, "konbini:1", "/t.yaml", "/pki")
    assert set(doc["networks"]) == {line.id for line in topo.lines}
    assert all(net["internal"] for net in doc["networks"].values())
    for name, service in doc["services"].items():
        assert set(service["networks"]) == {line.id for line in topo.lines if name in (line.a, line.b)}
        assert service["read_only"] and service["user"] == "10001:10001"
