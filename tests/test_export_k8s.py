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
from topology.export.k8s import (
    ExportError,
    KubeOptions,
    dump,
    export_k8s,
    exported_nodes,
    grouped,
    monitoring_files,
    pki_files,
    pki_topology,
)
from topology.export.netpol import (
    GROUP_LABEL,
    NODE_LABEL,
    ROLE_LABEL,
    impairment_text,
    node_labels,
)
from topology.pki import PKI
from topology.policy.compiler import reachability
from topology.policy.monitoring import (
    METRICS_PORT,
    MONITORING_PRINCIPAL,
    metrics_reachability,
)
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
    return topo, export_k8s(topo, opts, files, monitoring_files(pki))


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


def _node_workloads(manifests):
    """The topology nodes' workloads: every one but the monitoring principal's scraper."""
    return [
        w
        for w in _of_kind(manifests, "Deployment", "StatefulSet", "Job")
        if NODE_LABEL in w["spec"]["template"]["metadata"]["labels"]
    ]


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
        "Namespace",
        "ConfigMap",
        "Secret",
        "NetworkPolicy",
        "Service",
        "Deployment",
        "StatefulSet",
        "Job",
    }


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
        assert {"name": "metrics", "port": METRICS_PORT, "targetPort": METRICS_PORT, "protocol": "TCP"} in service[
            "spec"
        ]["ports"]
        pem = base64.b64decode(secrets[f"{name}-pki"]["data"][f"nodes.{name}.pem"])
        sans = x509.load_pem_x509_certificate(pem).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert name in sans.get_values_for_type(x509.DNSName)  # what the client's server_hostname checks


def test_workloads_are_labelled_probed_and_mount_their_pki_read_only(exported):
    topo, manifests = exported
    workloads = _node_workloads(manifests)
    assert {w["spec"]["template"]["metadata"]["labels"][NODE_LABEL] for w in workloads} == {
        n.id for n in topo.nodes.values() if n.is_server or n.kind == "kiosk"
    }
    secrets = {s["metadata"]["name"] for s in _of_kind(manifests, "Secret")}
    for w in workloads:
        labels = w["spec"]["template"]["metadata"]["labels"]
        node = topo.node(labels[NODE_LABEL])
        assert labels == node_labels(node) and (
            node.operator is None or labels["konbini.dev/operator"] == node.operator
        )
        pod = w["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["securityContext"]["readOnlyRootFilesystem"] and pod["securityContext"]["runAsNonRoot"]
        assert container["resources"]["requests"]["memory"] and container["resources"]["limits"]["memory"]
        pki_mount = next(m for m in container["volumeMounts"] if m["name"] == "pki")
        assert pki_mount["readOnly"] is True
        pki_volume = next(v for v in pod["volumes"] if v["name"] == "pki")
        assert pki_volume["secret"]["secretName"] == f"{node.id}-pki" in secrets
        if node.is_server:
            assert (
                container["readinessProbe"]["tcpSocket"]["port"] == node.port == container["ports"][0]["containerPort"]
            )
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
            notes = {
                **policies.get(f"{end}-ingress", {}).get("metadata", {}).get("annotations", {}),
                **policies.get(f"{end}-egress", {}).get("metadata", {}).get("annotations", {}),
            }
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
    return [
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": n.id, "namespace": namespace},
            "spec": {
                "selector": {"matchLabels": {NODE_LABEL: n.id}},
                "template": {
                    "metadata": {"labels": node_labels(n)},
                    "spec": {"containers": [{"name": "x", "image": "x"}]},
                },
            },
        }
        for n in topo.nodes.values()
        if not (n.is_server or n.kind == "kiosk")
    ]


def _ports(text: str | None) -> set[int | str]:
    if text is None:
        return {"*"}
    out: set[int | str] = set()
    for part in text.replace(" ", "").split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def _endpoint(labels: dict) -> str | None:
    """A pod's name in the matrices: its node id, or the monitoring principal for the scraper."""
    return MONITORING_PRINCIPAL if labels.get(ROLE_LABEL) == MONITORING_PRINCIPAL else labels.get(NODE_LABEL)


def analyzed_connectivity(
    manifests, topo, workdir: Path, stand_ins: list[dict] | None = None
) -> set[tuple[str, str, str, int | str]]:
    """(source, destination, protocol, port) the policies let through, by network-config-analyzer.

    Endpoints are named by node id (from the workloads' labels); outside the namespace by
    "ns/name", and "*" for any address (an ip block)."""
    workdir.mkdir(parents=True, exist_ok=True)
    workloads = _of_kind(manifests, "Deployment", "StatefulSet", "Job") + (
        _stand_ins(topo, "konbini") if stand_ins is None else stand_ins
    )
    (workdir / "policies.yaml").write_text(dump(_of_kind(manifests, "NetworkPolicy")))
    (workdir / "pods.yaml").write_text(dump(workloads + _of_kind(manifests, "Namespace")) + "---\n" + _CLUSTER)
    report = workdir / "connectivity.txt"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "nca",
            "--connectivity",
            str(workdir / "policies.yaml"),
            "--pod_list",
            str(workdir / "pods.yaml"),
            "--ns_list",
            str(workdir / "pods.yaml"),
            "-o",
            "txt_no_fw_rules",
            "-f",
            str(report),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert report.exists(), run.stdout + run.stderr
    node_of = {
        f"{w['metadata']['namespace']}/{w['metadata']['name']}": _endpoint(w["spec"]["template"]["metadata"]["labels"])
        for w in workloads
    }
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
    """Where the analysed connectivity and the compiler's reachability matrix disagree, pair by pair;
    the matrix includes the scrape port's (the monitoring principal to every server's METRICS_PORT,
    no topology node to any)."""
    matrix = reachability(topo) + metrics_reachability(topo)
    nodes = set(topo.nodes) | {MONITORING_PRINCIPAL}
    inside = {c for c in connectivity if c[0] in nodes or c[1] in nodes}
    diffs = []
    for r in matrix:
        got = (r.src, r.dst, "TCP", r.port) in inside
        if got != r.allowed:
            diffs.append(
                f"{r.src} -> {r.dst}:{r.port}: matrix says {'allow' if r.allowed else 'deny'}, policies {'allow' if got else 'deny'}"
            )
    pairs = {(r.src, r.dst, "TCP", r.port) for r in matrix}  # reported above
    dialers = {r.src for r in matrix if r.allowed}
    dns = {(src, "kube-system/coredns", proto, 53) for src in dialers for proto in ("TCP", "UDP")}
    diffs += [
        f"{c[0]} -> {c[1]} {c[2]}/{c[3]}: allowed by the policies, in no allow-list"
        for c in sorted(inside - pairs - dns, key=str)
    ]
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
        rules[0]["from"] = [
            peer for peer in rules[0]["from"] if peer["podSelector"]["matchLabels"][NODE_LABEL] != "dmz-relay-a"
        ]

    def kiosk_to_center(p):  # SEC-SN-3: a kiosk straight to the issuance center, opened on both ends
        port = topo.node("issuance-center").port
        p["kiosk-a1-1-egress"]["spec"]["egress"].append(
            {
                "to": [{"podSelector": {"matchLabels": {NODE_LABEL: "issuance-center"}}}],
                "ports": [{"protocol": "TCP", "port": port}],
            }
        )
        p["issuance-center-ingress"]["spec"]["ingress"].append(
            {
                "from": [{"podSelector": {"matchLabels": {NODE_LABEL: "kiosk-a1-1"}}}],
                "ports": [{"protocol": "TCP", "port": port}],
            }
        )

    removed = policy_differences(
        topo, analyzed_connectivity(_mutated(manifests, drop_dmz_relay_a), topo, tmp_path / "removed")
    )
    assert removed == ["dmz-relay-a -> issuance-center:8443: matrix says allow, policies deny"]
    added = policy_differences(
        topo, analyzed_connectivity(_mutated(manifests, kiosk_to_center), topo, tmp_path / "added")
    )
    assert added == ["kiosk-a1-1 -> issuance-center:8443: matrix says deny, policies allow"]


def test_the_equivalence_check_catches_the_metrics_port_opened_to_a_kiosk(default_exported, tmp_path):
    """A kiosk admitted to its store router's scrape port (both ends opened) is a path the annex
    forbids metrics to become; and a scraper that lost one server is caught too."""
    topo, manifests = default_exported
    metrics = {"protocol": "TCP", "port": METRICS_PORT}

    def kiosk_to_metrics(p):
        p["kiosk-a1-1-egress"]["spec"]["egress"].append(
            {"to": [{"podSelector": {"matchLabels": {NODE_LABEL: "store-router-a1"}}}], "ports": [metrics]}
        )
        p["metrics-ingress"]["spec"]["ingress"][0]["from"].append(
            {"podSelector": {"matchLabels": {NODE_LABEL: "kiosk-a1-1"}}}
        )

    def center_unscraped(p):
        p["metrics-ingress"]["spec"]["podSelector"]["matchExpressions"].append(
            {"key": NODE_LABEL, "operator": "NotIn", "values": ["issuance-center"]}
        )

    opened = policy_differences(
        topo, analyzed_connectivity(_mutated(manifests, kiosk_to_metrics), topo, tmp_path / "kiosk")
    )
    assert opened == [f"kiosk-a1-1 -> store-router-a1:{METRICS_PORT}: matrix says deny, policies allow"]
    closed = policy_differences(
        topo, analyzed_connectivity(_mutated(manifests, center_unscraped), topo, tmp_path / "center")
    )
    assert closed == [f"monitoring -> issuance-center:{METRICS_PORT}: matrix says allow, policies deny"]


def test_the_monitoring_pod_scrapes_every_server_with_the_monitoring_certificate(exported):
    """70-monitoring.yaml: the `monitoring` principal's certificate (the only one the scrape port
    answers) as a Secret, mounted where the scrape config's tls_config looks, targets the Service
    names of every server, and the pod labelled as `metrics-ingress` admits."""
    topo, manifests = exported
    secret, config, deployment = manifests["70-monitoring.yaml"]
    pem = base64.b64decode(secret["data"][f"{MONITORING_PRINCIPAL}.pem"])
    cn = x509.load_pem_x509_certificate(pem).subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
    assert cn == MONITORING_PRINCIPAL and set(secret["data"]) == {"network-ca.pem", "monitoring.pem", "monitoring.key"}
    (job,) = yaml.safe_load(config["data"]["prometheus.yml"])["scrape_configs"]
    assert job["scheme"] == "https"
    assert {t for c in job["static_configs"] for t in c["targets"]} == {
        f"{n.id}:{METRICS_PORT}" for n in topo.nodes.values() if n.is_server
    }
    pod = deployment["spec"]["template"]
    mounts = {m["name"]: m["mountPath"] for m in pod["spec"]["containers"][0]["volumeMounts"]}
    assert {Path(job["tls_config"][k]).parent.as_posix() for k in ("ca_file", "cert_file", "key_file")} == {
        mounts["pki"]
    }
    assert {Path(job["tls_config"][k]).name for k in ("ca_file", "cert_file", "key_file")} == set(secret["data"])
    ingress = next(p for p in manifests["30-network-policies.yaml"] if p["metadata"]["name"] == "metrics-ingress")
    assert ingress["spec"]["ingress"][0]["from"] == [{"podSelector": {"matchLabels": {ROLE_LABEL: "monitoring"}}}]
    assert pod["metadata"]["labels"][ROLE_LABEL] == "monitoring"


# -- the CLI, the image, compose --------------------------------------------------------------


def test_export_command_writes_the_manifests(tmp_path, capsys):
    assert (
        main(["export", "k8s", "--out", str(tmp_path / "k8s"), "--state", str(tmp_path / "st"), "--namespace", "kb"])
        == 0
    )
    assert "manifests in" in capsys.readouterr().out
    written = sorted(p.name for p in (tmp_path / "k8s").iterdir())
    assert written[0] == "00-namespace.yaml" and "30-network-policies.yaml" in written
    docs = list(yaml.safe_load_all((tmp_path / "k8s" / "30-network-policies.yaml").read_text()))
    assert all(d["metadata"]["namespace"] == "kb" for d in docs)
    assert (
        main(
            ["export", "k8s", "--out", str(tmp_path / "bad"), "--state", str(tmp_path / "st"), "--namespace", "Bad_NS"]
        )
        == 2
    )
    assert capsys.readouterr().err.startswith("konbini: ")


def test_containerfile_passes_hadolint():
    run = subprocess.run(
        [str(BIN / "hadolint"), "--failure-threshold", "info", str(ROOT / "Containerfile")],
        capture_output=True,
        text=True,
        timeout=60,
    )
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


def test_compose_containers_find_their_identities_as_files_in_the_read_only_pki(tmp_path, capsys):
    """A container mounts pki/ read-only, so it cannot write its files out of nodes.db itself."""
    assert main(["export", "compose", "--out", str(tmp_path / "compose.yaml"), "--state", str(tmp_path / "st")]) == 0
    doc = yaml.safe_load((tmp_path / "compose.yaml").read_text())
    nodes = tmp_path / "st" / "pki" / "nodes"
    assert all((nodes / f"{name}.pem").is_file() and (nodes / f"{name}.key").is_file() for name in doc["services"])


# -- grouped (the national topology) ----------------------------------------------------------


def _grouped_default(tmp_path_factory):
    path = ROOT / "topology" / "default.yaml"
    topo = load_topology(path)
    opts = KubeOptions(topology_text=path.read_text(), group_stores=True)
    pki = PKI.ensure(tmp_path_factory.mktemp("grouped"), pki_topology(topo, opts))
    return topo, export_k8s(
        topo, opts, {n.id: pki_files(pki, n) for n in exported_nodes(topo, opts)}, monitoring_files(pki)
    )


def test_grouped_policies_open_exactly_the_matrix_widened_to_the_operators_store_side(tmp_path_factory, tmp_path):
    """Grouped, network-config-analyzer on the default topology: every allowed pair still passes,
    and what passes beyond the matrix is only a kiosk reaching another store of its own operator
    (the node's certificate check refuses it there)."""
    topo, manifests = _grouped_default(tmp_path_factory)
    assert not any(
        n.kind in ("store-router", "store-controller", "kiosk")
        for n in (
            topo.node(w["spec"]["template"]["metadata"]["labels"][NODE_LABEL]) for w in _node_workloads(manifests)
        )
    )
    groups = {}
    for node in topo.nodes.values():
        if node.kind in ("kiosk", "store-router", "store-controller", "wifi"):
            groups[node.id] = f"{node.kind}-{node.operator}"
    pods = [
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": n.id, "namespace": "konbini"},
            "spec": {
                "selector": {"matchLabels": {NODE_LABEL: n.id}},
                "template": {
                    "metadata": {"labels": {**node_labels(n), GROUP_LABEL: groups[n.id]}},
                    "spec": {"containers": [{"name": "x", "image": "x"}]},
                },
            },
        }
        for n in topo.nodes.values()
        if n.id in groups
    ]  # stand-ins: each store-side node a pod of its group
    diffs = policy_differences(topo, analyzed_connectivity(manifests, topo, tmp_path, stand_ins=pods))
    widened = re.compile(
        r"^(kiosk-(\w)\d-\d) -> (store-router|store-controller)-\2\d:8443: matrix says deny, policies allow$"
    )
    assert diffs and all(widened.match(d) for d in diffs), [d for d in diffs if not widened.match(d)]


def test_national_export_is_bounded_and_its_manifests_validate(tmp_path):
    """The national file (248k nodes): the core runs node by node, the store side is policy groups.
    Every policy and every kind of manifest validated strictly; Secrets, Services and Deployments
    sampled (their shape is the per-node export's, validated in full above)."""
    path = ROOT / "topology" / "national.yaml"
    topo = load_topology(path)
    opts = KubeOptions(topology_text=path.read_text())
    assert grouped(topo, opts)
    pki = PKI.ensure(tmp_path, pki_topology(topo, opts))
    nodes = exported_nodes(topo, opts)
    manifests = export_k8s(topo, opts, {n.id: pki_files(pki, n) for n in nodes}, monitoring_files(pki))
    assert len(nodes) < 2000 and all(n.kind not in ("kiosk", "store-router", "store-controller") for n in nodes)
    policies = manifests["30-network-policies.yaml"]
    assert len(policies) < 2 * len(nodes) + 50
    for doc in (
        policies + manifests["00-namespace.yaml"] + manifests["10-topology.yaml"] + manifests["70-monitoring.yaml"]
    ):
        _validate(doc)
    for name in ("20-pki-secrets.yaml", "40-services.yaml", "50-nodes.yaml"):
        for doc in manifests[name][::100]:
            _validate(doc)
    ec = next(p for p in policies if p["metadata"]["name"] == "ec-router-a-ingress")
    assert ec["spec"]["ingress"][0]["from"] == [{"podSelector": {"matchLabels": {GROUP_LABEL: "store-router-a"}}}]
    assert sum(len(dump(docs)) for docs in manifests.values()) < 64 << 20
