"""`konbini bench national-peak`: open-loop issuances spread over every store of a large file at
the national rate, then at 10x and 100x its peak, with p50/p99 and misdeliveries per operator.

The rate: 31.9 million convenience-store issuances in FY2023, about 1.01 a second on average.
How a day's issuances spread over its hours is not in the sources; DAY_PROFILE is an assumption
(nothing before the service opens at 06:30 or after it closes at 23:00, a lunchtime bump and an
evening peak at 18:00-19:00 with ~9.7 % of the day), stated in the report next to the numbers.

What runs: the issuance path only (every store router, the EC routers, DMZ relays, the centers,
OCSP and the municipalities), spread over `processes` forked nodehosts (topology/launch/spread.py),
each serving one node kind so that its CPU is that role's (bench/roles.py); store controllers and the kiosks' maintenance endpoints are not on the path and stay down. The
load generator is in fleet mode (kiosk_emu/load/worker.py): every kiosk of the file can be
drawn, dials its store router at its first customer and keeps the line while it is among the most
recently used. The nodes' clock stands at the peak hour (18:30 JST) for every phase, so every
municipality's own hours are those of the peak; the residents ask for a residence record of a
participating municipality open then, drawn uniformly. Lines are not impaired (loopback mode).
With `cores`, the run is pinned to that many cores (bench/pinning.py) and each level runs once per
count: from 1 and 2, bench/scaling.py estimates the rate on more.
"""

from __future__ import annotations

import json
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path

from bench import scaling
from bench.pinning import PinningError, cores_for, pin
from bench.roles import ROLES, RoleWindow, node_processes, role_costs, role_table
from bench.scenarios import DOC_64K
from gateway.business.clock import JST, Clock
from gateway.business.rules import window, within
from kiosk_emu.card import CardStore
from kiosk_emu.load.run import LoadError, LoadProgress, run_load
from kiosk_emu.load.spec import KioskSpec, LoadSpec, Workload
from topology.launch import spread
from topology.launch.netns import NetnsError, stop_nodehosts
from topology.pki import PKI
from topology.spec.model import CENTER_KINDS, RELAY_KINDS, Topology

ISSUANCES_PER_YEAR = 31_900_000  # FY2023, issue 12 / the seeds' figures
MEAN_RATE = ISSUANCES_PER_YEAR / (365 * 86400)  # ~1.01 per second
# Share of a day's issuances by JST hour (weights; an assumption, see the module's docstring)
DAY_PROFILE: dict[int, float] = {
    6: 0.5,
    7: 2,
    8: 4,
    9: 6,
    10: 7,
    11: 7,
    12: 8,
    13: 7,
    14: 6,
    15: 6,
    16: 7,
    17: 9,
    18: 10,
    19: 9,
    20: 7,
    21: 5,
    22: 3,
}
PEAK_HOUR = max(DAY_PROFILE, key=DAY_PROFILE.__getitem__)
ISSUANCE_PATH = RELAY_KINDS | CENTER_KINDS
CARDS = 512  # residents' cards in the pool: more than the issuances ever in flight at once


class NationalBenchError(Exception):
    """A national-peak bench that cannot run; one line for the user."""


def hour_rate(hour: int) -> float:
    """Issuances per second in that JST hour at the national rate."""
    return MEAN_RATE * 24 * DAY_PROFILE.get(hour, 0.0) / sum(DAY_PROFILE.values())


def peak_rate() -> float:
    return hour_rate(PEAK_HOUR)


@dataclass
class NationalOptions:
    topology: Topology
    state_dir: Path
    out_dir: Path
    levels: tuple[float, ...] = (1.0, 10.0, 100.0)  # multiples of the peak hour's rate
    duration_s: float = 20.0  # measured seconds per level
    warmup_s: float = 2.0
    hour_s: float = 2.0  # the compressed day: seconds per service hour (0: no day phase)
    processes: int = 12
    workers: int = 1
    max_open: int = 2000
    cores: tuple[int, ...] = ()  # pin the run to each count of cores in turn, every level once per count
    progress: LoadProgress | None = None  # each phase's run (the CLI's bar)
    say: Callable[[str], None] | None = None  # one line per step (the CLI prints them)
    notes: list[str] = field(default_factory=list)


def fleet(topo: Topology) -> list[KioskSpec]:
    """Every kiosk of the file with its store router, grouped by the store's operator."""
    out = []
    for k in topo.of_kind("kiosk"):
        r = topo.node(k.upstream or "")
        out.append(KioskSpec(k.id, k.address, r.id, r.address, r.port or 0, "", group=k.operator or r.operator or "-"))
    if not out:
        raise NationalBenchError(f"{topo.source}: no kiosk to send customers to")
    return out


def open_municipalities(topo: Topology, at: datetime) -> list[str]:
    """Codes of the participating municipalities that issue a residence record at `at`."""
    out = []
    for code, node in topo.municipalities().items():
        m = node.municipality
        if (
            m
            and m.participating
            and "residence-record" in m.certificates
            and within(at, *window(topo.service_hours, m.hours))
        ):
            out.append(code)
    if not out:
        raise NationalBenchError(f"{topo.source}: no participating municipality open at {at:%H:%M} JST")
    return sorted(out)


def phases(opts: NationalOptions) -> list[dict]:
    """The compressed day (each service hour for `hour_s` seconds at its real rate), then each
    level's steady rate; every phase an open-loop run of its own."""
    out = []
    if opts.hour_s > 0:
        hours = sorted(DAY_PROFILE)
        segments = tuple((opts.hour_s, hour_rate(h)) for h in hours)
        out.append(
            {
                "name": "day",
                "what": f"a day in {opts.hour_s * len(hours):g} s: each hour {hours[0]:02d}-{hours[-1]:02d} "
                f"JST for {opts.hour_s:g} s at its national rate",
                "segments": segments,
                "hours": hours,
                "rate": sum(r for _, r in segments) / len(segments),
                "duration_s": opts.hour_s * len(hours),
            }
        )
    for cores in opts.cores or (None,):
        for level in opts.levels:
            out.append(
                {
                    "name": f"peak x{level:g}" + (f" on {cores} core{'s' if cores > 1 else ''}" if cores else ""),
                    "what": f"{level:g} x the peak hour's rate ({PEAK_HOUR}:00-{PEAK_HOUR + 1}:00 JST)"
                    + (f", the run pinned to {cores} core(s)" if cores else ""),
                    "segments": (),
                    "rate": peak_rate() * level,
                    "duration_s": opts.duration_s,
                    "level": level,
                    "cores": cores,
                }
            )
    if opts.cores and out and out[0]["name"] == "day":
        out[0]["cores"] = opts.cores[0]
    return out


def clock_start() -> datetime:
    """Yesterday at the peak hour's half past, JST: the same whenever the bench is run."""
    return (datetime.now(JST) - timedelta(days=1)).replace(hour=PEAK_HOUR, minute=30, second=0, microsecond=0)


def _raise_open_files() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def phase_summary(result: dict, phase: dict) -> dict:
    keep = (
        "arrivals",
        "dropped",
        "ok",
        "refused",
        "cancelled",
        "misdelivered",
        "errors",
        "ok_rps",
        "p50_ms",
        "p90_ms",
        "p99_ms",
        "max_ms",
        "measured_s",
        "connections_opened",
        "misdelivery_reasons",
        "by_group",
        "partial",
    )
    out = {"name": phase["name"], "what": phase["what"], "offered_rps": round(phase["rate"], 3)}
    out |= {"level": phase.get("level"), "cores": phase.get("cores")}
    out |= {k: result.get(k) for k in keep}
    out["generator"] = result.get("generator", {})
    if phase.get("hours"):  # the day: issuances per emulated hour, from the per-second timeline
        per = phase["segments"][0][0]
        counts: dict[int, int] = {}
        for row in result.get("timeline", []):
            hour = phase["hours"][min(len(phase["hours"]) - 1, int(row["second"] // per))]
            counts[hour] = counts.get(hour, 0) + row["count"]
        out["per_hour"] = [
            {"hour": h, "offered_per_s": round(hour_rate(h), 3), "completed": counts.get(h, 0)} for h in phase["hours"]
        ]
    return out


def _quiet(line: str) -> None:
    pass


def report_head(opts: NationalOptions, kiosks: list[KioskSpec], munis: list[str], at: datetime) -> dict:
    """national-peak.json's facts about the file and the model, before any phase ran."""
    return {
        "bench": "national-peak",
        "topology": opts.topology.source,
        "stores": len(opts.topology.of_kind("store-router")),
        "kiosks": len(kiosks),
        "operators": sorted({k.group for k in kiosks}),
        "municipalities_open": len(munis),
        "clock": at.isoformat(),
        "issuances_per_year": ISSUANCES_PER_YEAR,
        "mean_rate": round(MEAN_RATE, 4),
        "peak_hour": PEAK_HOUR,
        "peak_rate": round(peak_rate(), 4),
        "day_profile": DAY_PROFILE,
        "phases": [],
        "partial": False,
        "notes": [
            *opts.notes,
            "the day profile is an assumption (no hourly figures in the sources); the nodes' clock stands at "
            f"{PEAK_HOUR}:30 JST in every phase",
            "lines are not impaired; store controllers and kiosk maintenance endpoints are not started",
        ],
    }


def prepare_state(topo: Topology, sdir: Path, at: datetime, say: Callable[[str], None]) -> tuple[PKI, list[str], float]:
    """The PKI (made once, then reused), the residents' cards, and the seconds the PKI took."""
    t0 = time.perf_counter()
    say(f"PKI for {len(topo.nodes):,} nodes in {sdir / 'pki'} (made once, then reused) ...")
    pki = PKI.ensure(sdir, topo)
    pki_s = time.perf_counter() - t0
    cards = CardStore(sdir, pki, Clock(at).now)
    return pki, [c.card_id for c in cards.ensure_pool(CARDS)], pki_s


def check_options(opts: NationalOptions) -> None:
    if opts.processes < len(ROLES) - 1 or opts.workers < 1 or opts.duration_s <= 0 or opts.hour_s < 0:
        raise NationalBenchError(
            f"--processes must be >= {len(ROLES) - 1} (one node kind a process), --workers and --duration > 0, "
            "--hour-s >= 0"
        )
    try:
        for k in opts.cores:
            cores_for(k)
    except PinningError as exc:
        raise NationalBenchError(f"--cores: {exc}") from None
    if any(level <= 0 for level in opts.levels):
        raise NationalBenchError("--levels are multiples of the peak rate: each must be > 0")


def run_national_peak(opts: NationalOptions) -> dict:
    """The file's issuance path up, each phase's load over every kiosk, the reports written."""
    check_options(opts)
    topo = opts.topology
    kiosks = fleet(topo)
    at = clock_start()
    munis = open_municipalities(topo, at)
    _raise_open_files()
    sdir = opts.state_dir.resolve()
    sdir.mkdir(parents=True, exist_ok=True)
    say = opts.say or _quiet
    pki, pool, pki_s = prepare_state(topo, sdir, at, say)
    if opts.cores:  # the start too: the node processes inherit it
        pin([], cores_for(opts.cores[0]))
    servers = sum(1 for n in topo.nodes.values() if n.is_server and n.kind in ISSUANCE_PATH)
    say(f"starting the issuance path: {servers:,} servers in {opts.processes} processes ...")
    t1 = time.perf_counter()
    try:
        hosts = spread.start(
            topo,
            sdir,
            opts.processes,
            clock=at.isoformat(),
            kinds=ISSUANCE_PATH,
            by_kind=True,
            progress=lambda done, total: say(f"  {done}/{total} processes ready ({time.perf_counter() - t1:.1f} s)"),
        )
    except (NetnsError, ValueError) as exc:
        raise NationalBenchError(str(exc)) from None
    up_s = time.perf_counter() - t1
    report = report_head(opts, kiosks, munis, at) | {
        "servers_up": servers,
        "processes": len(hosts),
        "pki_s": round(pki_s, 1),
        "up_s": round(up_s, 1),
        "spread": "one node kind a process: " + ", ".join(h.site for h in hosts),
        "cores_available": len(os.sched_getaffinity(0) if not opts.cores else cores_for(max(opts.cores))),
    }
    hop_kinds = {n.id: n.kind for n in topo.nodes.values() if n.is_server}  # the same for every phase
    centers = tuple(sorted(n.id for n in topo.of_kind("issuance-center")))
    base = LoadSpec(
        workload=Workload("national-peak", "issuance", size=DOC_64K),
        state_dir=str(sdir),
        kiosks=kiosks,
        ca_path=str(pki.network_ca_path),
        warmup_s=opts.warmup_s,
        open_muni=munis[0],
        closed_muni=munis[0],
        clock_start=at.isoformat(),
        hop_kinds=hop_kinds,
        centers=centers,
        fleet=True,
        cards=tuple(pool),
        munis=tuple(munis),
        max_open=opts.max_open,
    )  # each phase: its rate, duration and segments
    try:
        run_phases(opts, base, report, say, hosts)
    finally:
        stop_nodehosts(hosts)
    report["scaling"] = scaling.estimate(report["phases"])
    write_national(report, opts.out_dir)
    return report


def run_phases(opts: NationalOptions, base: LoadSpec, report: dict, say: Callable[[str], None], hosts) -> None:
    """Each phase's load over the fleet, its cost per role over the measured window, one line said
    per phase; a partial one ends the run."""
    for phase in phases(opts):
        if phase.get("cores"):
            pin([h.pid for h in hosts], cores_for(phase["cores"]))
        spec = replace(base, rate=phase["rate"], duration_s=phase["duration_s"], segments=phase["segments"])
        window = RoleWindow(node_processes(hosts), Path(base.state_dir))

        def on_go(go: float, window=window, spec=spec) -> None:  # the CPU window is the measured window
            window.arm(go + spec.warmup_s, go + spec.warmup_s + spec.duration_s)

        try:
            result = run_load(
                spec, opts.workers, progress=opts.progress, label=f"national-peak {phase['name']}", on_go=on_go
            )
        except LoadError as exc:
            raise NationalBenchError(str(exc)) from None
        finally:
            window.close()
        row = phase_summary(result, phase)
        row["costs"] = window.model(result["ok"], cpus=phase.get("cores"))
        row["roles"] = role_costs(row["costs"], window.handshakes(), result["ok"])
        row["load_average"] = [round(x, 1) for x in os.getloadavg()]
        report["phases"].append(row)
        say(phase_line(row))
        if result.get("partial"):
            report["partial"] = True
            break


def phase_line(row: dict) -> str:
    ops = ", ".join(f"{g} {v['issued']} (p99 {_ms(v.get('p99_ms'))})" for g, v in row["by_group"].items())
    return (
        f"{row['name']}: offered {row['offered_rps']:g}/s, {row['ok']} issued of {row['arrivals']} "
        f"({row['dropped']} dropped), p50 {_ms(row['p50_ms'])} p99 {_ms(row['p99_ms'])} ms, misdelivered "
        f"{row['misdelivered']}; per operator: {ops}{cost_line(row.get('roles'))}"
    )


def cost_line(c: dict | None) -> str:
    """ "; cost …" for a phase's line: µs per issuance in all and by role, handshakes per issuance."""
    if not c or not c.get("issued"):
        return ""
    roles = ", ".join(f"{r} {v:,.0f}" for r, v in c["us_per_issuance"].items())
    hs = c.get("handshakes")
    hs_text = (
        f"; handshakes per issuance {hs['full_per_issuance']:g} full, {hs['resumed_per_issuance']:g} resumed"
        if hs
        else ""
    )
    return f"; CPU {c['total_us_per_issuance']:,.0f} µs per issuance ({roles}){hs_text}"


def _ms(v) -> str:
    return "-" if v is None else f"{v:.0f}"


def write_national(report: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    js = out_dir / "national-peak.json"
    js.write_text(json.dumps(report, indent=1, default=str))
    md = out_dir / "national-peak.md"
    lines = [
        f"# konbini bench national-peak: {report['topology']}",
        "",
        f"{report['stores']:,} stores, {report['kiosks']:,} kiosks, {report['municipalities_open']:,} municipalities open at "
        f"{report['clock']}; {report['servers_up']:,} servers of the issuance path up in {report['up_s']} s "
        f"({report['processes']} processes). National rate {report['issuances_per_year']:,} a year = "
        f"{report['mean_rate']}/s on average; peak hour {report['peak_hour']}:00 at {report['peak_rate']}/s.",
        "",
        "| phase | offered /s | arrivals | issued | dropped | errors | p50 ms | p99 ms | misdelivered | kiosks dialled | gen CPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["phases"]:
        gen = r.get("generator", {})
        lines.append(
            f"| {r['name']} | {r['offered_rps']:g} | {r['arrivals']} | {r['ok']} | {r['dropped']} | "
            f"{sum((r.get('errors') or {}).values())} | {_ms(r['p50_ms'])} | {_ms(r['p99_ms'])} | {r['misdelivered']} | "
            f"{r.get('connections_opened')} | {gen.get('cpu_fraction_max', 0):.0%} |"
        )
    lines += [
        "",
        "Per operator:",
        "",
        "| phase | operator | issued | refused | errors | p50 ms | p99 ms | misdelivered |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["phases"]:
        for g, v in r["by_group"].items():
            lines.append(
                f"| {r['name']} | {g} | {v['issued']} | {v['refused']} | {sum(v['errors'].values())} | "
                f"{_ms(v.get('p50_ms'))} | {_ms(v.get('p99_ms'))} | {v['misdelivered']} |"
            )
    day = next((r for r in report["phases"] if r.get("per_hour")), None)
    if day:
        lines += [
            "",
            "The compressed day, completions per emulated hour:",
            "",
            "| hour JST | offered /s | completed |",
            "|---|---|---|",
        ]
        lines += [f"| {h['hour']:02d} | {h['offered_per_s']} | {h['completed']} |" for h in day["per_hour"]]
    lines += [
        "",
        "Cost per role over each phase's measured window (µs of CPU per issuance; each node process serves "
        "one kind) and TLS handshakes per issuance (full, resumed; every hop's server side):",
        "",
        *role_table(report["phases"]),
        "",
        "Core scaling:",
        "",
        *scaling.describe(report.get("scaling")),
    ]
    lines += ["", *[f"- {n}" for n in report["notes"]], ""]
    md.write_text("\n".join(lines))
    return js, md
