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

import yaml

from topology.export.netpol import (
    LABEL,
    impairment_annotations,
    network_policies,
    node_labels,
    selector,
)
from topology.pki import PKI
from topology.policy.monitoring import METRICS_PATH, METRICS_PORT
from topology.spec.model import RELAY_KINDS, Node, Topology

_DNS_1035 = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")
_RUN_AS = 10001  # the image's non-root user (Containerfile)
TOPOLOGY_PATH = "/etc/konbini/topology.yaml"
STATE = "/state"
# The node servers know two address modes, loopback and netns; neither is a pod's address yet.
# Until they get a cluster mode (bind all, dial upstreams by Service name), pods run netns mode.
NODE_MODE = "netns"

# Resource figures per kind: (cpu request, memory request, memory limit). Measured here: one node
# per `topology.launch.nodehost` process, default topology, Python 3.11, idle after "ready":
# 52-53 MiB RSS for every kind (ec-router, issuance-center, ocsp, municipality, store-controller),
# under half a second of CPU to start. Under load the README's bench: a relay peaks at 123 MiB at
# relay-1m with 200 streams, and an issuance costs ~15 ms CPU across all hops (~100/s on 2 cores).
# The center, OCSP and municipality under load were not measured on their own: their limits are
# the relay's peak, a guess. Kiosk jobs run `konbini issue`, one Python process like a node.
RESOURCES: dict[str, tuple[str, str, str]] = {
    **{kind: ("100m", "64Mi", "192Mi") for kind in RELAY_KINDS},
    "issuance-center": ("200m", "96Mi", "192Mi"),
    "ocsp": ("50m", "64Mi", "128Mi"),
    "municipality": ("50m", "64Mi", "128Mi"),
    "store-controller": ("50m", "64Mi", "128Mi"),
    "kiosk": ("100m", "64Mi", "128Mi"),
}
KIOSK_ISSUANCES = 10  # completions of each kiosk's load Job, one issuance per pod


class ExportError(Exception):
    """A topology that cannot be exported as asked; the message names the node or field."""


@dataclass(frozen=True)
class KubeOptions:
    namespace: str = "konbini"
    image: str = "konbini:latest"
    topology_text: str = ""  # the topology file, shipped as the ConfigMap
    topology_name: str = "topology.yaml"


def check_name(what: str, name: str) -> None:
    if not _DNS_1035.fullmatch(name):
        raise ExportError(
            f"{what} {name!r} is not a Kubernetes name (lowercase letters, digits and '-', starting with a letter, "
            "at most 63): Services carry node ids unchanged because the certificates name them; rename it in the topology file"
        )


def _meta(name: str, namespace: str, node: Node | None = None, annotations: dict | None = None) -> dict:
    meta: dict = {"name": name, "namespace": namespace, "labels": node_labels(node) if node else {f"{LABEL}/part": "topology"}}
    if annotations:
        meta["annotations"] = annotations
    return meta


# -- the test PKI as Secrets ------------------------------------------------------------------


def pki_files(pki: PKI, node: Node) -> dict[str, bytes]:
    """What one node needs of the PKI, by path under `pki/`: the network CA, its own identity, and
    per kind the JPKI CA (the center verifies cards; OCSP signs responses and the CRL; a kiosk
    issues its emulated cards, test PKI only)."""
    paths = ["network-ca.pem", f"nodes/{node.id}.pem", f"nodes/{node.id}.key"]
    if node.kind == "issuance-center":
        paths += ["jpki-ca.pem"]
    elif node.kind == "ocsp":
        paths += ["jpki-ca.pem", "jpki-ca.key", "ocsp-signer.pem", "ocsp-signer.key"]
    elif node.kind == "kiosk":
        paths += ["jpki-ca.pem", "jpki-ca.key"]
    return {p: (pki.dir / p).read_bytes() for p in paths}


def _secret_key(path: str) -> str:
    return path.replace("/", ".")  # Secret keys allow [-._a-zA-Z0-9]; the volume maps them back to paths


def _secret(node: Node, files: dict[str, bytes], namespace: str) -> dict:
    return {
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque", "immutable": True,
        "metadata": _meta(f"{node.id}-pki", namespace, node),
        "data": {_secret_key(p): base64.b64encode(b).decode("ascii") for p, b in sorted(files.items())},
    }


# -- pods -------------------------------------------------------------------------------------


def _resources(kind: str) -> dict:
    cpu, memory, limit = RESOURCES[kind]
    return {"requests": {"cpu": cpu, "memory": memory}, "limits": {"memory": limit}}


def _pod_spec(node: Node, files: list[str], command: list[str], opts: KubeOptions, restart: str, state_claim: bool) -> dict:
    container: dict = {
        "name": node.kind,
        "image": opts.image,
        "args": command,  # args, not command: the image's ENTRYPOINT (tini, forwarding SIGTERM) stays PID 1
        "env": [{"name": "PYTHONDONTWRITEBYTECODE", "value": "1"}, {"name": "HOME", "value": "/tmp"}],
        "resources": _resources(node.kind),
        "securityContext": {
            "readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": "topology", "mountPath": "/etc/konbini", "readOnly": True},
            {"name": "pki", "mountPath": f"{STATE}/pki", "readOnly": True},
            {"name": "state", "mountPath": STATE},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    if node.is_server:
        container["ports"] = [{"name": "h2-tls", "containerPort": node.port, "protocol": "TCP"}]
        # a TCP connect to the real TLS port: the listener is bound. The node's deny-early address
        # check refuses the kubelet before TLS and counts a peer-address denial; that is the point.
        container["readinessProbe"] = {"tcpSocket": {"port": node.port}, "periodSeconds": 5, "failureThreshold": 3}
        container["stdin"] = True  # nodehost runs until its stdin reaches EOF
    volumes: list[dict] = [
        {"name": "topology", "configMap": {"name": "topology", "items": [{"key": opts.topology_name, "path": "topology.yaml"}]}},
        {"name": "pki", "secret": {"secretName": f"{node.id}-pki", "defaultMode": 0o440,
                                   "items": [{"key": _secret_key(p), "path": p} for p in sorted(files)]}},
        {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},
    ]
    if not state_claim:
        volumes.append({"name": "state", "emptyDir": {"sizeLimit": "256Mi"}})
    return {
        "restartPolicy": restart,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,  # no FOO_SERVICE_HOST variables for 20 Services
        "securityContext": {
            "runAsNonRoot": True, "runAsUser": _RUN_AS, "runAsGroup": _RUN_AS, "fsGroup": _RUN_AS,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }


def _nodehost(node: Node) -> list[str]:
    return ["python", "-m", "topology.launch.nodehost", "--topology", TOPOLOGY_PATH, "--state", STATE,
            "--mode", NODE_MODE, "--nodes", node.id]


def _workload(node: Node, files: list[str], opts: KubeOptions, topo: Topology) -> dict:
    """A StatefulSet for the issuance center (its ledger must outlive the pod), else a Deployment."""
    stateful = node.kind == "issuance-center"
    template = {
        "metadata": _template_meta(node, topo),
        "spec": _pod_spec(node, files, _nodehost(node), opts, "Always", state_claim=stateful),
    }
    spec: dict = {"replicas": 1, "selector": selector(node.id), "template": template}
    if stateful:
        spec["serviceName"] = node.id
        spec["volumeClaimTemplates"] = [{
            "metadata": {"name": "state"},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
        }]
    else:
        spec["strategy"] = {"type": "Recreate"}  # one identity, one pod: never two at once
    return {
        "apiVersion": "apps/v1", "kind": "StatefulSet" if stateful else "Deployment",
        "metadata": _meta(node.id, opts.namespace, node), "spec": spec,
    }


def _template_meta(node: Node, topo: Topology) -> dict:
    meta: dict = {"labels": node_labels(node)}
    notes = impairment_annotations(topo, node.id)
    if node.is_server:  # the scrape port answers only the monitoring principal's certificate (topology/policy/monitoring.py)
        notes = {**notes, "prometheus.io/scrape": "true", "prometheus.io/port": str(METRICS_PORT),
                 "prometheus.io/scheme": "https", "prometheus.io/path": METRICS_PATH}
    if notes:
        meta["annotations"] = notes
    return meta


def _service(node: Node, topo: Topology, namespace: str) -> dict:
    """Named after the node id (the certificate's DNS SAN); every port an allow rule opens."""
    ports = sorted({node.port, *(rule.port for rule in node.allow if rule.port)})
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": _meta(node.id, namespace, node),
        "spec": {
            "type": "ClusterIP",
            "selector": selector(node.id)["matchLabels"],
            "ports": [{"name": f"h2-tls-{p}" if p != node.port else "h2-tls", "port": p, "targetPort": p, "protocol": "TCP"}
                      for p in ports],
            "publishNotReadyAddresses": False,
        },
    }


def _kiosk_job(node: Node, files: list[str], opts: KubeOptions, topo: Topology) -> dict:
    """One kiosk's load: `konbini issue` from this kiosk, KIOSK_ISSUANCES times, one pod after another
    (a pod carries one node's labels, so each kiosk is its own Job and its own policy peer)."""
    command = ["konbini", "issue", "--topology", TOPOLOGY_PATH, "--state", STATE, "--kiosk", node.id,
               "--store", node.site, "--json"]
    template = {"metadata": _template_meta(node, topo), "spec": _pod_spec(node, files, command, opts, "Never", False)}
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": _meta(f"{node.id}-load", opts.namespace, node),
        "spec": {"completions": KIOSK_ISSUANCES, "parallelism": 1, "backoffLimit": 3, "template": template},
    }


def _config_map(opts: KubeOptions) -> dict:
    return {
        "apiVersion": "v1", "kind": "ConfigMap", "immutable": True,
        "metadata": _meta("topology", opts.namespace),
        "data": {opts.topology_name: opts.topology_text},
    }


def _namespace(opts: KubeOptions) -> dict:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": opts.namespace, "labels": {f"{LABEL}/part": "topology"}}}


def export_k8s(topo: Topology, opts: KubeOptions, files: dict[str, dict[str, bytes]]) -> dict[str, list[dict]]:
    """Manifests by file name, in the order `kubectl apply -f DIR` reads them (names sort).

    `files`: node id -> its PKI files (`pki_files`); servers and kiosks need one, Wi-Fi runs nothing.
    """
    check_name("namespace", opts.namespace)
    if not opts.topology_name or not re.fullmatch(r"[-._a-zA-Z0-9]+", opts.topology_name):
        raise ExportError(f"ConfigMap key {opts.topology_name!r}: letters, digits, '-', '_' and '.' only")
    for node in topo.nodes.values():
        check_name("node id", node.id)
        if len(node.id) + len("-ingress") > 63:  # the longest name derived from it (policies, Secrets, Jobs)
            raise ExportError(f"node id {node.id!r} is too long for the names derived from it (at most 55 characters)")
    secrets, workloads, services, jobs = [], [], [], []
    for node in sorted(topo.nodes.values(), key=lambda n: n.id):
        if not (node.is_server or node.kind == "kiosk"):
            continue  # Wi-Fi: a policy subject only (default deny), nothing runs there
        if node.id not in files:
            raise ExportError(f"no PKI files for node {node.id!r}")
        secrets.append(_secret(node, files[node.id], opts.namespace))
        if node.is_server:
            workloads.append(_workload(node, list(files[node.id]), opts, topo))
            services.append(_service(node, topo, opts.namespace))
        else:
            jobs.append(_kiosk_job(node, list(files[node.id]), opts, topo))
    return {
        "00-namespace.yaml": [_namespace(opts)],
        "10-topology.yaml": [_config_map(opts)],
        "20-pki-secrets.yaml": secrets,
        "30-network-policies.yaml": network_policies(topo, opts.namespace),
        "40-services.yaml": services,
        "50-nodes.yaml": workloads,
        "60-kiosk-load.yaml": jobs,
    }


def dump(docs: list[dict]) -> str:
    """A multi-document YAML file, keys in the order built (kubectl and humans read it)."""
    return yaml.safe_dump_all(docs, sort_keys=False, default_flow_style=False, width=120)
