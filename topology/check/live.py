"""The live evidence of `konbini policy check`: the app-level checks (a refused connection, counted
by the server that refused it) and the security annex's kiosk and store checks, run against the
topology launched in-process (loopback) or the running nodehosts from inside their namespaces.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

import trio

from gateway.business.clock import JST, Clock
from gateway.node.server import NodeStartError
from kiosk_emu.card import CardStore
from topology.check.annex import (
    NEEDS_OPEN_HOURS,
    AnnexCheck,
    NotCheckable,
    RemoteRun,
    closed_at,
    evidence_site,
    first_store,
    open_time,
    run_annex_checks,
)
from topology.check.app import CHECKS, pick, run_check
from topology.check.scrape import ScrapeError, sample, scrape_in_namespace
from topology.launch.clockfile import read_clock, running_clock
from topology.launch.loopback import run_topology
from topology.netns.plan import NetPlan
from topology.pki import PKI
from topology.spec.model import Mode, Topology


def app_checks_loopback(topo: Topology, state_dir: Path) -> tuple[list[dict], str | None]:
    """Launch the topology in-process (loopback) and run the app checks against it, with the
    servers' denial counters as evidence. If the addresses are taken (`konbini up` is running),
    check the running one instead, without counters."""

    async def checks(pki, running) -> list[dict]:
        out = []
        for name in CHECKS:
            server = running.servers.get(topo.of_kind(CHECKS[name][1])[0].id) if running else None
            before = server.denials[CHECKS[name][3]] if server else 0
            res = asdict(await run_check(topo, pki, Mode.LOOPBACK, name))
            if server is not None:
                with trio.move_on_after(2):
                    while server.denials[CHECKS[name][3]] == before:
                        await trio.sleep(0.01)  # the server counts the denial as it closes, just after we see it
                res["denials_counted"] = server.denials[CHECKS[name][3]] - before
                res["refused"] = res["refused"] and res["denials_counted"] >= 1
            out.append(res)
        return out

    async def taken(start_error):
        return await checks(
            PKI.ensure(state_dir, topo), None
        ), f"topology already running ({start_error}); denial counters not read"

    return trio.run(_launched, topo, state_dir, None, lambda running: checks(running.pki, running), taken)


async def _launched(topo: Topology, state_dir: Path, clock: Clock | None, run, taken):
    """`run(running)` against the topology launched in-process (loopback); `taken(error)` instead
    when its addresses are already in use (a `konbini up` is running). Returns (results, note)."""
    try:
        async with trio.open_nursery() as nursery:
            running = await nursery.start(
                lambda task_status: run_topology(topo, state_dir, clock=clock, task_status=task_status)
            )
            out = await run(running)
            nursery.cancel_scope.cancel()
            return out, None
    except (NodeStartError, BaseExceptionGroup) as exc:
        start_error = _find(exc, NodeStartError)
        if start_error is None:
            raise
    return await taken(start_error)


def evidence_clock(topo: Topology) -> Clock:
    """Today's first open hour in Tokyo (10:00, or the next day the service opens: not Dec 29 - Jan 3),
    so that the issuances of SEC-KI-2 can go whatever the wall clock says."""
    now = datetime.now(JST)
    return Clock(open_time(topo, now) or now.replace(hour=10, minute=0, second=0, microsecond=0))


def annex_checks_live(topo: Topology, state_dir: Path) -> tuple[list[dict], str | None]:
    """Launch the topology (loopback, in-process: its admin and maintenance servers too) and run the
    annex's live checks against it (topology/check/annex.py); when `konbini up` runs it already,
    against that one, in its time (its counters are in its process, so not read here)."""
    clock = evidence_clock(topo)

    async def taken(start_error):
        now = running_clock(state_dir)
        pki = PKI.ensure(state_dir, topo)
        skip = _closed_checks(topo, now)
        annex = await run_annex_checks(
            RemoteRun(topo, state_dir, pki, CardStore(state_dir, pki, now.now), now, mode=Mode.LOOPBACK), skip=skip
        )
        note = f"checked against the running topology ({start_error}), at its time {now.now():%Y-%m-%d %H:%M} JST"
        return annex, note

    annex, note = trio.run(_launched, topo, state_dir, clock, run_annex_checks, taken)
    if note is None:
        note = f"checked against the topology launched in-process at {clock.now():%Y-%m-%d %H:%M} JST, when the service is open"
        return annex, note
    closed = _closed_checks(topo, running_clock(state_dir))
    return annex + private_launch_checks(topo, closed, running_clock(state_dir)), note


def _closed_checks(topo: Topology, clock: Clock) -> frozenset[str]:
    """The issuing checks the running nodes would refuse now: their time is outside service hours."""
    return NEEDS_OPEN_HOURS if closed_at(topo, clock.now()) else frozenset()


def private_launch_checks(topo: Topology, requirements: frozenset[str], nodes_clock: Clock) -> list[dict]:
    """`requirements`' checks on a launch of the same file at its first open hour today, in a network
    namespace of their own with a fresh state directory (root: `unshare -n`): the running nodes'
    time is outside service hours, and an evidence run must not depend on the hour it is run at."""
    if not requirements:
        return []
    at = evidence_clock(topo).now()
    why = (
        f"on a launch of the same file at {at:%Y-%m-%d %H:%M} JST in a private network namespace: "
        f"the running nodes' time {nodes_clock.now():%Y-%m-%d %H:%M} JST is outside service hours "
        f"({closed_at(topo, nodes_clock.now())})"
    )
    with tempfile.TemporaryDirectory(prefix="konbini-evidence-") as tmp:
        cmd = [
            "unshare",
            "-n",
            "sh",
            "-c",
            'ip link set lo up && exec "$@"',
            "sh",
            sys.executable,
            "-m",
            "topology.check.annex",
            "--launch",
            "--topology",
            topo.source,
            "--state",
            tmp,
            "--clock",
            at.isoformat(),
            "--only",
            ",".join(sorted(requirements)),
        ]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
            failure = (
                None
                if done.returncode == 0 and done.stdout.strip()
                else (done.stderr.strip().splitlines() or ["no output"])[-1][:300]
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            failure = str(exc)
    if failure is not None:
        return [
            asdict(
                AnnexCheck(
                    req,
                    why,
                    "checked at an open hour",
                    f"NOT RUN: {failure} (as root it runs in a network "
                    "namespace of its own; else start the topology at an open hour: `konbini up --clock …`)",
                    False,
                )
            )
            for req in sorted(requirements)
        ]
    checks = json.loads(done.stdout.strip().splitlines()[-1])
    return [{**c, "check": f"{c['check']}, {why}"} for c in checks]


def _denials(topo: Topology, plan: NetPlan, state_dir: Path, ctl: str | None) -> float | None:
    """The store controller's `principal-not-allowed` denials, scraped from the monitoring namespace."""
    if plan.monitoring is None or ctl is None:
        return None
    try:
        text = scrape_in_namespace(
            plan.monitoring.namespace, topo.source, state_dir, ctl, plan.address(ctl), plan.monitoring.address
        )
    except ScrapeError:
        return None
    return sample(text, "konbini_denials_total", reason="principal-not-allowed")


def _refusals_counted(annex: list[dict], plan: NetPlan, ctl: str, before: float | None, after: float | None) -> dict:
    """The store controller's metrics counted at least the store-staff calls the annex checks made."""
    refused_calls = sum(
        c["numbers"].get("calls", 0)
        for c in annex
        if c["requirement"] == "SEC-ST-3/KI-6" and "admin API as store-staff" in c["check"]
    )
    counted = None if before is None or after is None else int(after - before)
    return asdict(
        AnnexCheck(
            "SEC-ST-3/KI-6",
            f"{ctl}'s refusals of store staff, in its metrics (scraped from {plan.monitoring.namespace if plan.monitoring else '-'})",
            f'konbini_denials_total{{reason="principal-not-allowed"}} up by at least {refused_calls}',
            f"up by {counted}" if counted is not None else "scrape failed",
            counted is not None and counted >= refused_calls > 0,
            tool="Prometheus scrape as the monitoring principal (topology/check/scrape.py)",
            numbers={"before": before, "after": after, "refused_calls": refused_calls},
        )
    )


def annex_checks_netns(topo: Topology, plan: NetPlan, state_dir: Path) -> tuple[list[dict], str | None]:
    """The annex's live checks from the store's namespace against the nodehosts, with the store
    controller's `principal-not-allowed` denials read before and after through its metrics scrape
    from the monitoring namespace (the servers are other processes here). The issuing checks go to
    a private launch when the nodes' time is outside service hours (`private_launch_checks`)."""
    try:
        site = evidence_site(topo)
    except NotCheckable as exc:  # as in loopback mode: a NOT RUN note (no annex evidence fails the check)
        return [], f"annex checks not run: {exc}"
    try:
        ctl = first_store(topo)[0]
    except NotCheckable:
        ctl = None  # its admin checks say NOT RUN; no denials to count
    clock, speed = read_clock(state_dir)
    nodes_clock = Clock.parse(clock, speed)
    closed = _closed_checks(topo, nodes_clock)
    before = _denials(topo, plan, state_dir, ctl)
    cmd = ["ip", "netns", "exec", plan.namespace(site), sys.executable, "-m", "topology.check.annex"]
    cmd += ["--topology", topo.source, "--state", str(state_dir), "--clock-speed", str(speed)]
    cmd += ["--skip", ",".join(sorted(closed)), *(["--clock", clock] if clock else [])]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0 or not done.stdout.strip():
        return (
            [],
            f"annex checks failed in {plan.namespace(site)}: {(done.stderr.strip().splitlines() or ['no output'])[-1][:300]}",
        )
    annex = json.loads(done.stdout.strip().splitlines()[-1])
    if ctl is not None:
        annex.append(_refusals_counted(annex, plan, ctl, before, _denials(topo, plan, state_dir, ctl)))
    annex += private_launch_checks(topo, closed, nodes_clock)
    return (
        annex,
        f"kiosk and store checks ran inside {plan.namespace(site)} against the running nodes, at their time {nodes_clock.now():%Y-%m-%d %H:%M} JST",
    )


def _find(exc: BaseException, kind: type) -> BaseException | None:
    """`exc` itself or the first `kind` inside an exception group (Trio nurseries wrap errors)."""
    if isinstance(exc, kind):
        return exc
    for inner in getattr(exc, "exceptions", ()):
        if (found := _find(inner, kind)) is not None:
            return found
    return None


def app_checks_netns(topo: Topology, plan: NetPlan, state_dir: Path) -> list[dict]:
    """The app checks from inside the source nodes' namespaces against the running netns topology."""
    procs = {}
    for name in CHECKS:
        src, _ = pick(topo, name)
        procs[name] = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                plan.namespace(topo.node(src).site),
                sys.executable,
                "-m",
                "topology.check.app",
                "--topology",
                topo.source,
                "--state",
                str(state_dir),
                "--mode",
                Mode.NETNS,
                name,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    out = []
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=30)
        if proc.returncode != 0:
            out.append(
                {
                    "check": name,
                    "refused": False,
                    "detail": f"check failed: {stderr.strip()[-200:]}",
                    "requirements": CHECKS[name][2],
                }
            )
        else:
            out.append(json.loads(stdout))
    return out
