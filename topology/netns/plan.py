"""The network-namespace layout of a topology, as data: which namespaces, veths, addresses and
host routes netns mode builds. Pure: `topology.launch.netns` turns it into `ip`/`nft`/`tc` commands,
`topology.policy.nft` into rulesets and `topology.check.policy` into probes, so all three agree.

One namespace per site (the nodes of a site share it and talk over its `lo`); one veth pair
per line whose two ends stand on different sites. A namespace gets a /32 host route only to
the far end of each of its lines: there is no default route and nothing else to reach, so
traffic can only ever cross one line, and each hop is filtered by the receiving namespace.

One more namespace, `<prefix>monitoring`, holds the monitoring principal's address and one veth
(`mon`) to every namespace with servers: the only way to a node's metrics port. It is no site
of the topology, forwards nothing, and its own ruleset lets it open only metrics connections.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

from topology.policy.monitoring import monitoring_address
from topology.spec.model import Impairment, Mode, Topology

NS_PREFIX = "konbini-"
MONITORING_SITE = "monitoring"  # the monitoring namespace's name after the prefix; no topology site may take it
MONITOR_IFNAME = "mon"  # a site's end of its monitoring veth
_IFNAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")  # Linux IFNAMSIZ is 16 with the NUL
_NS_PART = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class PlanError(ValueError):
    """The topology cannot be laid out as namespaces (one line for the user)."""


@dataclass(frozen=True)
class Interface:
    """One end of a veth pair, as its own namespace sees it."""

    name: str
    mac: str
    peer_mac: str
    line: str
    peer_site: str
    node: str  # the line's endpoint on this side
    peer: str  # the line's endpoint on the far side: the only node reachable through this interface


@dataclass(frozen=True)
class Veth:
    line: str
    name: str  # the same name at both ends (they live in different namespaces)
    site_a: str
    site_b: str
    mac_a: str
    mac_b: str
    impair: Impairment


@dataclass
class Site:
    name: str
    namespace: str
    nodes: list[str] = field(default_factory=list)
    servers: list[str] = field(default_factory=list)
    interfaces: list[Interface] = field(default_factory=list)


@dataclass(frozen=True)
class MonitorLink:
    """The veth between one site's namespace (`site_ifname`) and the monitoring namespace (`mon_ifname`)."""

    site: str
    site_ifname: str
    mon_ifname: str
    site_mac: str
    mon_mac: str


@dataclass
class Monitoring:
    """The monitoring namespace: one address (the principal's), one link per site with servers."""

    namespace: str
    address: str
    links: dict[str, MonitorLink] = field(default_factory=dict)  # by site


@dataclass
class NetPlan:
    topo: Topology
    prefix: str
    sites: dict[str, Site]
    veths: list[Veth]
    monitoring: Monitoring | None = None

    def monitor_link(self, site: str) -> MonitorLink | None:
        return self.monitoring.links.get(site) if self.monitoring else None

    def monitoring_routes(self) -> list[tuple[str, str]]:
        """(address, interface) host routes of the monitoring namespace: every server node's address."""
        if self.monitoring is None:
            return []
        return [
            (self.address(n), link.mon_ifname)
            for site, link in self.monitoring.links.items()
            for n in self.sites[site].servers
        ]

    def namespace(self, site: str) -> str:
        return self.sites[site].namespace

    def address(self, node_id: str) -> str:
        return self.topo.nodes[node_id].address_in(Mode.NETNS)

    def local_addresses(self, site: str) -> list[str]:
        return [self.address(n) for n in self.sites[site].nodes]

    def routes(self, site: str) -> list[tuple[str, str]]:
        """(address, interface) host routes of one namespace: each line's far endpoint, first line wins."""
        seen = set(self.local_addresses(site))
        out = []
        for iface in self.sites[site].interfaces:
            addr = self.address(iface.peer)
            if addr not in seen:
                seen.add(addr)
                out.append((addr, iface.name))
        return out

    def egress(self, site: str, address: str) -> str | None:
        """The interface a packet from `site` to `address` leaves by: "lo", a veth, or None (no route)."""
        if address in self.local_addresses(site):
            return "lo"
        for addr, ifname in self.routes(site):
            if addr == address:
                return ifname
        return None

    def interface_names(self, site: str) -> list[str]:
        """Every interface of a site's namespace: lo, its lines' veths, its monitoring veth."""
        link = self.monitor_link(site)
        return ["lo", *(i.name for i in self.sites[site].interfaces), *([link.site_ifname] if link else [])]

    def veth(self, line_id: str) -> Veth:
        for v in self.veths:
            if v.line == line_id:
                return v
        known = ", ".join(v.line for v in self.veths) or "none"
        raise PlanError(f"line {line_id!r} has no veth (lines between sites: {known})")


def namespace_prefix(tag: str | None = None) -> str:
    """ "konbini-", or "konbini-<tag>-" so a test run's namespaces never meet the user's."""
    if not tag:
        return NS_PREFIX
    if not _NS_PART.fullmatch(tag):
        raise PlanError(f"tag {tag!r} may use only letters, digits, '_', '.', '-'")
    return f"{NS_PREFIX}{tag}-"


def _mac(namespace: str, ifname: str) -> str:
    """A stable, locally administered unicast MAC, so probes know the peer's without asking it."""
    h = hashlib.sha256(f"{namespace}/{ifname}".encode()).digest()
    return ":".join(f"{b:02x}" for b in (0x02, *h[:5]))


def build_plan(topo: Topology, tag: str | None = None) -> NetPlan:
    prefix = namespace_prefix(tag)
    sites: dict[str, Site] = {}
    for node in topo.nodes.values():
        if not _NS_PART.fullmatch(node.site):
            raise PlanError(
                f"site {node.site!r} (node {node.id}) cannot name a namespace; use letters, digits, '_', '.', '-'"
            )
        site = sites.setdefault(node.site, Site(node.site, prefix + node.site))
        site.nodes.append(node.id)
        if node.is_server:
            site.servers.append(node.id)
    veths: list[Veth] = []
    used: dict[str, set[str]] = {s: set() for s in sites}
    for index, line in enumerate(topo.lines):
        a, b = topo.nodes.get(line.a), topo.nodes.get(line.b)
        if a is None or b is None:
            raise PlanError(f"line {line.id!r} joins unknown node {line.a if a is None else line.b!r}")
        if a.site == b.site:
            continue  # inside one namespace: the two nodes share its lo
        name = line.id if _IFNAME.fullmatch(line.id) else f"kl{index}"
        if name in used[a.site] | used[b.site] or name == "lo":
            name = f"kl{index}"
        used[a.site].add(name)
        used[b.site].add(name)
        sa, sb = sites[a.site], sites[b.site]
        mac_a, mac_b = _mac(sa.namespace, name), _mac(sb.namespace, name)
        veths.append(Veth(line.id, name, a.site, b.site, mac_a, mac_b, line.impair))
        sa.interfaces.append(Interface(name, mac_a, mac_b, line.id, b.site, a.id, b.id))
        sb.interfaces.append(Interface(name, mac_b, mac_a, line.id, a.site, b.id, a.id))
    return NetPlan(topo, prefix, sites, veths, _monitoring(topo, prefix, sites, used))


def _monitoring(topo: Topology, prefix: str, sites: dict[str, Site], used: dict[str, set[str]]) -> Monitoring:
    if MONITORING_SITE in sites:
        raise PlanError(f"site {MONITORING_SITE!r} is reserved for netns mode's monitoring namespace; rename it")
    address = monitoring_address(Mode.NETNS)
    holder = topo.by_address(address)
    if holder is not None:
        raise PlanError(f"node {holder.id!r} holds {address}, the monitoring principal's netns address; move it")
    mon = Monitoring(prefix + MONITORING_SITE, address)
    for index, site in enumerate(s for s in sites.values() if s.servers):
        if MONITOR_IFNAME in used[site.name]:
            raise PlanError(
                f"line interface name {MONITOR_IFNAME!r} in site {site.name} is reserved for the monitoring veth"
            )
        mon_ifname = f"mon{index}"
        mon.links[site.name] = MonitorLink(
            site.name, MONITOR_IFNAME, mon_ifname, _mac(site.namespace, MONITOR_IFNAME), _mac(mon.namespace, mon_ifname)
        )
    return mon
