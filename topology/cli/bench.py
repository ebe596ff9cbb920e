"""`konbini bench`: argument parsing and the summary table; the work is in `bench.runner`."""

from __future__ import annotations

import math
from pathlib import Path

from msgspec import UNSET
from rich.console import Console

from bench import scaling
from bench.national import NationalBenchError, NationalOptions, run_national_peak
from bench.options import BenchError, BenchOptions
from bench.results import BenchReport, PhaseResult, as_report
from bench.roles import ROLES
from bench.runner import run_bench
from bench.scenarios import SCENARIOS
from topology.cli.common import UserError, load
from topology.cli.progress import RichProgress, say
from topology.cli.render import show
from topology.spec.load import DEFAULT_TOPOLOGY
from topology.spec.model import Mode

DEFAULT_STATE = ".konbini-bench"
NATIONAL = "national-peak"
NATIONAL_STATE = ".konbini-bench-national"  # its PKI (2 GB for national.yaml) is made once and reused


def add_parser(sub) -> None:
    b = sub.add_parser("bench", help="benchmark scenarios with the kiosk load generator (optionally against HAProxy)")
    b.add_argument(
        "scenarios",
        nargs="*",
        metavar="SCENARIO",
        help=f"one or more of: {', '.join(SCENARIOS)} (default: relay-small relay-64k issuance); or {NATIONAL} alone: "
        "issuances over every store of topology/national.yaml at the national rate (a compressed day) and at "
        "--levels x its peak, p50/p99 and misdelivered per operator",
    )
    b.add_argument(
        "--topology", help="topology file (default: the shipped default topology; failover: topology/redundant.yaml)"
    )
    mode = b.add_mutually_exclusive_group()
    mode.add_argument("--rate", type=float, help="open loop: Poisson arrivals per second (sweep: the starting rate)")
    mode.add_argument("--concurrency", type=int, help="closed loop: requests in flight")
    b.add_argument("--duration", type=float, help="measured seconds per run (default 10; failover 24)")
    b.add_argument("--warmup", type=float, help="warm-up seconds, not recorded (default: 20 %% of duration, at most 2)")
    b.add_argument("--count", type=int, help="stop a run after this many measured requests")
    b.add_argument(
        "--kiosks", type=int, default=24, help="emulated kiosks, each one connection to its store router (default 24)"
    )
    b.add_argument("--workers", type=int, default=1, help="load-generator processes (default 1)")
    b.add_argument("--baseline", choices=["haproxy"], help="run every scenario again with HAProxy as the relay chain")
    b.add_argument("--p99-target", type=float, default=100.0, help="sweep: p99 target in ms (default 100)")
    b.add_argument("--sweep-steps", type=int, default=8, help="sweep: at most this many rate steps")
    b.add_argument("--h2load", action="store_true", help="also cross-check relay-small/relay-64k with h2load")
    b.add_argument(
        "--cross-check",
        action="store_true",
        help="also drive relay-small/relay-64k/relay-1m with the compiled Go client against konbini's and "
        "HAProxy's relays; the report shows its ratios beside the generator's (needs golang-go, haproxy)",
    )
    add_process_options(b)
    add_national_options(b)
    b.add_argument(
        "--no-progress",
        action="store_true",
        help="no live progress bar per run (for logs and pipes); national-peak: no step-by-step lines either",
    )
    b.set_defaults(func=cmd_bench)


def add_process_options(b) -> None:
    """Where the servers run and what they write: processes, netns, lines, the state and report folders."""
    b.add_argument(
        "--relay-processes",
        choices=["operator", "hop"],
        default="operator",
        help="konbini's relays: one process per operator (default), or per operator and hop kind, so the "
        "cost model shows each hop's CPU per request",
    )
    b.add_argument(
        "--center-processes",
        choices=["one", "role"],
        default="one",
        help="the center side: one process (default), or one per role (the issuance centers, the OCSP "
        "responders, the municipalities), so it can use more than one core and the cost model shows "
        "each role's CPU per request",
    )
    b.add_argument(
        "--center-workers",
        type=int,
        default=1,
        metavar="N",
        help="the center side (issuance centers, OCSP, municipalities) in N worker processes sharing its "
        "addresses (SO_REUSEPORT) and its ledger file (default 1)",
    )
    b.add_argument(
        "--netns",
        action="store_true",
        help="run the topology in netns mode and the load workers in the kiosks' namespaces (root)",
    )
    b.add_argument("--tag", default="bench", help="--netns: namespaces konbini-TAG-* (default bench)")
    b.add_argument("--state", help=f"state directory for the bench topology (default {DEFAULT_STATE})")
    b.add_argument("--out", default="bench-out", help="report directory (default bench-out)")
    b.add_argument(
        "--line",
        action="append",
        metavar="KIND=DELAY",
        help="repeat konbini's phase with every line of KIND delayed, e.g. closed-line=20ms (root; repeatable)",
    )


def add_national_options(b) -> None:
    """national-peak's own options."""
    b.add_argument(
        "--levels",
        default="1,10,100",
        help=f"{NATIONAL}: multiples of the peak hour's rate, comma-separated (default 1,10,100)",
    )
    b.add_argument(
        "--hour-s",
        type=float,
        default=2.0,
        help=f"{NATIONAL}: seconds per service hour of the compressed day (default 2; 0: none)",
    )
    b.add_argument(
        "--processes", type=int, default=12, help=f"{NATIONAL}: node processes for the issuance path (default 12)"
    )
    b.add_argument(
        "--cores",
        help=f"{NATIONAL}: pin the run to this many cores, each level once per count, e.g. 2,1 "
        "(with 1 and 2: the rate on 4, 8 and 16 cores estimated)",
    )
    b.add_argument(
        "--max-open",
        type=int,
        default=2000,
        help=f"{NATIONAL}: kiosk connections kept open per load worker (default 2000)",
    )


def cmd_bench(args) -> int:
    if NATIONAL in args.scenarios:
        return cmd_national(args)
    opts = bench_options(args)
    try:
        report = as_report(run_bench(opts))
    except BenchError as exc:
        raise UserError(str(exc)) from None
    show_report(report, opts.out_dir)
    failed = any(r.misdelivered for entry in report.scenarios.values() for _, r in entry.phases())
    checks_failed = any(
        check and not check.get("ok", True)
        for entry in report.scenarios.values()
        for _, r in entry.phases()
        for check in (r.soak, r.failover)
    )
    return 1 if failed or checks_failed or report.partial else 0


def bench_options(args) -> BenchOptions:
    scenarios = args.scenarios or ["relay-small", "relay-64k", "issuance"]
    chosen = [SCENARIOS[s] for s in scenarios if s in SCENARIOS]  # an unknown name is the runner's error
    own = next((str(DEFAULT_TOPOLOGY.parent / sc.topology) for sc in chosen if sc.topology), None)
    duration = (
        args.duration if args.duration is not None else max((sc.duration_s or 10.0 for sc in chosen), default=10.0)
    )
    return BenchOptions(
        scenarios=scenarios,
        topology=load(args.topology or own),
        state_dir=Path(args.state or DEFAULT_STATE),
        out_dir=Path(args.out),
        rate=args.rate,
        concurrency=args.concurrency,
        duration_s=duration,
        warmup_s=args.warmup,
        kiosks=args.kiosks,
        workers=args.workers,
        baseline=args.baseline,
        count=args.count,
        p99_target_ms=args.p99_target,
        sweep_steps=args.sweep_steps,
        h2load=args.h2load,
        cross_check=args.cross_check,
        relay_processes=args.relay_processes,
        center_processes=args.center_processes,
        center_workers=args.center_workers,
        progress=None if args.no_progress else RichProgress(),
        netns=args.netns,
        netns_tag=args.tag,
        lines=_lines(args.line),
    )


def show_report(report: BenchReport, out_dir: Path) -> None:
    """The summary table, then each phase's notes (where the time goes, costs, soak, failover), the
    cross-check's ratios and where the reports are."""
    rows, notes, failovers = [], [], []
    for name, entry in report.scenarios.items():
        for phase, r in entry.phases():
            label = f"{name} {phase}"
            rows.append(phase_row(label, r, (entry.ratios or {}) if phase == "haproxy" else {}))
            notes += phase_notes(label, r)
            if r.failover:
                failovers += failover_lines(label, r.failover)
            if _given(r.best_rate) is not None or r.is_sweep:
                rows.append((label, f"best {_given(r.best_rate)}/s", "-", "-", "-", "-", "-", "-", "-", "-"))
    console = Console()
    title = (
        "konbini bench" + (" (netns)" if report.mode == Mode.NETNS else "") + (" (partial)" if report.partial else "")
    )
    show(
        console,
        title,
        ("scenario", "req/s", "MB/s", "p50 ms", "p99 ms", "dropped", "errors", "misdelivered", "gen cpu", "ratio"),
        rows,
    )
    for line in notes:
        console.print(line, markup=False, highlight=False)
    for line in failovers:  # a table of its own: one line a second, not wrapped
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    for name, entry in (report.cross_check or {}).get("scenarios", {}).items():
        ratios = entry["ratios"]
        console.print(
            f"cross-check {name}: konbini ÷ HAProxy with the compiled client {ratios['compiled_client']}, "
            f"with konbini's generator {ratios['generator'] if ratios['generator'] is not None else '- (no --baseline haproxy)'}"
            + ("" if ratios["agree"] is not False else "  (they disagree: see report.md)"),
            markup=False,
            highlight=False,
        )
    console.print(f"reports: {out_dir / 'report.json'}, {out_dir / 'report.html'} and {out_dir / 'report.md'}")


def phase_row(label: str, r: PhaseResult, ratio: dict) -> tuple[str, ...]:
    gen = r.generator or {}
    return (
        label,
        f"{r.throughput_rps or 0:.1f}",
        f"{(r.bytes_per_s or 0) / 1e6:.1f}",
        _ms(_given(r.p50_ms)),
        _ms(_given(r.p99_ms)),
        str(r.dropped or 0),
        str(sum((r.errors or {}).values())),
        str(r.misdelivered or 0),
        f"{gen.get('cpu_fraction_max', 0):.0%}{' SAT' if gen.get('generator_saturated') else ''}" if gen else "-",
        " ".join(f"{k}={v}" for k, v in ratio.items()) or "-",
    )


def phase_notes(label: str, r: PhaseResult) -> list[str]:
    """Where a phase's time goes, its CPU per request, and its soak's verdict."""
    out = []
    if split := r.latency_split:
        top = sorted(split.items(), key=lambda kv: -abs(kv[1]))
        out.append(
            f"{label} where the time goes (mean ms, adds up to {_given(r.latency_split_total_ms)}): "
            + ", ".join(f"{k} {v:.1f}" for k, v in top)
        )
    if costs := r.costs:
        out.append(f"{label} CPU µs per request: " + cost_line(costs))
    if soak := r.soak:
        worst = max((p.get("rss_growth_pct", 0) for p in soak["processes"].values()), default=0)
        fds = ", ".join(f"{n} {p.get('fds_at_20pct')}->{p.get('fds_at_90pct')}" for n, p in soak["processes"].items())
        out.append(
            f"{label} soak {'passed' if soak['ok'] else 'FAILED'}: largest RSS growth from 20 % to 90 % of the run "
            f"{worst:+.2f} % (limit {soak['rss_growth_limit_pct']:g} %); open descriptors {fds}; "
            f"errors {soak['errors']}, misdelivered {soak['misdelivered']}"
            + (
                f"; issuances not in a final state at the end {iss['unfinished']}, past their bound {iss['past_bound']}"
                if (iss := soak.get("issuances"))
                else ""
            )
        )
    return out


def cmd_national(args) -> int:
    if args.scenarios != [NATIONAL]:
        raise UserError(f"{NATIONAL} runs alone: it brings up its own (large) topology")
    try:
        levels = tuple(float(x) for x in args.levels.split(",") if x.strip())
    except ValueError:
        raise UserError(f"--levels {args.levels!r}: give multiples of the peak rate, e.g. 1,10,100") from None
    try:
        cores = tuple(int(x) for x in (args.cores or "").split(",") if x.strip())
    except ValueError:
        raise UserError(f"--cores {args.cores!r}: give counts of cores, e.g. 2,1") from None
    topo = load(args.topology or str(DEFAULT_TOPOLOGY.parent / "national.yaml"))
    opts = NationalOptions(
        topology=topo,
        state_dir=Path(args.state or NATIONAL_STATE),
        out_dir=Path(args.out),
        levels=levels,
        duration_s=args.duration if args.duration is not None else 20.0,
        warmup_s=args.warmup if args.warmup is not None else 2.0,
        hour_s=args.hour_s,
        processes=args.processes,
        workers=args.workers,
        max_open=args.max_open,
        cores=cores,
        progress=None if args.no_progress else RichProgress(),
        say=None if args.no_progress else say,
    )
    try:
        report = run_national_peak(opts)
    except NationalBenchError as exc:
        raise UserError(str(exc)) from None
    rows = national_rows(report)
    console = Console()
    show(
        console,
        f"konbini bench {NATIONAL}: {report['stores']:,} stores, {report['kiosks']:,} kiosks, up in {report['up_s']} s"
        + (" (partial)" if report["partial"] else ""),
        ("phase", "operator", "offered/s", "issued", "refused", "errors", "p50 ms", "p99 ms", "misdelivered"),
        rows,
    )
    show(
        console,
        "cost per issuance: µs of CPU by role (one node kind a process), TLS handshakes",
        ("phase", "cores", *(r.replace("issuance-", "") for r in ROLES), "total", "full hs", "resumed hs"),
        national_cost_rows(report),
    )
    for line in scaling.describe(report.get("scaling")):
        if line and not line.startswith("|"):
            console.print(line)
    for k, rate in ((report.get("scaling") or {}).get("rate") or {}).items():
        console.print(f"  estimated on {k} cores: {rate:g} issuances/s")
    console.print(f"reports: {opts.out_dir / 'national-peak.json'} and {opts.out_dir / 'national-peak.md'}")
    misdelivered = sum(r["misdelivered"] for r in report["phases"])
    return 1 if misdelivered or report["partial"] else 0


def national_cost_rows(report: dict) -> list[tuple[str, ...]]:
    rows = []
    for r in report["phases"]:
        c = r.get("roles") or {}
        us, hs = c.get("us_per_issuance", {}), c.get("handshakes") or {}
        rows.append(
            (
                r["name"],
                str(r.get("cores") or "all"),
                *(_num(us.get(role)) for role in ROLES),
                _num(c.get("total_us_per_issuance")),
                _num(hs.get("full_per_issuance"), 2),
                _num(hs.get("resumed_per_issuance"), 2),
            )
        )
    return rows


def _num(v, digits: int = 0) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def national_rows(report: dict) -> list[tuple[str, ...]]:
    """Per phase: one row per operator, then the phase over all of them."""
    rows: list[tuple[str, ...]] = []
    for r in report["phases"]:
        for g, v in r["by_group"].items():
            rows.append(
                (
                    r["name"],
                    g,
                    f"{r['offered_rps']:g}",
                    str(v["issued"]),
                    str(v["refused"]),
                    str(sum(v["errors"].values())),
                    _ms(v.get("p50_ms")),
                    _ms(v.get("p99_ms")),
                    str(v["misdelivered"]),
                )
            )
        rows.append(
            (
                r["name"],
                "all",
                f"{r['offered_rps']:g}",
                str(r["ok"]),
                str(sum((r.get("refused") or {}).values())),
                str(sum((r.get("errors") or {}).values())),
                _ms(r.get("p50_ms")),
                _ms(r.get("p99_ms")),
                str(r["misdelivered"]),
            )
        )
    return rows


def failover_lines(label: str, fo: dict) -> list[str]:
    """The failover run: completions and failures per second, with the faults and their ends marked
    at their second, then each fault's failures by reason and its time to pass over."""
    marks: dict[int, list[str]] = {}
    for e in fo["events"]:
        marks.setdefault(int(e["at_s"]), []).append(f"{e['event'].upper()} {e['node']} @{e['at_s']:.1f}s")
    watched = [*fo["targets"]["relays"], *fo["targets"]["servers"]]
    out = [f"{label}: per second (by end time, from the end of warm-up); ok via " + ", ".join(watched)]
    peak = max((row["ok"] + row["failed"] for row in fo["per_second"]), default=0)
    scale = min(1.0, 40 / peak) if peak else 1.0  # the bar: # ok, x failed, at most 40 wide
    for row in fo["per_second"]:
        via = "/".join(str(row["via"].get(w, 0)) for w in watched)
        reasons = ", ".join(f"{k} {v}" for k, v in row["reasons"].items())
        bar = "#" * round(row["ok"] * scale) + "x" * math.ceil(row["failed"] * scale)
        out.append(
            f"  {row['second']:3d}s ok {row['ok']:3d} failed {row['failed']:3d}  via {via:<11} {bar:<40} "
            f"{reasons}{'  <- ' + '; '.join(marks[row['second']]) if row['second'] in marks else ''}"
        )
    for f in fo["faults"]:
        ttp = f["time_to_pass_over_s"]
        what = (
            f"SIGKILLed at {f['at_s']:.1f} s (pid {f['pid']} {'gone' if f['pid_gone'] else 'STILL THERE'}), restarted"
            if f["fault"] == "kill"
            else f"SIGSTOPped (hung) at {f['at_s']:.1f} s (pid {f['pid']}), continued"
        )
        out.append(
            f"{label}: {f['node']} {what} at {f['until_s']} s: failures "
            f"{', '.join(f'{k} {v}' for k, v in f['failures'].items()) or 'none'}; time to pass over "
            f"{'NEVER' if ttp is None else f'{ttp:.3f} s'}; of the issuances started meanwhile "
            f"{f['ok_while_down']} succeeded, {f['ok_while_down_via_survivor']} via {f['survivor']}"
        )
    for err in fo.get("errors", []):
        out.append(f"{label}: fault schedule error: {err}")
    out.append(f"{label}: failover {'passed' if fo['ok'] else 'FAILED'}")
    return out


def cost_line(costs: dict) -> str:
    """Every process's µs per completed request, and the notes that say what limits the phase."""
    procs = ", ".join(
        f"{p['name']} {p['us_per_request']:,.0f}" for p in costs["processes"] if p.get("us_per_request") is not None
    )
    return (procs or "no requests completed") + "".join(f"; NOTE {n}" for n in costs.get("notes", []))


def _given(v):
    """A result's value, None where the phase has no such key."""
    return None if v is UNSET else v


def _ms(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def _lines(given: list[str] | None) -> dict[str, str] | None:
    if not given:
        return None
    out = {}
    for item in given:
        kind, sep, delay = item.partition("=")
        if not sep or not kind or not delay:
            raise UserError(f"--line {item!r}: give KIND=DELAY, e.g. closed-line=20ms")
        out[kind] = delay
    return out
