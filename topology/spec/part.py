"""A chosen part of a topology, by site: what `konbini up --netns --sites` brings up of a file too
large for a namespace per site. The national file has 248k nodes on 233k sites: more addresses
than 198.18.0.0/15 holds and more namespaces than a machine makes in a minute.

The part is the sites named (shell patterns) and what their requests need on the way up: every
next hop of their nodes, transitively (store router -> EC router -> DMZ relays -> centers), the
OCSP responders of a center, and, where no municipality was named, the first municipality of the
file (an issuance needs one). Lines and allow entries keep only the nodes of the part; an entry
keeps its place (and so its label, `nodes.x.allow[2]`) even when none of its sources is left.
Loopback addresses stay the file's; netns addresses too, unless two of the part's nodes share one.
"""

from __future__ import annotations

import fnmatch
import ipaddress

import msgspec

from topology.policy.monitoring import monitoring_address
from topology.spec.model import Mode, Node, Topology

NETNS_POOL = ipaddress.IPv4Network("198.18.0.0/15")  # RFC 2544 benchmarking space, netns mode's


class PartError(ValueError):
    """The sites asked for do not make a part (one line for the user)."""


def sites_of(topo: Topology, patterns: list[str]) -> list[str]:
    """The sites of `topo` matching any of the shell patterns (`store-a0000[1-5]`, `lgwan-000*`)."""
    sites = dict.fromkeys(n.site for n in topo.nodes.values())
    chosen: dict[str, None] = {}
    for pattern in patterns:
        matched = fnmatch.filter(sites, pattern)
        if not matched:
            examples = ", ".join(list(sites)[:3])
            raise PartError(f"--sites {pattern!r} matches no site of {topo.name!r} (sites are named like {examples})")
        chosen.update(dict.fromkeys(matched))
    return list(chosen)


def part(topo: Topology, patterns: list[str]) -> tuple[Topology, list[str]]:
    """The part of `topo` on the sites `patterns` name and the sites their requests need.
    Returns it with notes on what was added (the user named stores, the part has their EC router)."""
    named = sites_of(topo, patterns)
    sites = set(named)
    todo = [n for n in topo.nodes.values() if n.site in sites]
    while todo:  # next hops, transitively
        node = todo.pop()
        for hop in node.hops:
            up = topo.nodes[hop]
            if up.site not in sites:
                sites.add(up.site)
                todo.extend(n for n in topo.nodes.values() if n.site == up.site)
    kinds = {n.kind for n in topo.nodes.values() if n.site in sites}
    if "issuance-center" in kinds:
        sites.update(n.site for n in topo.of_kind("ocsp"))
        if "municipality" not in kinds:
            first = next(
                (n for n in topo.of_kind("municipality") if n.municipality and n.municipality.participating), None
            )
            if first is not None:
                sites.add(first.site)
    nodes = {i: n for i, n in topo.nodes.items() if n.site in sites}
    added = sorted(sites - set(named))
    notes = (
        [
            f"{len(named):,} site(s) named, {len(added):,} added for the way up: {', '.join(added[:8])}"
            + (", …" if len(added) > 8 else "")
        ]
        if added
        else []
    )
    return _restricted(topo, nodes), notes


def _restricted(topo: Topology, nodes: dict[str, Node]) -> Topology:
    """`topo` with only `nodes`: lines between two of them, allow and admin entries naming only them."""
    kept = {}
    for node_id, node in nodes.items():
        allow = tuple(msgspec.structs.replace(r, sources=tuple(s for s in r.sources if s in nodes)) for r in node.allow)
        admin = tuple(msgspec.structs.replace(r, at=tuple(a for a in r.at if a in nodes)) for r in node.admin)
        kept[node_id] = msgspec.structs.replace(node, allow=allow, admin=admin)
    lines = tuple(line for line in topo.lines if line.a in nodes and line.b in nodes)
    return msgspec.structs.replace(topo, nodes=_netns_addresses(kept), lines=lines)


def _netns_addresses(nodes: dict[str, Node]) -> dict[str, Node]:
    """Netns addresses of a large file repeat (127.18.0.1 and 127.64.0.1 both derive 198.18.0.1):
    where two nodes of the part share one, the part's nodes are numbered afresh in file order,
    198.18.0.1 upwards (no .0 or .255, not the monitoring principal's); else they keep the file's."""
    addresses = [n.address_in(Mode.NETNS) for n in nodes.values()]
    if len(set(addresses)) == len(addresses):
        return nodes
    taken = {monitoring_address(Mode.NETNS)}
    fresh = (str(a) for a in NETNS_POOL.hosts() if a.packed[3] not in (0, 255) and str(a) not in taken)
    try:
        return {i: msgspec.structs.replace(n, netns_address=next(fresh)) for i, n in nodes.items()}
    except (StopIteration, RuntimeError):
        raise PartError(
            f"a part of {len(nodes):,} nodes does not fit {NETNS_POOL} (about 128,000 addresses); choose fewer sites"
        ) from None
