"""A benchmark topology: the given one with as many kiosks as the load asks for.

Extra kiosks join their store like the shipped ones: an address in the store's range, a node
certificate (issued by `PKI.ensure`), a LAN line to the store router and a place in its allow-list.
"""

from __future__ import annotations

import ipaddress

import msgspec

from topology.spec.model import AllowRule, Line, Node, Topology


class BenchTopologyError(Exception):
    pass


def with_kiosks(topo: Topology, n: int) -> tuple[Topology, list[str]]:
    """(topology, kiosk ids to drive): n kiosks spread round-robin over the store routers."""
    routers = sorted(r.id for r in topo.of_kind("store-router"))
    if not routers:
        raise BenchTopologyError(f"{topo.source}: no store router to attach kiosks to")
    by_router: dict[str, list[Node]] = {r: [] for r in routers}
    for k in topo.of_kind("kiosk"):
        if k.upstream in by_router:
            by_router[k.upstream].append(k)
    used = {n.address for n in topo.nodes.values()}
    nodes = dict(topo.nodes)
    lines = list(topo.lines)
    chosen: list[str] = []
    per_router = {r: 0 for r in routers}
    for i in range(n):
        per_router[routers[i % len(routers)]] += 1
    for rid, want in per_router.items():
        have = sorted(by_router[rid], key=lambda k: k.id)
        chosen += [k.id for k in have[:want]]
        router = nodes[rid]
        prefix = have[0].id.rsplit("-", 1)[0] if have else f"kiosk-{rid.removeprefix('store-router-')}"
        base = ipaddress.IPv4Address(router.address).packed[:3]
        added: list[str] = []
        host = 11
        for k in range(len(have) + 1, want + 1):
            while host < 255 and str(ipaddress.IPv4Address(base + bytes([host]))) in used:
                host += 1
            if host >= 255:
                raise BenchTopologyError(f"no free address left for kiosks of {rid}; ask for fewer kiosks")
            address = str(ipaddress.IPv4Address(base + bytes([host])))
            used.add(address)
            kid = f"{prefix}-{k}"
            nodes[kid] = Node(kid, "kiosk", router.site, address, upstream=rid, operator=router.operator)
            lines.append(Line(f"lan-bench-{kid}", kid, rid, "lan"))
            added.append(kid)
            chosen.append(kid)
        if added:
            rules = list(router.allow)
            idx = next((i for i, r in enumerate(rules) if any(s in {k.id for k in have} for s in r.sources)), None)
            if idx is None:
                rules.append(AllowRule(tuple(added), ("GET /bench/*", "POST /bench/*", "POST /v1/*")))
            else:
                rules[idx] = msgspec.structs.replace(rules[idx], sources=(*rules[idx].sources, *added))
            nodes[rid] = msgspec.structs.replace(router, allow=tuple(rules))
    return msgspec.structs.replace(topo, nodes=nodes, lines=tuple(lines)), chosen


def with_port(topo: Topology, port: int) -> Topology:
    """Every server on `port` instead of its own (benchmarks and tests beside a running topology)."""
    nodes = {nid: msgspec.structs.replace(n, port=port) if n.port else n for nid, n in topo.nodes.items()}
    return msgspec.structs.replace(topo, nodes=nodes)
