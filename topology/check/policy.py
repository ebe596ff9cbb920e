"""`konbini policy check`: the expected reachability matrix, probed, compared, reported.

Expected: `policy.reachability` (the same data the app check and the nftables rules compile
from). Observed, netns mode: the kernel-level probes (topology/check/probes.py plans them,
agents.py sends them, observed.py compares); app level and the security annex's live checks,
both modes: topology/check/live.py. Any difference makes the check fail; the report
(topology/check/report.py) names, for every requirement ID, the checks that are evidence for it.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from topology.check.agents import run_probes
from topology.check.live import annex_checks_live, annex_checks_netns, app_checks_loopback, app_checks_netns
from topology.check.matrix import check_matrix
from topology.check.observed import Result, compare, surroundings_results
from topology.check.probes import PROBE_TIMEOUT, plan_probes
from topology.check.report import NETNS_ONLY, OUT_OF_SCOPE, requirement_summary, requirements
from topology.netns.plan import NetPlan
from topology.policy.compiler import compile_admin_allowlists, compile_allowlists
from topology.spec.model import Mode, Topology


def annex_note_is_failure(annex: list[dict], note: str | None) -> bool:
    """No annex evidence at all is a failure, not a pass."""
    return not annex


def _kernel(topo: Topology, plan: NetPlan, timeout: float) -> list[Result]:
    probes = plan_probes(topo, plan)
    answered, sites = run_probes(plan, probes, timeout)
    return compare(probes, answered) + surroundings_results(plan, sites, len(probes))


def check(
    topo: Topology,
    state_dir: Path,
    *,
    netns: bool,
    plan: NetPlan | None = None,
    timeout: float = PROBE_TIMEOUT,
    extra: list[dict] | None = None,
) -> dict:
    """`extra`: evidence from outside tools (testssl.sh, nmap), as annex checks are shaped."""
    t0 = time.perf_counter()
    results: list[Result] = []
    if netns:
        assert plan is not None
        results = _kernel(topo, plan, timeout)
        app, note = app_checks_netns(topo, plan, state_dir), None
    else:
        app, note = app_checks_loopback(topo, state_dir)
    annex, annex_note = (
        annex_checks_netns(topo, plan, state_dir) if netns and plan else annex_checks_live(topo, state_dir)
    )
    mode = Mode.NETNS if netns else Mode.LOOPBACK
    matrix = check_matrix(topo, compile_allowlists(topo, mode), compile_admin_allowlists(topo, mode), mode)
    evidence = list(extra or ())
    summary, tools = requirement_summary(results, app, [*annex, *evidence])
    failed = [r for r in results if not r.ok]
    return {
        "topology": topo.name,
        "source": topo.source,
        "mode": mode,
        "elapsed_s": round(time.perf_counter() - t0, 3),
        "ok": not failed
        and all(a["refused"] for a in app)
        and all(c["ok"] for c in annex)
        and all(c["ok"] for c in evidence)
        and not annex_note_is_failure(annex, annex_note)
        and all(m.ok for m in matrix),
        "probes": len(results),
        "differences": [asdict(r) for r in failed],
        "summary": dict(sorted(summary.items())),
        "app": app,
        "app_note": note,
        "annex": annex,
        "matrix": {"pairs": len(matrix), "differences": [asdict(m) for m in matrix if not m.ok]},
        "annex_note": annex_note,
        "evidence": evidence,
        "requirements": requirements(summary, tools, netns),
        "out_of_scope": OUT_OF_SCOPE,
        "needs_netns": [] if netns else list(NETNS_ONLY),
        # a compact file: where each expanded allow entry was written (file:line of its template)
        "rule_origins": dict(sorted(topo.rule_origins.items())),
        "results": [asdict(r) for r in results],
    }
