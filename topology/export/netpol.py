"""NetworkPolicy from the policy compiler: the fourth output of `reachability(topo)`, next to the
app checks, nftables and the probes, so it cannot drift from them.

Default deny, ingress and egress, for every pod of the namespace; then per allowed pair
(peer -> node:port) one ingress entry on the destination's policy and one egress entry on the
source's. Pods are selected by `konbini.dev/node`, the node id, which the workloads' pod labels
carry beside kind, site and operator. Every entry names the allow rule it comes from (the
`konbini.dev/allowed-by` annotation), as every nftables accept does.

Sources that dial anything also get egress to the cluster DNS, so the Service names (the node
ids, which the certificates carry) resolve; nothing else leaves the namespace. Line impairments
become annotations only: Kubernetes has no per-link delay or loss. The metrics port is no line:
`metrics_policies` opens it on every server to the monitoring principal's pods alone.

Grouped (the national topology, `Subjects(grouped=True)`): the store side is selected by kind and
operator (`konbini.dev/group: store-router-a`), not per node, so 55,000 stores make 24 groups and
a few dozen policies. That opens a kiosk to every store router and controller of its operator, not
only its own store's: the node's certificate check (`same: site` in its allow-list, enforced per
hop in cluster mode) is then what keeps a kiosk to its own store.
"""

from __future__ import annotations

import json
from collections import defaultdict

from topology.policy.compiler import allowed_reachability
from topology.policy.monitoring import METRICS_PORT, MONITORING_PRINCIPAL
from topology.spec.model import (
    SERVER_KINDS,
    STORE_KINDS,
    Impairment,
    Line,
    Node,
    Topology,
)

LABEL = "konbini.dev"
NODE_LABEL = f"{LABEL}/node"
GROUP_LABEL = f"{LABEL}/group"
# The monitoring principal's pods (the scraper in `k8s.monitoring_manifests`): the only pods that
# may reach METRICS_PORT; no topology node carries this label.
ROLE_LABEL = f"{LABEL}/role"
MONITORING_LABELS = {ROLE_LABEL: MONITORING_PRINCIPAL}
MAX_LINE_NOTES = 16  # past this many impaired lines (or allow entries) on one subject, a count instead
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


def servers_selector() -> dict:
    """Every server node's pods, by kind: one selector for per-node and grouped exports alike."""
    return {"matchExpressions": [{"key": f"{LABEL}/kind", "operator": "In", "values": sorted(SERVER_KINDS)}]}


class Subjects:
    """What a policy selects: one node, or (grouped) the store side of one kind and operator.

    Per node, a subject is the node id and its selector `konbini.dev/node`; grouped, every store-side
    node (kiosk, store router, store controller, Wi-Fi) is its group `<kind>-<operator>`."""

    def __init__(self, topo: Topology, grouped: bool = False) -> None:
        self.group_of: dict[str, str] = {}
        self.members: dict[str, list[str]] = defaultdict(list)
        if grouped:
            for node in topo.nodes.values():
                if node.kind in STORE_KINDS:
                    group = group_name(node)
                    self.group_of[node.id] = group
                    self.members[group].append(node.id)
            clash = sorted(set(self.members) & set(topo.nodes))
            if clash:
                raise ValueError(f"group {clash[0]!r} has the name of a node; rename the node")

    def of(self, node_id: str) -> str:
        return self.group_of.get(node_id, node_id)

    def is_group(self, subject: str) -> bool:
        return subject in self.members

    def selector(self, subject: str) -> dict:
        return {"matchLabels": {GROUP_LABEL: subject}} if self.is_group(subject) else selector(subject)


def group_name(node: Node) -> str:
    """The group of a store-side node when grouped: kind and operator, e.g. "store-router-a"."""
    return f"{node.kind}-{node.operator or 'none'}"


def impairment_text(impair: Impairment) -> str:
    """ "delay=2ms loss=0.1%", or "" when the line is not impaired."""
    fields = (("delay", impair.delay), ("jitter", impair.jitter), ("loss", impair.loss), ("rate", impair.rate))
    return " ".join(f"{name}={value}" for name, value in fields if value)


class Impairments:
    """The impaired lines touching each subject, indexed once (the national file has 331k lines)."""

    def __init__(self, topo: Topology, subjects: Subjects) -> None:
        self.lines: dict[str, list[tuple[Line, str]]] = defaultdict(list)
        for line in topo.lines:
            text = impairment_text(line.impair)
            if text:
                for subject in dict.fromkeys((subjects.of(line.a), subjects.of(line.b))):
                    self.lines[subject].append((line, text))

    def annotations(self, subject: str) -> dict[str, str]:
        """`impair.konbini.dev/<line id>` per impaired line of the subject, plus the note; past
        MAX_LINE_NOTES lines, `impair.konbini.dev/<line kind>` with a count instead."""
        lines = self.lines.get(subject, [])
        if not lines:
            return {}
        if len(lines) <= MAX_LINE_NOTES:
            out = {f"impair.{LABEL}/{line.id}": f"{line.a}<->{line.b} {text}" for line, text in lines}
        else:
            kinds: dict[tuple[str, str], int] = defaultdict(int)
            for line, text in lines:
                kinds[line.kind, text] += 1
            out = {f"impair.{LABEL}/{kind}": f"{count} lines {text}" for (kind, text), count in sorted(kinds.items())}
        out[f"{LABEL}/impair-note"] = IMPAIR_NOTE
        return out


def impairment_annotations(topo: Topology, node_id: str) -> dict[str, str]:
    """One node's impairment annotations (per node, no grouping)."""
    return Impairments(topo, Subjects(topo)).annotations(node_id)


def _policy(
    name: str, namespace: str, pod_selector: dict, types: list[str], annotations: dict[str, str], **rules
) -> dict:
    meta: dict = {"name": name, "namespace": namespace, "labels": {f"{LABEL}/topology-policy": "true"}}
    if annotations:
        meta["annotations"] = annotations
    spec: dict = {"podSelector": pod_selector, "policyTypes": types}
    spec.update(rules)
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": meta, "spec": spec}


def _allowed_by(pairs: set[tuple[str, int, str]]) -> str:
    """{"peer:port": "nodes.x.allow[0]"}, one JSON line: which topology entry opened each pair
    (grouped: every entry that opened it for some member, when they are few; else their count)."""
    rules: dict[str, set[str]] = defaultdict(set)
    for peer, port, rule in pairs:
        rules[f"{peer}:{port}"].add(rule)
    return json.dumps(
        {
            k: " ".join(sorted(v)) if len(v) <= MAX_LINE_NOTES else f"{len(v)} allow entries"
            for k, v in sorted(rules.items())
        },
        separators=(",", ":"),
    )


def network_policies(
    topo: Topology, namespace: str, subjects: Subjects | None = None, impairments: Impairments | None = None
) -> list[dict]:
    """Default deny, then one ingress policy per reachable subject and one egress policy per source."""
    subjects = subjects or Subjects(topo)
    impairments = impairments or Impairments(topo, subjects)
    ingress: dict[str, set[tuple[str, int, str]]] = defaultdict(set)  # dst -> (src, port, rule)
    egress: dict[str, set[tuple[str, int, str]]] = defaultdict(set)  # src -> (dst, port, rule)
    for r in allowed_reachability(topo):
        if r.proto != "h2+tls":
            raise ValueError(f"{r.rule}: protocol {r.proto!r} has no NetworkPolicy translation")
        src, dst = subjects.of(r.src), subjects.of(r.dst)
        ingress[dst].add((src, r.port, r.rule or ""))
        egress[src].add((dst, r.port, r.rule or ""))

    out = [_policy("default-deny", namespace, {}, ["Ingress", "Egress"], {}), *metrics_policies(namespace)]
    for dst in sorted(ingress):
        by_port: dict[int, set[str]] = defaultdict(set)
        for src, port, _ in ingress[dst]:
            by_port[port].add(src)
        rules = [
            {
                "from": [{"podSelector": subjects.selector(src)} for src in sorted(srcs)],
                "ports": [{"protocol": "TCP", "port": port}],
            }
            for port, srcs in sorted(by_port.items())
        ]
        notes = {f"{LABEL}/allowed-by": _allowed_by(ingress[dst]), **impairments.annotations(dst)}
        out.append(_policy(f"{dst}-ingress", namespace, subjects.selector(dst), ["Ingress"], notes, ingress=rules))
    for src in sorted(egress):
        by_dst: dict[str, set[int]] = defaultdict(set)
        for dst, port, _ in egress[src]:
            by_dst[dst].add(port)
        rules = [
            {
                "to": [{"podSelector": subjects.selector(dst)}],
                "ports": [{"protocol": "TCP", "port": p} for p in sorted(ports)],
            }
            for dst, ports in sorted(by_dst.items())
        ]
        rules.append(_dns_egress())
        notes = {f"{LABEL}/allowed-by": _allowed_by(egress[src]), **impairments.annotations(src)}
        out.append(_policy(f"{src}-egress", namespace, subjects.selector(src), ["Egress"], notes, egress=rules))
    return out


def _dns_egress() -> dict:
    return {
        "to": [
            {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": DNS_NAMESPACE}},
                "podSelector": {"matchLabels": dict(DNS_POD_LABELS)},
            }
        ],
        "ports": [dict(p) for p in DNS_PORTS],
    }


def metrics_policies(namespace: str) -> list[dict]:
    """The scrape port, opened to the monitoring principal's pods only (`metrics_reachability`).

    Ingress on every server pod from MONITORING_LABELS to METRICS_PORT, and egress from those pods
    to it (plus DNS: the scrape targets are Service names, which the node certificates carry).
    No other rule names METRICS_PORT, so default deny keeps every topology node off it: metrics
    never become a path around the EC center (SEC-SN-3, SEC-EC-2). The node still checks the
    `monitoring` certificate on that port; the label alone scrapes nothing."""
    port = [{"protocol": "TCP", "port": METRICS_PORT}]
    note = {f"{LABEL}/allowed-by": f"topology/policy/monitoring.py ({MONITORING_PRINCIPAL} principal only)"}
    monitoring = {"matchLabels": dict(MONITORING_LABELS)}
    return [
        _policy(
            "metrics-ingress",
            namespace,
            servers_selector(),
            ["Ingress"],
            note,
            ingress=[{"from": [{"podSelector": monitoring}], "ports": port}],
        ),
        _policy(
            "monitoring-egress",
            namespace,
            monitoring,
            ["Egress"],
            note,
            egress=[{"to": [{"podSelector": servers_selector()}], "ports": port}, _dns_egress()],
        ),
    ]
