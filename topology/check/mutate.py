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

nftables mutants are live (root, a running `konbini up --netns`): one accept rule deleted by
handle from one namespace's ruleset, then the probes of `policy check --netns` that expect an
answer and whose path crosses that namespace (sent from it or watched in it: the only ones an
accept rule fewer can change), compared as the check compares them; then the compiled ruleset is
loaded again and its listing must equal the one before. The whole probe plan runs before the
first mutant and after the last: both must pass (a probe that differs is run again, up to
RETRIES times, before it counts). A mutant's differences are also matched against
the connection its rule accepts (`unexplained`: differences elsewhere, a sign of a flaky run; such
a run is made again, up to RETRIES times, and the reruns are counted in the result).
"""

from __future__ import annotations

import re
import subprocess
import time
from collections import Counter
from dataclasses import asdict, dataclass

import msgspec

from topology.check.agents import AgentError, ProbeAgents, namespace_of
from topology.check.matrix import PRINCIPALS, check_matrix
from topology.check.observed import compare
from topology.check.probes import PROBE_TIMEOUT, plan_probes, renumber
from topology.netns.plan import MONITORING_SITE, NetPlan
from topology.policy.compiler import (
    annex_violations,
    compile_admin_allowlists,
    compile_allowlists,
    reachability,
)
from topology.policy.nft import TABLE, compile_rulesets
from topology.spec.model import AdminRule, AllowRule, Mode, Topology


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
                yield (
                    "allow-removed",
                    f"{node.id}.allow[{i}] without {src}",
                    _replace_node(topo, msgspec.structs.replace(node, allow=tuple(allow))),
                )
        for i, rule in enumerate(node.admin):
            for p in rule.principals:
                rest = tuple(x for x in rule.principals if x != p)
                admin = list(node.admin)
                if rest:
                    admin[i] = msgspec.structs.replace(rule, principals=rest)
                else:
                    del admin[i]
                yield (
                    "allow-removed",
                    f"{node.id}.admin[{i}] without principal {p}",
                    _replace_node(topo, msgspec.structs.replace(node, admin=tuple(admin))),
                )
    for r in reachability(topo):
        if not r.allowed:
            dst = topo.node(r.dst)
            extra = AllowRule(sources=(r.src,), requests=("POST /v1/*",))
            yield (
                "forbidden-allowed",
                f"{r.src} -> {r.dst}:{r.port}",
                _replace_node(topo, msgspec.structs.replace(dst, allow=(*dst.allow, extra))),
            )
    for node in topo.nodes.values():  # a principal admitted where it must not be (store staff, most of all)
        for rule in node.admin:
            for p in PRINCIPALS:
                if p not in rule.principals:
                    admin = (*node.admin, AdminRule(principals=(p,), at=rule.at, requests=rule.requests))
                    yield (
                        "forbidden-allowed",
                        f"principal {p} at {node.id}.admin",
                        _replace_node(topo, msgspec.structs.replace(node, admin=admin)),
                    )
    for node in topo.nodes.values():
        if node.port is not None:
            allow = tuple(msgspec.structs.replace(r, port=None) for r in node.allow)
            yield (
                "port-shifted",
                f"{node.id} port {node.port} -> {node.port + 1}",
                _replace_node(topo, msgspec.structs.replace(node, port=node.port + 1, allow=allow)),
            )
        if node.admin_port is not None:
            yield (
                "port-shifted",
                f"{node.id} admin_port {node.admin_port} -> {node.admin_port + 1}",
                _replace_node(topo, msgspec.structs.replace(node, admin_port=node.admin_port + 1)),
            )


def run_mutations(
    topo: Topology, mode: Mode = Mode.LOOPBACK, plan: NetPlan | None = None, timeout: float = PROBE_TIMEOUT
) -> dict:
    """Every mutant through the check; the score is caught / total (100 % required). With `plan`
    (netns mode, the topology running) the nftables mutants too, live."""
    t0 = time.perf_counter()
    baseline = check_matrix(topo, compile_allowlists(topo, mode), compile_admin_allowlists(topo, mode), mode)
    if not all(r.ok for r in baseline):
        raise ValueError(
            f"the unmutated policy already differs from its matrix: {[r for r in baseline if not r.ok][:3]}"
        )
    out: list[Mutant] = []
    for kind, description, mutated in mutants(topo):
        observed = check_matrix(topo, compile_allowlists(mutated, mode), compile_admin_allowlists(mutated, mode), mode)
        diffs = sum(not r.ok for r in observed)
        out.append(Mutant(kind, description, diffs > 0, diffs, bool(annex_violations(mutated))))
    live = run_nft_mutations(topo, plan, timeout) if plan is not None else None
    if live is not None:
        out += [
            Mutant("nft-rule-dropped", m["description"], m["differences"] > 0, m["differences"], False)
            for m in live["mutants"]
        ]
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
        **({"netns": live} if live is not None else {}),
    }


# -- nftables mutants, live in the namespaces of a running `konbini up --netns` ----------------------

# an accept rule of an allow entry as `nft -a list chain` prints it (topology.policy.nft.accept_rule)
_ACCEPT = re.compile(
    r"ip saddr (?P<src>\S+) ip daddr (?P<dst>\S+) tcp dport (?P<port>\d+) ct state new .*\baccept "
    r'comment "(?P<comment>[^"]*)" # handle (?P<handle>\d+)$'
)
_COUNTER = re.compile(r"counter packets \d+ bytes \d+")
_HANDLE = re.compile(r" # handle \d+")
RETRIES = 2  # a run with differences off the dropped rule's connection (a reply late on a busy machine) is run again


@dataclass(frozen=True)
class NftRule:
    site: str
    chain: str
    handle: int
    src_ip: str
    dst_ip: str
    port: int
    comment: str  # "nodes.ocsp.allow[0]: issuance-center -> ocsp"


def _nft(namespace: str, *args: str, stdin: str | None = None) -> str:
    done = subprocess.run(
        ["ip", "netns", "exec", namespace, "nft", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"nft {' '.join(args)} in {namespace}: {done.stderr.strip()[-300:]}")
    return done.stdout


def _accept_rules(site: str, listing: str) -> list[NftRule]:
    """The allow entries' accept rules in an `nft -a list table` listing, in order."""
    out, chain = [], ""
    for line in listing.splitlines():
        if line.strip().startswith("chain "):
            chain = line.split()[1]
        elif m := _ACCEPT.search(line.strip()):
            out.append(NftRule(site, chain, int(m["handle"]), m["src"], m["dst"], int(m["port"]), m["comment"]))
    return out


def _listing(plan: NetPlan, site: str) -> tuple[str, list[NftRule]]:
    """The namespace's policy table as loaded now: as nft prints it (handles and counters left out,
    for comparison) and its accept rules with their handles."""
    text = _nft(namespace_of(plan, site), "-a", "list", "table", "inet", TABLE)
    return _HANDLE.sub("", _COUNTER.sub("counter", text)), _accept_rules(site, text)


def _full_run(agents: ProbeAgents, probes, timeout: float) -> tuple[list, int]:
    """The whole probe plan's differences, and how many reruns it took: the probes that differed
    are run again, up to RETRIES times, as a mutant's run is (one reply late on a busy machine
    is not a rule that did not come back; a real difference differs every time)."""
    answered, _ = agents.run(renumber(probes), timeout)
    failed = [r for r in compare(probes, answered) if not r.ok]
    reruns = 0
    while failed and reruns < RETRIES:
        reruns += 1
        again = [probes[r.id] for r in failed]
        answered, _ = agents.run(renumber(again), timeout, only_used=True)
        failed = [r for r in compare(again, answered) if not r.ok]
    return failed, reruns


def run_nft_mutations(topo: Topology, plan: NetPlan, timeout: float = PROBE_TIMEOUT) -> dict:
    """Every allow entry's accept rule of every namespace dropped in turn, probed, restored."""
    with ProbeAgents(plan) as agents:
        return _nft_mutations(topo, plan, agents, timeout)


def _nft_mutations(topo: Topology, plan: NetPlan, agents: ProbeAgents, timeout: float) -> dict:
    t0 = time.perf_counter()
    sites = [*plan.sites, *([MONITORING_SITE] if plan.monitoring is not None else [])]
    probes = plan_probes(topo, plan)
    rulesets = compile_rulesets(topo, plan)
    before, before_reruns = _full_run(agents, probes, timeout)
    if before:
        raise ValueError(
            f"the running topology already differs from its policy: {len(before)} probes, e.g. {before[0]}"
        )
    rows = []
    for site in sites:
        ns = namespace_of(plan, site)
        watched = [p for p in probes if p.expect_answer and site in p.watch]
        unmutated, rules = _listing(plan, site)
        for i in range(len(rules)):
            rule, t1 = rules[i], time.perf_counter()  # its handle as loaded now: the table is reloaded after each
            mutant = (rule.src_ip, rule.dst_ip, rule.port)
            for attempt in range(1, RETRIES + 2):
                _nft(ns, "delete", "rule", "inet", TABLE, rule.chain, "handle", str(rule.handle))
                try:
                    answered, _ = agents.run(renumber(watched), timeout, only_used=True)
                    failed = None
                except AgentError as exc:  # the agents start again for the next run
                    if attempt > RETRIES:
                        raise
                    answered, failed = {}, str(exc)
                finally:
                    _nft(ns, "-f", "-", stdin=rulesets[site])
                diffs = [r for r in compare(watched, answered) if not r.ok]
                off = (
                    [
                        f"{d.kind} {d.src} -> {d.dst}:{d.port}"
                        for d, p in ((d, probes[d.id]) for d in diffs)
                        if (p.src_ip, p.dst_ip, p.port) != mutant
                    ]
                    if failed is None
                    else [failed]
                )
                now, rules = _listing(plan, site)
                if not off or now != unmutated:
                    break
                rule = next(
                    r
                    for r in rules
                    if (r.chain, r.comment, r.src_ip, r.dst_ip, r.port) == (rule.chain, rule.comment, *mutant)
                )
            rows.append(
                {
                    "description": f"{site} {rule.chain}: {rule.comment}",
                    "site": site,
                    "chain": rule.chain,
                    "rule": rule.comment.split(":")[0],
                    "differences": len(diffs),
                    "probes": len(watched),
                    "unexplained": len(off),
                    "unexplained_probes": off,
                    "attempts": attempt,
                    "restored": now == unmutated,
                    "seconds": round(time.perf_counter() - t1, 3),
                }
            )
            if now != unmutated:
                raise RuntimeError(f"{ns}: the compiled ruleset did not come back after {rows[-1]['description']}")
    after, after_reruns = _full_run(agents, probes, timeout)
    return {
        "namespaces": len(sites),
        "probes_full_run": len(probes),
        "before_ok": True,
        "after_ok": not after,
        "after_differences": [asdict(r) for r in after],
        "unexplained": sum(r["unexplained"] for r in rows),
        "reruns": sum(r["attempts"] - 1 for r in rows),
        "full_run_reruns": before_reruns + after_reruns,
        "elapsed_s": round(time.perf_counter() - t0, 3),
        "mutants": rows,
    }
