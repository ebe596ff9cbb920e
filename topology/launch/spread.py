"""`konbini up --processes N`: loopback mode with the server nodes spread over N processes.

One process is one core and one open-files limit: a large file needs both cores, and more
listening sockets than one process may hold (national.yaml: ~224,000 descriptors against a
hard limit of 20,000 here, which root in a container may not raise). Nodes talk to each other
over their own addresses whichever process holds them, so a split changes nothing they see.

The parent loads the topology and makes the PKI once, then forks: the children inherit both
(copy on write) instead of each doing it again, and each compiles the allow-lists of its own
nodes (held by the parent, every child's resident size counted all of them again). A site's nodes
stay in one process (a store's router, controller and kiosks' maintenance endpoints); sites
go to the least loaded process, largest first, counted in listeners. A bench that wants each
process's CPU to be one node kind's spreads by kind instead (`by_kind`).
"""

from __future__ import annotations

import heapq
from pathlib import Path

from topology.launch.netns import Nodehost, fork_nodehosts
from topology.pki import PKI
from topology.spec.model import Mode, Topology

READY_TIMEOUT = 1800.0  # a national file starts for minutes; a process that exits is reported at once


def hosted(topo: Topology, kinds: frozenset[str] | None = None) -> dict[str, list[str]]:
    """Site -> the nodes a nodehost serves for it: servers, and nodes with an admin surface only
    (kiosks); with `kinds`, only the servers of those kinds (a bench that needs the issuance path only)."""
    out: dict[str, list[str]] = {}
    for node in topo.nodes.values():
        if kinds is not None:
            if node.is_server and node.kind in kinds:
                out.setdefault(node.site, []).append(node.id)
        elif node.is_server or node.admin_port is not None:
            out.setdefault(node.site, []).append(node.id)
    return out


def _weight(topo: Topology, ids: list[str]) -> int:
    """Listeners of these nodes: port, admin port, and a server's metrics port."""
    return sum((2 if (n := topo.nodes[i]).is_server else 0) + (n.admin_port is not None) for i in ids)


def partition(topo: Topology, processes: int, kinds: frozenset[str] | None = None) -> list[list[str]]:
    """Node ids per process, whole sites each, balanced by listeners (greedy, largest first)."""
    sites = sorted(((_weight(topo, ids), ids) for ids in hosted(topo, kinds).values()), key=lambda s: -s[0])
    heap = [(0, i) for i in range(max(1, min(processes, len(sites))))]
    parts: list[list[str]] = [[] for _ in heap]
    for weight, ids in sites:  # each site weighed once: 233,000 of them, national
        load, i = heapq.heappop(heap)
        parts[i].extend(ids)
        heapq.heappush(heap, (load + weight, i))
    return [p for p in parts if p]


def partition_by_kind(topo: Topology, processes: int, kinds: frozenset[str]) -> list[tuple[str, list[str]]]:
    """(kind, node ids) per process, each process serving nodes of one kind only, so that its CPU is
    that kind's (a bench's cost per role). Every kind gets a process; the rest go one at a time to
    the kind with the most listeners a process, and each kind's share is balanced as `partition`."""
    by_kind: dict[str, list[str]] = {}
    for ids in hosted(topo, kinds).values():
        for i in ids:
            by_kind.setdefault(topo.nodes[i].kind, []).append(i)
    if processes < len(by_kind):
        raise ValueError(
            f"{processes} processes for {len(by_kind)} node kinds: one kind a process needs {len(by_kind)}"
        )
    weight = {k: _weight(topo, ids) for k, ids in by_kind.items()}
    share = dict.fromkeys(by_kind, 1)
    for _ in range(processes - len(by_kind)):
        k = max(share, key=lambda k: (weight[k] / share[k], k))
        share[k] += 1
    out = []
    for kind in sorted(by_kind):
        sub = {i: topo.nodes[i] for i in by_kind[kind]}
        heap = [(0, n) for n in range(min(share[kind], len(sub)))]
        parts: list[list[str]] = [[] for _ in heap]
        for i in sorted(sub, key=lambda i: -_weight(topo, [i])):
            load, n = heapq.heappop(heap)
            parts[n].append(i)
            heapq.heappush(heap, (load + _weight(topo, [i]), n))
        out += [(kind, p) for p in parts if p]
    return out


def start(
    topo: Topology,
    state_dir: Path,
    processes: int,
    clock: str | None = None,
    clock_speed: float = 1.0,
    progress=None,
    kinds: frozenset[str] | None = None,
    by_kind: bool = False,
    meanwhile=None,
    parts: list[list[str]] | None = None,
) -> list[Nodehost]:
    """Fork `processes` loopback nodehosts over the topology (its servers of `kinds` only, if
    given); returns once each said "ready". `by_kind`: each process serves one node kind (named
    `KIND-N`; needs `kinds`), else whole sites each (`process-N`). `meanwhile()`: work of the
    caller's, done while they start; `parts`: `partition(topo, processes, kinds)` if the caller
    has it already (0.7 s, national)."""
    state_dir = Path(state_dir).resolve()
    pki = PKI.ensure(state_dir, topo)  # once, here: the children inherit it
    if by_kind:
        jobs = [(f"{kind}-{i}", None, ids) for i, (kind, ids) in enumerate(partition_by_kind(topo, processes, kinds))]
    else:
        parts = partition(topo, processes, kinds) if parts is None else parts
        jobs = [(f"process-{i}", None, ids) for i, ids in enumerate(parts)]
    return fork_nodehosts(
        jobs,
        Mode.LOOPBACK,
        topo.source or "-",
        state_dir,
        state_dir / "processes",
        READY_TIMEOUT,
        clock,
        clock_speed,
        topo,
        pki,
        progress=progress,
        meanwhile=meanwhile,
    )
