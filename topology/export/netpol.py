"""NetworkPolicy from the policy compiler: the fourth output of `reachability(topo)`, next to the
app checks, nftables and the probes, so it cannot drift from them.

Default deny, ingress and egress, for every pod of the namespace; then per allowed pair
(peer -> node:port) one ingress entry on the destination's policy and one egress entry on the
source's. Pods are selected by `konbini.dev/node`, the node id, which the workloads' pod labels
carry beside kind, site and operator. Every entry names the allow rule it comes from (the
`konbini.dev/allowed-by` annotation), as every nftables accept does.

Sources that dial anything also get egress to the cluster DNS, so the Service names (the node
ids, which the certificates carry) resolve; nothing else leaves the namespace. Line impairments
become annotations only: Kubernetes has no per-link delay or loss.
"""

from __future__ import annotations

import json
from collections import defaultdict

from topology.policy.compiler import Reach, reachability
from topology.spec.model import Impairment, Node, Topology

LABEL = "konbini.dev"
NODE_LABEL = f"{LABEL}/node"
# Where the cluster DNS runs in every mainstream distribution (kube-dns or CoreDNS keep this label).
DNS_NAMESPACE = "kube-system"
DNS_POD_LABELS = {"k8s-app": "kube-dns"}
DNS_PORTS = ({"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53})
IMPAIR_NOTE = (
    "Kubernetes does not apply line impairments: these record the topology's tc netem settings "
    "(netns mode) for whoever shapes the cluster network (e.g. a CNI bandwidth plugin or chaos tooling)."
)


def node_labels(node: Node) -> dict[str, str]:
    """The labels every pod of a node carries; policies select on the node id alone."""
    labels = {NODE_LABEL: node.id, f"{LABEL}/kind": node.kind, f"{LABEL}/site": node.site}
    if node.operator:
        labels[f"{LABEL}/operator"] = node.operator
    return labels


def selector(node_id: str) -> dict:
    return {"matchLabels": {NODE_LABEL: node_id}}


def allowed_pairs(topo: Topology) -> list[Reach]:
    return [r for r in reachability(topo) if r.allowed]


def impairment_text(impair: Impairment) -> str:
    """"delay=2ms loss=0.1%", or "" when the line is not impaired."""
    fields = (("delay", impair.delay), ("jitter", impair.jitter), ("loss", impair.loss), ("rate", impair.rate))
    return " ".join(f"{name}={value}" for name, value in fields if value)


def impairment_annotations(topo: Topology, node_id: str) -> dict[str, str]:
    """`konbini.dev/impair.<line id>` for every impaired line that touches the node, plus the note."""
    out = {}
    for line in topo.lines:
        text = impairment_text(line.impair)
        if text and node_id in (line.a, line.b):
            out[f"impair.{LABEL}/{line.id}"] = f"{line.a}<->{line.b} {text}"
    if out:
        out[f"{LABEL}/impair-note"] = IMPAIR_NOTE
    return out


def _policy(name: str, namespace: str, node_id: str | None, types: list[str], annotations: dict[str, str], **rules) -> dict:
    meta: dict = {"name": name, "namespace": namespace, "labels": {f"{LABEL}/topology-policy": "true"}}
    if annotations:
        meta["annotations"] = annotations
    spec: dict = {"podSelector": selector(node_id) if node_id else {}, "policyTypes": types}
    spec.update(rules)
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": meta, "spec": spec}


def _allowed_by(pairs: list[tuple[str, int, str]]) -> str:
    """{"peer:port": "nodes.x.allow[0]"}, one JSON line: which topology entry opened each pair."""
    return json.dumps({f"{peer}:{port}": rule for peer, port, rule in sorted(pairs)}, separators=(",", ":"))


def network_policies(topo: Topology, namespace: str) -> list[dict]:
    """Default deny, then one ingress policy per reachable server and one egress policy per source."""
    ingress: dict[str, list[tuple[str, int, str]]] = defaultdict(list)  # dst -> (src, port, rule)
    egress: dict[str, list[tuple[str, int, str]]] = defaultdict(list)  # src -> (dst, port, rule)
    for r in allowed_pairs(topo):
        if r.proto != "h2+tls":
            raise ValueError(f"{r.rule}: protocol {r.proto!r} has no NetworkPolicy translation")
        ingress[r.dst].append((r.src, r.port, r.rule or ""))
        egress[r.src].append((r.dst, r.port, r.rule or ""))

    out = [_policy("default-deny", namespace, None, ["Ingress", "Egress"], {})]
    for dst in sorted(ingress):
        by_port: dict[int, list[str]] = defaultdict(list)
        for src, port, _ in ingress[dst]:
            by_port[port].append(src)
        rules = [{"from": [{"podSelector": selector(src)} for src in sorted(srcs)], "ports": [{"protocol": "TCP", "port": port}]}
                 for port, srcs in sorted(by_port.items())]
        notes = {f"{LABEL}/allowed-by": _allowed_by(ingress[dst]), **impairment_annotations(topo, dst)}
        out.append(_policy(f"{dst}-ingress", namespace, dst, ["Ingress"], notes, ingress=rules))
    for src in sorted(egress):
        by_dst: dict[str, list[int]] = defaultdict(list)
        for dst, port, _ in egress[src]:
            by_dst[dst].append(port)
        rules = [{"to": [{"podSelector": selector(dst)}], "ports": [{"protocol": "TCP", "port": p} for p in sorted(set(ports))]}
                 for dst, ports in sorted(by_dst.items())]
        rules.append({
            "to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": DNS_NAMESPACE}},
                    "podSelector": {"matchLabels": dict(DNS_POD_LABELS)}}],
            "ports": [dict(p) for p in DNS_PORTS],
        })
        notes = {f"{LABEL}/allowed-by": _allowed_by(egress[src]), **impairment_annotations(topo, src)}
        out.append(_policy(f"{src}-egress", namespace, src, ["Egress"], notes, egress=rules))
    return out
