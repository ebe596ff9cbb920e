"""A topology as Kubernetes manifests: one workload and one Service per server node, a load Job
per kiosk, the test PKI as one Secret per node, the topology file as a ConfigMap, and the
NetworkPolicies from `netpol`.

Services are named after the node ids, because every node certificate carries its id as a DNS
SAN and every client verifies the server against that name (`gateway/transport/tls.py`): a
client in the namespace dialling `ec-router-a` reaches the Service of that name and the
certificate still verifies. Ids that are no Kubernetes Service name are refused, not renamed.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass

import msgspec
import yaml

from topology.export.names import check_name as _check_service_name
from topology.export.names import service_name
from topology.export.netpol import (
    LABEL,
    MONITORING_LABELS,
    Impairments,
    Subjects,
    network_policies,
    node_labels,
    selector,
)
from topology.pki import PKI
from topology.policy.monitoring import METRICS_PATH, METRICS_PORT, MONITORING_PRINCIPAL
from topology.spec.kinds import KINDS
from topology.spec.model import STORE_KINDS, Mode, Node, Topology

_RUN_AS = 10001  # the image's non-root user (Containerfile)
TOPOLOGY_PATH = "/etc/konbini/topology.yaml"
STATE = "/state"
# A pod holds no topology address: cluster mode binds all, dials upstreams by Service name, checks
# peers by certificate (the address half is the NetworkPolicy's) and reads the PKI Secret read-only
# from STATE/pki (gateway/node/cluster.py).
NODE_MODE = Mode.CLUSTER.value  # a plain str: the manifests are YAML

KIOSK_ISSUANCES = 10  # completions of each kiosk's load Job, one issuance per pod
# Past this many store-side nodes the export groups them (netpol.Subjects): policies by kind and
# operator, and no store-side workloads (docs/kubernetes.md: the national figures).
AUTO_GROUP_AT = 1000


class ExportError(Exception):
    """A topology that cannot be exported as asked; the message names the node or field."""


@dataclass(frozen=True)
class KubeOptions:
    namespace: str = "konbini"
    image: str = "konbini:latest"
    topology_text: str = ""  # the topology file, shipped as the ConfigMap
    topology_name: str = "topology.yaml"
    group_stores: bool | None = None  # None: group when the store side has more than AUTO_GROUP_AT nodes
    prometheus_image: str = "quay.io/prometheus/prometheus:v3.5.0"  # the scraper in 70-monitoring.yaml


def check_name(what: str, name: str) -> None:
    try:
        _check_service_name(what, name)
    except ValueError as exc:
        raise ExportError(str(exc)) from None


def _meta(name: str, namespace: str, node: Node | None = None, annotations: dict | None = None) -> dict:
    meta: dict = {
        "name": name,
        "namespace": namespace,
        "labels": node_labels(node) if node else {f"{LABEL}/part": "topology"},
    }
    if annotations:
        meta["annotations"] = annotations
    return meta


# -- the test PKI as Secrets ------------------------------------------------------------------


def pki_files(pki: PKI, node: Node) -> dict[str, bytes]:
    """What one node needs of the PKI, by path under `pki/`: the network CA, its own identity, and
    per kind the JPKI CA (the center verifies cards; OCSP signs responses and the CRL; a kiosk
    issues its emulated cards, test PKI only, and checks the center's signature on every document
    against the center's certificate: INT-1, kiosk_emu/kiosk.py)."""
    cert, key = pki.node_paths(node.id)  # written from nodes.db; a pod reads the files (PKI.load)
    extra = KINDS[node.kind].pki_files
    for path in extra:
        if path.startswith("nodes/"):  # another node's certificate (a kiosk's: the center's), written on first use
            pki.node_paths(path.removeprefix("nodes/").removesuffix(".pem"))
    paths = ["network-ca.pem", f"nodes/{cert.name}", f"nodes/{key.name}", *extra]
    return {p: (pki.dir / p).read_bytes() for p in paths}


def _secret_key(path: str) -> str:
    return path.replace("/", ".")  # Secret keys allow [-._a-zA-Z0-9]; the volume maps them back to paths


def _secret(node: Node, files: dict[str, bytes], namespace: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "immutable": True,
        "metadata": _meta(f"{node.id}-pki", namespace, node),
        "data": {_secret_key(p): base64.b64encode(b).decode("ascii") for p, b in sorted(files.items())},
    }


# -- pods -------------------------------------------------------------------------------------


def _resources(kind: str) -> dict:
    """The kind's figures (topology/spec/kinds.py): per-process RSS measured idle and under the bench."""
    r = KINDS[kind].resources
    if r is None:
        raise ExportError(f"a {kind} runs no workload")
    return {"requests": {"cpu": r.cpu, "memory": r.memory}, "limits": {"memory": r.memory_limit}}


def _pod_spec(
    node: Node, files: list[str], command: list[str], opts: KubeOptions, restart: str, state_claim: bool
) -> dict:
    container: dict = {
        "name": node.kind,
        "image": opts.image,
        "args": command,  # args, not command: the image's ENTRYPOINT (tini, forwarding SIGTERM) stays PID 1
        "env": [{"name": "PYTHONDONTWRITEBYTECODE", "value": "1"}, {"name": "HOME", "value": "/tmp"}],
        "resources": _resources(node.kind),
        "securityContext": {
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": "topology", "mountPath": "/etc/konbini", "readOnly": True},
            {"name": "pki", "mountPath": f"{STATE}/pki", "readOnly": True},
            {"name": "state", "mountPath": STATE},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    if node.is_server:
        container["ports"] = [
            {"name": "h2-tls", "containerPort": node.port, "protocol": "TCP"},
            {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
        ]
        # a TCP connect to the real TLS port: the listener is bound. In cluster mode the address is
        # NetworkPolicy's to check, so the kubelet's connect reaches TLS and its close is counted as
        # a `tls-handshake` denial, every period: the price of probing the port that serves.
        container["readinessProbe"] = {"tcpSocket": {"port": node.port}, "periodSeconds": 5, "failureThreshold": 3}
        container["stdin"] = True  # nodehost runs until its stdin reaches EOF
    volumes: list[dict] = [
        {
            "name": "topology",
            "configMap": {"name": "topology", "items": [{"key": opts.topology_name, "path": "topology.yaml"}]},
        },
        {
            "name": "pki",
            "secret": {
                "secretName": f"{node.id}-pki",
                "defaultMode": 0o440,
                "items": [{"key": _secret_key(p), "path": p} for p in sorted(files)],
            },
        },
        {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},
    ]
    if not state_claim:
        volumes.append({"name": "state", "emptyDir": {"sizeLimit": "256Mi"}})
    return {
        "restartPolicy": restart,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,  # no FOO_SERVICE_HOST variables for 20 Services
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": _RUN_AS,
            "runAsGroup": _RUN_AS,
            "fsGroup": _RUN_AS,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }


def nodehost_command(node: Node) -> list[str]:
    """A server node's process in a container (both exports run it so)."""
    return [
        "python",
        "-m",
        "topology.launch.nodehost",
        "--topology",
        TOPOLOGY_PATH,
        "--state",
        STATE,
        "--mode",
        NODE_MODE,
        "--nodes",
        node.id,
    ]


def _workload(node: Node, files: list[str], opts: KubeOptions, impair: Impairments) -> dict:
    """The kind's workload: a StatefulSet where its state must outlive the pod (the center's ledger)."""
    stateful = KINDS[node.kind].workload == "StatefulSet"
    template = {
        "metadata": _template_meta(node, impair),
        "spec": _pod_spec(node, files, nodehost_command(node), opts, "Always", state_claim=stateful),
    }
    spec: dict = {"replicas": 1, "selector": selector(node.id), "template": template}
    if stateful:
        spec["serviceName"] = node.id
        spec["volumeClaimTemplates"] = [
            {
                "metadata": {"name": "state"},
                "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
            }
        ]
    else:
        spec["strategy"] = {"type": "Recreate"}  # one identity, one pod: never two at once
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet" if stateful else "Deployment",
        "metadata": _meta(node.id, opts.namespace, node),
        "spec": spec,
    }


def _template_meta(node: Node, impair: Impairments) -> dict:
    meta: dict = {"labels": node_labels(node)}
    notes = impair.annotations(node.id)
    if (
        node.is_server
    ):  # the scrape port answers only the monitoring principal's certificate (topology/policy/monitoring.py)
        notes = {
            **notes,
            "prometheus.io/scrape": "true",
            "prometheus.io/port": str(METRICS_PORT),
            "prometheus.io/scheme": "https",
            "prometheus.io/path": METRICS_PATH,
        }
    if notes:
        meta["annotations"] = notes
    return meta


def _service(node: Node, topo: Topology, namespace: str) -> dict:
    """Named after the node id (the certificate's DNS SAN); every port an allow rule opens, and the
    scrape port (the monitoring pod's targets are these names: `scrape_config`)."""
    ports = sorted({node.port, *(rule.port for rule in node.allow if rule.port)})
    if METRICS_PORT in ports:
        raise ExportError(f"node {node.id!r} serves on {METRICS_PORT}, the metrics port; move it")
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(service_name(node.id), namespace, node),
        "spec": {
            "type": "ClusterIP",
            "selector": selector(node.id)["matchLabels"],
            "ports": [
                {"name": f"h2-tls-{p}" if p != node.port else "h2-tls", "port": p, "targetPort": p, "protocol": "TCP"}
                for p in ports
            ]
            + [{"name": "metrics", "port": METRICS_PORT, "targetPort": METRICS_PORT, "protocol": "TCP"}],
            "publishNotReadyAddresses": False,
        },
    }


def issue_command(node: Node) -> list[str]:
    """A kiosk's issuance in a container (both exports run it so)."""
    return [
        "konbini",
        "issue",
        "--topology",
        TOPOLOGY_PATH,
        "--state",
        STATE,
        "--kiosk",
        node.id,
        "--store",
        node.site,
        "--cluster",
        "--json",
    ]


def _kiosk_job(node: Node, files: list[str], opts: KubeOptions, impair: Impairments) -> dict:
    """One kiosk's load: `konbini issue` from this kiosk, KIOSK_ISSUANCES times, one pod after another
    (a pod carries one node's labels, so each kiosk is its own Job and its own policy peer)."""
    command = issue_command(node)
    template = {"metadata": _template_meta(node, impair), "spec": _pod_spec(node, files, command, opts, "Never", False)}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _meta(f"{node.id}-load", opts.namespace, node),
        "spec": {"completions": KIOSK_ISSUANCES, "parallelism": 1, "backoffLimit": 3, "template": template},
    }


def _config_map(opts: KubeOptions) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "immutable": True,
        "metadata": _meta("topology", opts.namespace),
        "data": {opts.topology_name: opts.topology_text},
    }


def _namespace(opts: KubeOptions) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": opts.namespace, "labels": {f"{LABEL}/part": "topology"}},
    }


def grouped(topo: Topology, opts: KubeOptions) -> bool:
    """Whether the store side is exported by group (policies only) rather than node by node."""
    if opts.group_stores is not None:
        return opts.group_stores
    return sum(1 for n in topo.nodes.values() if n.kind in STORE_KINDS) > AUTO_GROUP_AT


def exported_nodes(topo: Topology, opts: KubeOptions) -> list[Node]:
    """The nodes that get a workload (and so a PKI Secret): servers and kiosks, by id; grouped, the
    store side's run nowhere. Wi-Fi runs nothing in either case: a policy subject only."""
    store_side = grouped(topo, opts)
    return sorted(
        (
            n
            for n in topo.nodes.values()
            if KINDS[n.kind].workload is not None and not (store_side and n.kind in STORE_KINDS)
        ),
        key=lambda n: n.id,
    )


def pki_topology(topo: Topology, opts: KubeOptions) -> Topology:
    """What the test PKI must cover for this export: its exported nodes only. Grouped, the store
    side's 136k identities (national) would take minutes to issue and no pod would mount them."""
    nodes = exported_nodes(topo, opts)
    if not grouped(topo, opts):
        return topo
    return msgspec.structs.replace(topo, nodes={n.id: n for n in nodes})


# -- the monitoring principal: the one scraper NetworkPolicy lets reach METRICS_PORT ------------

MONITORING = "monitoring"  # its Deployment, Secret and ConfigMap names; no node may take it (the PKI reserves it)
PROMETHEUS_ETC = "/etc/prometheus"
_PROMETHEUS_USER = 65534  # the upstream image's `nobody`


def monitoring_files(pki: PKI) -> dict[str, bytes]:
    """The scraper's mTLS material: the network CA (node certificates verify against it) and the
    `monitoring` principal's certificate and key, issued on first use; Secret key -> contents."""
    cert, key = pki.principal_paths(MONITORING_PRINCIPAL)
    return {
        "network-ca.pem": (pki.dir / "network-ca.pem").read_bytes(),
        f"{MONITORING_PRINCIPAL}.pem": cert.read_bytes(),
        f"{MONITORING_PRINCIPAL}.key": key.read_bytes(),
    }


def scrape_config(servers: list[Node]) -> dict:
    """A Prometheus configuration scraping every server node over mutual TLS.

    Targets are Service names, which are the node ids the certificates carry, so Prometheus's
    default server-name check verifies each node; the client certificate is the only one the
    metrics port answers (`topology/policy/monitoring.py`). Static targets need no access to the
    Kubernetes API, which NetworkPolicy (`netpol.metrics_policies`) does not open."""
    pki = f"{PROMETHEUS_ETC}/pki"
    return {
        "global": {"scrape_interval": "15s"},
        "scrape_configs": [
            {
                "job_name": "konbini",
                "scheme": "https",
                "metrics_path": METRICS_PATH,
                "tls_config": {
                    "ca_file": f"{pki}/network-ca.pem",
                    "cert_file": f"{pki}/{MONITORING_PRINCIPAL}.pem",
                    "key_file": f"{pki}/{MONITORING_PRINCIPAL}.key",
                },
                "static_configs": [{"targets": [f"{service_name(n.id)}:{METRICS_PORT}" for n in servers]}],
            }
        ],
    }


def monitoring_manifests(opts: KubeOptions, servers: list[Node], files: dict[str, bytes]) -> list[dict]:
    """The monitoring principal's pod: its certificate as a Secret, `scrape_config` as a ConfigMap,
    and a Prometheus Deployment labelled MONITORING_LABELS (what `metrics-ingress` admits)."""
    labels = {**MONITORING_LABELS, f"{LABEL}/part": MONITORING}
    meta = {"name": MONITORING, "namespace": opts.namespace, "labels": labels}
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "immutable": True,
        "metadata": {**meta, "name": f"{MONITORING}-pki"},
        "data": {k: base64.b64encode(v).decode("ascii") for k, v in sorted(files.items())},
    }
    config = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {**meta, "name": f"{MONITORING}-scrape"},
        "data": {"prometheus.yml": yaml.safe_dump(scrape_config(servers), sort_keys=False)},
    }
    container = {
        "name": "prometheus",
        "image": opts.prometheus_image,
        "args": [
            f"--config.file={PROMETHEUS_ETC}/prometheus.yml",
            "--storage.tsdb.path=/prometheus",
            "--storage.tsdb.retention.time=1d",
        ],
        "ports": [
            {"name": "web", "containerPort": 9090, "protocol": "TCP"}
        ],  # kubectl port-forward; no policy opens it
        "resources": {
            "requests": {"cpu": "100m", "memory": "256Mi"},
            "limits": {"memory": "1Gi"},
        },  # a guess, not measured
        "securityContext": {
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": "config", "mountPath": PROMETHEUS_ETC, "readOnly": True},
            {"name": "pki", "mountPath": f"{PROMETHEUS_ETC}/pki", "readOnly": True},
            {"name": "data", "mountPath": "/prometheus"},
        ],
    }
    pod = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": _PROMETHEUS_USER,
            "runAsGroup": _PROMETHEUS_USER,
            "fsGroup": _PROMETHEUS_USER,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            {"name": "config", "configMap": {"name": f"{MONITORING}-scrape"}},
            {"name": "pki", "secret": {"secretName": f"{MONITORING}-pki", "defaultMode": 0o440}},
            {"name": "data", "emptyDir": {"sizeLimit": "2Gi"}},
        ],
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta,
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": dict(MONITORING_LABELS)},
            "strategy": {"type": "Recreate"},
            "template": {"metadata": {"labels": dict(labels)}, "spec": pod},
        },
    }
    return [secret, config, deployment]


def export_k8s(
    topo: Topology, opts: KubeOptions, files: dict[str, dict[str, bytes]], monitoring: dict[str, bytes] | None = None
) -> dict[str, list[dict]]:
    """Manifests by file name, in the order `kubectl apply -f DIR` reads them (names sort).

    `files`: node id -> its PKI files (`pki_files`), for every one of `exported_nodes`.
    `monitoring`: the scraper's files (`monitoring_files`); without them no 70-monitoring.yaml
    (the metrics policies stay: a scraper of your own, labelled MONITORING_LABELS, fits them).
    """
    check_name("namespace", opts.namespace)
    if "metrics" in topo.nodes:
        raise ExportError(
            "node id 'metrics' would share its policy name with the scrape port's (metrics-ingress); rename it"
        )
    if not opts.topology_name or not re.fullmatch(r"[-._a-zA-Z0-9]+", opts.topology_name):
        raise ExportError(f"ConfigMap key {opts.topology_name!r}: letters, digits, '-', '_' and '.' only")
    for node in topo.nodes.values():
        check_name("node id", node.id)
        if len(node.id) + len("-ingress") > 63:  # the longest name derived from it (policies, Secrets, Jobs)
            raise ExportError(f"node id {node.id!r} is too long for the names derived from it (at most 55 characters)")
    try:
        subjects = Subjects(topo, grouped(topo, opts))
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    for group in subjects.members:
        check_name("group", group)
    impair = Impairments(topo, subjects)
    secrets, workloads, services, jobs = [], [], [], []
    for node in exported_nodes(topo, opts):
        if node.id not in files:
            raise ExportError(f"no PKI files for node {node.id!r}")
        secrets.append(_secret(node, files[node.id], opts.namespace))
        if node.is_server:
            workloads.append(_workload(node, list(files[node.id]), opts, impair))
            services.append(_service(node, topo, opts.namespace))
        else:
            jobs.append(_kiosk_job(node, list(files[node.id]), opts, impair))
    out = {
        "00-namespace.yaml": [_namespace(opts)],
        "10-topology.yaml": [_config_map(opts)],
        "20-pki-secrets.yaml": secrets,
        "30-network-policies.yaml": network_policies(topo, opts.namespace, subjects, impair),
        "40-services.yaml": services,
        "50-nodes.yaml": workloads,
        "60-kiosk-load.yaml": jobs,
    }
    if monitoring is not None:
        out["70-monitoring.yaml"] = monitoring_manifests(
            opts, [n for n in exported_nodes(topo, opts) if n.is_server], monitoring
        )
    return out


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the topology file, prometheus.yml) as literal blocks, readable in place;
    PyYAML falls back to a quoted scalar where a block cannot hold the text."""


def _str(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None)


_Dumper.add_representer(str, _str)


def dump(docs: list[dict]) -> str:
    """A multi-document YAML file, keys in the order built (kubectl and humans read it)."""
    return yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120)
