"""`konbini policy mutate`: every single-rule mutation of the compiled policy, and proof that
`policy check` catches each one (the "a deliberately broken rule is always caught" promise).

Mutants, each one change to the topology's policy, recompiled by the one compiler:
- allow-removed     one source taken out of one allow entry (and each admin principal / console);
- forbidden-allowed one forbidden (source, server) pair added as an allow entry;
- port-shifted      one server's port moved by one (its allow-lists with it);
- nft-rule-dropped  (netns, `--netns`) one accept rule dropped from one namespace's ruleset.
App and matrix mutants are checked in-process by `topology.check.matrix.check_matrix`, the same
comparison `policy check` makes for the compiled policy: a mutant is caught when any pair differs
from the file's expected matrix. The loader's annex audit would refuse most forbidden pairs at
load time as well; that is reported, not counted, since the point is what the check sees.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass

import msgspec

from topology.check.matrix import PRINCIPALS, check_matrix
from topology.policy.compiler import (
    annex_violations,
    compile_admin_allowlists,
    compile_allowlists,
    reachability,
)
from topology.spec.model import AdminRule, AllowRule, Topology


@dataclass
class Mutant:
    kind: str
    description: str
    caught: bool
    differences: int
    audit_refuses: bool  # the loader's annex audit would also refuse this topology


def _replace_node(topo: Topology, node) -> Topology:
    return msgspec.structs.replace(topo, nodes={**topo.nodes, node.id: node})


def mutants(topo: Topology):
    """(kind, description, mutated topology) for every single-rule mutation."""
    for node in topo.nodes.values():
        for i, rule in enumerate(node.allow):
            for src in rule.sources:
                rest = tuple(s for s in rule.sources if s != src)
                allow = list(node.allow)
                if rest:
                    allow[i] = msgspec.structs.replace(rule, sources=rest)
                else:
                    del allow[i]
                yield "allow-removed", f"{node.id}.allow[{i}] without {src}", _replace_node(topo, msgspec.structs.replace(node, allow=tuple(allow)))
        for i, rule in enumerate(node.admin):
            for p in rule.principals:
                rest = tuple(x for x in rule.principals if x != p)
                admin = list(node.admin)
                if rest:
                    admin[i] = msgspec.structs.replace(rule, principals=rest)
                else:
                    del admin[i]
                yield "allow-removed", f"{node.id}.admin[{i}] without principal {p}", _replace_node(topo, msgspec.structs.replace(node, admin=tuple(admin)))
    for r in reachability(topo):
        if not r.allowed:
            dst = topo.node(r.dst)
            extra = AllowRule(sources=(r.src,), requests=("POST /v1/*",))
            yield "forbidden-allowed", f"{r.src} -> {r.dst}:{r.port}", _replace_node(topo, msgspec.structs.replace(dst, allow=(*dst.allow, extra)))
    for node in topo.nodes.values():  # a principal admitted where it must not be (store staff, most of all)
        for i, rule in enumerate(node.admin):
            for p in PRINCIPALS:
                if p not in rule.principals:
                    admin = (*node.admin, AdminRule(principals=(p,), at=rule.at, requests=rule.requests))
                    yield "forbidden-allowed", f"principal {p} at {node.id}.admin", _replace_node(topo, msgspec.structs.replace(node, admin=admin))
    for node in topo.nodes.values():
        if node.port is not None:
            allow = tuple(msgspec.structs.replace(r, port=None) for r in node.allow)
            yield "port-shifted", f"{node.id} port {node.port} -> {node.port + 1}", _replace_node(
                topo, msgspec.structs.replace(node, port=node.port + 1, allow=allow))
        if node.admin_port is not None:
            yield "port-shifted", f"{node.id} admin_port {node.admin_port} -> {node.admin_port + 1}", _replace_node(
                topo, msgspec.structs.replace(node, admin_port=node.admin_port + 1))


def run_mutations(topo: Topology, mode: str = "loopback") -> dict:
    """Every mutant through the check; the score is caught / total (100 % required)."""
    t0 = time.perf_counter()
    baseline = check_matrix(topo, compile_allowlists(topo, mode), compile_admin_allowlists(topo, mode), mode)
    if not all(r.ok for r in baseline):
        raise ValueError(f"the unmutated policy already differs from its matrix: {[r for r in baseline if not r.ok][:3]}")
    out: list[Mutant] = []
    for kind, description, mutated in mutants(topo):
        observed = check_matrix(topo, compile_allowlists(mutated, mode), compile_admin_allowlists(mutated, mode), mode)
        diffs = sum(not r.ok for r in observed)
        out.append(Mutant(kind, description, diffs > 0, diffs, bool(annex_violations(mutated))))
    by_kind: dict[str, dict] = {}
    for m in out:
        k = by_kind.setdefault(m.kind, {"mutants": 0, "caught": 0})
        k["mutants"] += 1
        k["caught"] += m.caught
    caught = sum(m.caught for m in out)
    return {
        "topology": topo.name,
        "mode": mode,
        "pairs_checked": len(baseline),
        "mutants": len(out),
        "caught": caught,
        "score": round(100.0 * caught / len(out), 2) if out else 100.0,
        "by_kind": by_kind,
        "audit_also_refuses": Counter(m.kind for m in out if m.audit_refuses),
        "survivors": [asdict(m) for m in out if not m.caught],
        "elapsed_s": round(time.perf_counter() - t0, 3),
    }
