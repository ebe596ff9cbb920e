"""The kernel-level policy probes: what `konbini policy check --netns` sends, from where, and what
it expects (topology/check/agents.py sends them, topology/check/observed.py compares).

From the expected reachability matrix (`policy.reachability`, the same data the app check and the
nftables rules compile from): a TCP SYN for every (source node, server node) pair from the
source's namespace (allowed => SYN-ACK, forbidden => nothing), each allowed connection across a
line once more through the sender's own stack (its output chain), allowed pairs on other ports,
over UDP and ICMP (nothing), spoofed sources from neighbouring namespaces (nothing) and addresses
outside the topology (nothing). Every probe names the requirement IDs it is evidence for (DESIGN §2).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from topology.netns.plan import MONITORING_SITE, NetPlan
from topology.policy.compiler import Reach, admin_reachability, allow_violation, reachability
from topology.policy.monitoring import METRICS_PORT
from topology.policy.nft import allowed_flows
from topology.spec.kinds import KINDS, Side
from topology.spec.model import Node, Topology

PROBE_TIMEOUT = 0.5  # seconds to wait for replies after the last frame is sent
# probe.py sends a probe on "lo" as raw IP through the namespace's own stack: routing and the output
# chain decide, so to an address on another site it leaves by that line's veth, as a node's would
OWN_STACK = "lo"
OTHER_PORTS = (22, 443)  # probed on every allowed pair: only the allow-listed port may answer
OUTSIDE = ("198.19.255.254", "198.18.255.254")  # inside 198.18/15 but in no topology (SEC-SN-1)


@dataclass
class Probe:
    id: int
    kind: (
        str  # "tcp-pair" | "sender-stack" | "other-port" | "udp" | "icmp" | "spoof" | "outside" | "metrics-port" | ...
    )
    site: str  # the namespace it is sent from
    iface: str | None  # None: no route; sent on every veth of `site`
    src: str  # node id or "-"
    dst: str
    src_ip: str
    dst_ip: str
    proto: str
    port: int
    expect_answer: bool
    requirements: tuple[str, ...]
    rule: str | None = None
    watch: set[str] = field(default_factory=set)  # sites where a reply would show
    # set per run (`plan_probes`): a fresh source port and sequence number, so neither a stale
    # conntrack entry nor a SYN-ACK retransmitted for an earlier run can pass for an answer
    sport: int = 0
    seq: int = 0


def _pair_reqs(src: Node, dst: Node, allowed: bool) -> tuple[str, ...]:
    """What a probe of the pair is evidence for: the kind's (topology/spec/kinds.py) when allowed,
    else the rule letting it through would break."""
    if allowed:
        return KINDS[dst.kind].evidence
    broken = allow_violation(src, dst)
    reqs = [broken[0]] if broken else []
    if KINDS[src.kind].side == Side.STORE and KINDS[dst.kind].side == Side.CENTER:
        reqs.append("SEC-SN-3")
    reqs += KINDS[dst.kind].denial_evidence
    return tuple(dict.fromkeys(reqs or ["SEC-SN-1"]))


class _Probes:
    """The probes of one plan, numbered in the order they are added."""

    def __init__(self, topo: Topology, plan: NetPlan) -> None:
        self.topo, self.plan = topo, plan
        self.probes: list[Probe] = []

    def add(self, **kw: Any) -> None:
        p = Probe(id=len(self.probes), **kw)
        p.watch |= {p.site}
        self.probes.append(p)

    def pair(self, r: Reach) -> None:
        """The pair's SYN; if allowed, the same pair on other ports and protocols, and spoofed."""
        topo, plan = self.topo, self.plan
        src, dst = topo.node(r.src), topo.node(r.dst)
        s_ip, d_ip = plan.address(r.src), plan.address(r.dst)
        reqs = _pair_reqs(src, dst, r.allowed)
        egress = plan.egress(src.site, d_ip)
        common = dict(site=src.site, iface=egress, src=r.src, dst=r.dst, src_ip=s_ip, dst_ip=d_ip, watch={dst.site})
        self.add(
            kind="tcp-pair", proto="tcp", port=r.port, expect_answer=r.allowed, requirements=reqs, rule=r.rule, **common
        )
        if not r.allowed:
            return
        # protocol-level filtering: only the allow-listed port and protocol get through
        filtered = ("SEC-EC-2", *reqs)
        for port in OTHER_PORTS:
            if port != r.port:
                self.add(
                    kind="other-port", proto="tcp", port=port, expect_answer=False, requirements=filtered, **common
                )
        self.add(kind="udp", proto="udp", port=r.port, expect_answer=False, requirements=filtered, **common)
        self.add(kind="icmp", proto="icmp", port=0, expect_answer=False, requirements=filtered, **common)
        self.spoofed(r, src, dst, reqs)

    def spoofed(self, r: Reach, src: Node, dst: Node, reqs: tuple[str, ...]) -> None:
        """A neighbour of the destination claims to be the allowed source."""
        topo, plan = self.topo, self.plan
        s_ip, d_ip = plan.address(r.src), plan.address(r.dst)
        for other in plan.sites.values():
            if other.name in (src.site, dst.site):
                continue
            for iface in other.interfaces:
                if iface.peer == r.dst or (
                    topo.nodes[iface.peer].site == dst.site and plan.egress(other.name, d_ip) == iface.name
                ):
                    # a namespace holding a kind that must reach nothing (in-store Wi-Fi) adds its rule
                    kinds = (KINDS[topo.node(n).kind] for n in other.nodes)
                    extra = tuple(dict.fromkeys(k.reaches_nothing for k in kinds if k.reaches_nothing))
                    self.add(
                        kind="spoof",
                        site=other.name,
                        iface=iface.name,
                        src=r.src,
                        dst=r.dst,
                        src_ip=s_ip,
                        dst_ip=d_ip,
                        proto="tcp",
                        port=r.port,
                        expect_answer=False,
                        requirements=("SEC-SN-1", *extra, *reqs),
                        watch={dst.site, src.site},
                    )
                    break

    def metrics_port(self) -> None:
        """Only the monitoring namespace opens the metrics port; no line's source does."""
        topo, plan = self.topo, self.plan
        for r in reachability(topo):
            if r.allowed:
                src, dst = topo.node(r.src), topo.node(r.dst)
                d_ip = plan.address(r.dst)
                self.add(
                    kind="metrics-port",
                    site=src.site,
                    iface=plan.egress(src.site, d_ip),
                    src=r.src,
                    dst=r.dst,
                    src_ip=plan.address(r.src),
                    dst_ip=d_ip,
                    proto="tcp",
                    port=METRICS_PORT,
                    expect_answer=False,
                    requirements=("SEC-SN-3", "SEC-EC-2"),
                    watch={dst.site},
                )
        if plan.monitoring is None:
            return
        for site in plan.monitoring.links:
            for node_id in plan.sites[site].servers:
                self.add(
                    kind="metrics-port",
                    site=MONITORING_SITE,
                    iface=plan.monitoring.links[site].mon_ifname,
                    src="monitoring",
                    dst=node_id,
                    src_ip=plan.monitoring.address,
                    dst_ip=plan.address(node_id),
                    proto="tcp",
                    port=METRICS_PORT,
                    expect_answer=True,
                    requirements=("SEC-SN-3",),
                    rule="monitoring",
                    watch={site},
                )

    def admin_ports(self) -> None:
        """Only their consoles reach the admin ports: packets from anywhere else are dropped before any TLS."""
        topo, plan = self.topo, self.plan
        for r in admin_reachability(topo):
            src, dst = topo.node(r.src), topo.node(r.dst)
            d_ip = plan.address(r.dst)
            egress = plan.egress(src.site, d_ip)
            if egress is None:
                continue  # no line carries it at all: the "tcp-pair" probes show that for the main port
            refused = () if r.allowed or KINDS[dst.kind].admin_rule is None else (KINDS[dst.kind].admin_rule,)
            self.add(
                kind="admin-port",
                site=src.site,
                iface=egress,
                src=r.src,
                dst=r.dst,
                src_ip=plan.address(r.src),
                dst_ip=d_ip,
                proto="tcp",
                port=r.port,
                expect_answer=r.allowed,
                rule=r.rule,
                requirements=tuple(dict.fromkeys(("SEC-ST-3/KI-6", *refused))),
                watch={dst.site},
            )
        for f in allowed_flows(topo, plan):  # a node's own console (the store controller's): not a pair of nodes above
            if f.surface == "admin" and f.src == f.dst:
                self.add(
                    kind="admin-port",
                    site=f.src_site,
                    iface=OWN_STACK,
                    src=f.src,
                    dst=f.dst,
                    src_ip=f.src_ip,
                    dst_ip=f.dst_ip,
                    proto="tcp",
                    port=f.port,
                    expect_answer=True,
                    rule=f.rule,
                    requirements=("SEC-ST-3/KI-6",),
                )

    def wifi_to_kiosks(self) -> None:
        """In-store Wi-Fi reaches no kiosk, on any protocol (kiosks do not listen, but an unfiltered
        kernel would still answer with a RST or an echo reply)."""
        topo, plan = self.topo, self.plan
        for wifi in topo.of_kind("wifi"):
            for kiosk in topo.of_kind("kiosk"):
                k_ip = plan.address(kiosk.id)
                for proto, port in (("tcp", 8443), ("tcp", 22), ("udp", 53), ("icmp", 0)):
                    self.add(
                        kind="wifi-kiosk",
                        site=wifi.site,
                        iface=plan.egress(wifi.site, k_ip),
                        src=wifi.id,
                        dst=kiosk.id,
                        src_ip=plan.address(wifi.id),
                        dst_ip=k_ip,
                        proto=proto,
                        port=port,
                        expect_answer=False,
                        requirements=("SEC-ST-4",),
                        watch={kiosk.site},
                    )

    def outside(self) -> None:
        """Nothing outside the topology answers, whatever interface it is tried on."""
        for s in self.plan.sites.values():
            for addr in OUTSIDE:
                if self.topo.by_address(addr) is None:
                    self.add(
                        kind="outside",
                        site=s.name,
                        iface=None,
                        src=s.nodes[0],
                        dst=addr,
                        src_ip=self.plan.address(s.nodes[0]),
                        dst_ip=addr,
                        proto="tcp",
                        port=8443,
                        expect_answer=False,
                        requirements=("SEC-SN-1",),
                    )

    def sender_stacks(self) -> None:
        """Every connection the rulesets accept across a line, sent through the *sender's* own stack:
        the frame probes leave below the sender's output chain, so only these show that the sending
        namespace lets its allowed connections out (an output accept rule dropped is caught)."""
        for f in allowed_flows(self.topo, self.plan):
            if f.src_site == f.dst_site:
                continue
            reqs = (
                KINDS[self.topo.node(f.dst).kind].evidence
                if f.surface == "line"
                else ("SEC-ST-3/KI-6",)
                if f.surface == "admin"
                else ("SEC-SN-3",)
            )
            self.add(
                kind="sender-stack",
                site=f.src_site,
                iface=OWN_STACK,
                src=f.src,
                dst=f.dst,
                src_ip=f.src_ip,
                dst_ip=f.dst_ip,
                proto="tcp",
                port=f.port,
                expect_answer=True,
                requirements=reqs,
                rule=f.rule,
                watch={f.dst_site},
            )


def plan_probes(topo: Topology, plan: NetPlan) -> list[Probe]:
    probes = _Probes(topo, plan)
    for r in reachability(topo):
        probes.pair(r)
    probes.metrics_port()
    probes.admin_ports()
    probes.wifi_to_kiosks()
    probes.outside()
    probes.sender_stacks()
    return renumber(probes.probes)


SOURCE_PORTS = (10000, 65000)


def renumber(probes: list[Probe]) -> list[Probe]:
    """A fresh source port and sequence number for every probe, before each run of them. Ports
    count up from a random base per source address: the agents match a reply by its whole
    5-tuple, and a part of 99 national stores has 87,505 probes, more than there are ports."""
    per_source = Counter(p.src_ip for p in probes)
    most = max(per_source.values(), default=0)
    if most > SOURCE_PORTS[1] - SOURCE_PORTS[0]:
        raise ValueError(
            f"{most:,} probes from one source address, more than the "
            f"{SOURCE_PORTS[1] - SOURCE_PORTS[0]:,} source ports a run gives them"
        )
    base = random.randrange(SOURCE_PORTS[0], SOURCE_PORTS[1] - most)
    seq = random.randrange(1 << 31)
    taken: Counter[str] = Counter()
    for p in probes:
        p.sport, p.seq = base + taken[p.src_ip], (seq + p.id * 7919) % (1 << 32)
        taken[p.src_ip] += 1
    return probes
