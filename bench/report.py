"""The bench report: report.json (machine-readable), report.html (inline SVG plots, no network),
report.md (the tables to paste: summary, latency split, cost model, cross-check) and
latency-split.png (the split as stacked bars, every scenario, konbini and the baseline side by side)."""

from __future__ import annotations

import html
import io
from pathlib import Path

import msgspec
from msgspec import UNSET

from bench.results import BenchReport, PhaseResult, ScenarioEntry

SUMMARY = ("throughput_rps", "bytes_per_s", "p50_ms", "p90_ms", "p99_ms", "p999_ms", "dropped", "misdelivered")


SPLIT_PNG = "latency-split.png"


def write_reports(report: BenchReport, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    if any(_v(r.latency_split) for e in report.scenarios.values() for _, r in e.phases()):
        try:
            plot_split_png(report, out_dir / SPLIT_PNG)
            report.split_plot = SPLIT_PNG
        except Exception as exc:  # noqa: BLE001 - a plot must not cost the report
            report.notes.append(f"latency split plot failed: {exc!r}")
    j = out_dir / "report.json"
    j.write_bytes(msgspec.json.format(msgspec.json.encode(report, enc_hook=str), indent=1))
    h = out_dir / "report.html"
    h.write_text(render_html(report))
    (out_dir / "report.md").write_text(render_markdown(report))
    return j, h


def _figure(ncols: int = 1):
    """A small figure (ncols plots side by side) on the headless backend (matplotlib is imported
    only when plotting)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=(4.5 * ncols if ncols > 1 else 5, 3))


def _svg(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.find("<svg") :]


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.2f}"
    if isinstance(v, dict):
        return ", ".join(f"{k}: {n}" for k, n in v.items()) or "0"
    return html.escape(str(v))


def _v(value, default=None):
    """A result's value, `default` where the phase has no such key (UNSET)."""
    return default if value is UNSET else value


def plot_percentiles(name: str, entry: ScenarioEntry) -> str:
    keys = ["p50_ms", "p90_ms", "p99_ms", "p999_ms"]
    fig, ax = _figure()
    phases = entry.phases()
    width = 0.8 / max(1, len(phases))
    for i, (phase, r) in enumerate(phases):
        vals = [_v(getattr(r, k)) or 0 for k in keys]
        ax.bar([x + i * width for x in range(len(keys))], vals, width, label=phase)
    ax.set_xticks([x + width * (len(phases) - 1) / 2 for x in range(len(keys))], ["p50", "p90", "p99", "p99.9"])
    ax.set_ylabel("ms")
    ax.set_title(f"{name}: latency percentiles")
    ax.legend()
    return _svg(fig)


def plot_timeline(name: str, entry: ScenarioEntry) -> str:
    fig, ax = _figure()
    for phase, r in entry.phases():
        tl = _v(r.timeline) or []
        xs = [t["second"] for t in tl]
        ax.plot(xs, [t["p50_ms"] for t in tl], label=f"{phase} p50")
        ax.plot(xs, [t["p99_ms"] for t in tl], linestyle="--", label=f"{phase} p99")
    ax.set_xlabel("s after warm-up")
    ax.set_ylabel("ms")
    ax.set_title(f"{name}: latency over time")
    ax.legend(fontsize=7)
    return _svg(fig)


def plot_hops(name: str, entry: ScenarioEntry) -> str:
    fig, ax = _figure()
    rows = []
    for phase, r in entry.phases():
        for hop, p in (_v(r.hops) or {}).items():
            rows.append((f"{phase}:{hop}", p.get("p50_ms") or 0, p.get("p99_ms") or 0))
    ys = range(len(rows))
    ax.barh([y - 0.2 for y in ys], [r[1] for r in rows], 0.4, label="p50")
    ax.barh([y + 0.2 for y in ys], [r[2] for r in rows], 0.4, label="p99")
    ax.set_yticks(list(ys), [r[0] for r in rows], fontsize=7)
    ax.set_xlabel("ms (own time per hop, server-timing)")
    ax.set_title(f"{name}: per-hop time")
    ax.legend()
    return _svg(fig)


def plot_sweep(name: str, entry: ScenarioEntry) -> str:
    fig, ax = _figure()
    target = None
    for phase, r in entry.phases():
        steps = _v(r.steps) or []
        target = _v(r.p99_target_ms)
        ax.plot([s["rate"] for s in steps], [s["p99_ms"] or 0 for s in steps], marker="o", label=f"{phase} p99")
        ax.plot(
            [s["rate"] for s in steps],
            [s["p50_ms"] or 0 for s in steps],
            marker=".",
            linestyle="--",
            label=f"{phase} p50",
        )
    if target:
        ax.axhline(target, color="red", linewidth=0.8, label="p99 target")
    ax.set_xlabel("offered rate (req/s)")
    ax.set_ylabel("ms")
    ax.set_title(f"{name}: latency vs rate")
    ax.legend(fontsize=7)
    return _svg(fig)


def plot_soak(name: str, entry: ScenarioEntry) -> str:
    """RSS (left) and open descriptors (right) of every node process over the soak."""
    fig, (rss, fds) = _figure(ncols=2)
    for phase, r in entry.phases():
        for proc, p in ((_v(r.soak) or {}).get("processes") or {}).items():
            series = p.get("series") or []
            xs = [x["s"] for x in series]
            rss.plot(xs, [x["rss_mib"] for x in series], label=f"{phase}:{proc}")
            fds.plot(xs, [x["fds"] for x in series], label=f"{phase}:{proc}")
    rss.set_xlabel("s")
    rss.set_ylabel("RSS MiB")
    fds.set_xlabel("s")
    fds.set_ylabel("open descriptors")
    rss.set_title(f"{name}: memory per node process")
    fds.set_title(f"{name}: descriptors per node process")
    rss.legend(fontsize=6)
    return _svg(fig)


def plot_split(name: str, entry: ScenarioEntry) -> str:
    """The mean latency split into its parts, one stacked bar per phase: the parts add up to the mean latency."""
    fig, ax = _figure()
    phases = [(p, r) for p, r in entry.phases() if _v(r.latency_split)]
    parts = sorted({k for _, r in phases for k in r.latency_split})
    bottoms = [0.0] * len(phases)
    for part in parts:
        vals = [max(0.0, r.latency_split.get(part, 0.0)) for _, r in phases]
        ax.bar(range(len(phases)), vals, 0.6, bottom=bottoms, label=part)
        bottoms = [b + v for b, v in zip(bottoms, vals, strict=True)]
    ax.set_xticks(range(len(phases)), [p for p, _ in phases])
    ax.set_ylabel("mean ms")
    ax.set_title(f"{name}: where the time goes")
    ax.legend(fontsize=5, loc="upper left", bbox_to_anchor=(1, 1))
    return _svg(fig)


CHAIN = ("kiosk", "store-router", "ec-router", "dmz-relay", "issuance-center")


def part_rank(part: str) -> tuple[float, str]:
    """Where a split part sits on the path, so a stacked bar reads from the kiosk inwards: the
    generator's own parts first, then each line before the hop it leads to, the body last."""
    if part == "body":
        return (99.0, part)
    if part.startswith(("generator", "kiosk")):
        return (0.0, part)
    if part.startswith("line "):
        dest = part[5:].split("→", 1)[-1].split(" ", 1)[0]
        return (CHAIN.index(dest) - 0.5 if dest in CHAIN else 50.0, part)
    kind = part.split(" ", 1)[0]
    return (float(CHAIN.index(kind)) if kind in CHAIN else 50.0, part)


def split_parts(report: BenchReport) -> list[str]:
    parts = {k for e in report.scenarios.values() for _, r in e.phases() for k in (_v(r.latency_split) or {})}
    return sorted(parts, key=part_rank)


def plot_split_png(report: BenchReport, path: Path) -> None:
    """One stacked bar per scenario and phase (konbini, lines, haproxy side by side), a colour per
    part of the latency split; the bar's height is the mean latency (the parts add up to it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [
        (name, phase, r.latency_split)
        for name, e in report.scenarios.items()
        for phase, r in e.phases()
        if _v(r.latency_split)
    ]
    parts = split_parts(report)
    colours = plt.get_cmap("tab20").colors
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(bars) + 3), 4.5))
    bottoms = [0.0] * len(bars)
    for i, part in enumerate(parts):
        vals = [max(0.0, split.get(part, 0.0)) for _, _, split in bars]
        ax.bar(
            range(len(bars)),
            vals,
            0.7,
            bottom=bottoms,
            label=part,
            color=colours[i % 20],
            hatch="//" if i >= 20 or "(haproxy)" in part else None,
            edgecolor="white",
            linewidth=0.3,
        )
        bottoms = [b + v for b, v in zip(bottoms, vals, strict=True)]
    ax.set_xticks(range(len(bars)), [f"{name}\n{phase}" for name, phase, _ in bars], fontsize=7)
    ax.set_ylabel("mean ms per request")
    ax.set_title("where the time goes: the latency split")
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


# -- Markdown ------------------------------------------------------------------------------------


def _md(v, digits: int = 1) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    if isinstance(v, dict):
        return ", ".join(f"{k} {n}" for k, n in v.items()) or "0"
    return str(v).replace("|", "\\|")


def _table(head: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + [
        "| " + " | ".join(_md(c) for c in row) + " |" for row in rows
    ]


def md_summary(report: BenchReport) -> list[str]:
    rows = []
    for name, e in report.scenarios.items():
        for phase, r in e.phases():
            gen = _v(r.generator) or {}
            rows.append(
                [
                    name,
                    phase,
                    _v(r.throughput_rps),
                    _v(r.p50_ms),
                    _v(r.p99_ms),
                    _v(r.dropped),
                    sum((_v(r.errors) or {}).values()),
                    _v(r.misdelivered),
                    gen.get("cpu_fraction_max"),
                    (_v(r.servers) or {}).get("relay_max_process_peak_rss_mib"),
                ]
            )
        if e.ratios is not UNSET:
            rows.append(
                [name, "konbini ÷ HAProxy", *[f"{k} {v}" for k, v in e.ratios.items()], "", "", "", "", "", ""][:10]
            )
    out = _table(
        [
            "scenario",
            "phase",
            "req/s",
            "p50 ms",
            "p99 ms",
            "dropped",
            "errors",
            "misdelivered",
            "gen cpu",
            "largest relay process peak RSS MiB",
        ],
        rows,
    )
    return out + md_by_credential(report)


def md_by_credential(report: BenchReport) -> list[str]:
    """A table of its own for the smartphone credential, where a phase held one up."""
    by_credential = [
        [
            name,
            phase,
            cred,
            c.get("count"),
            c.get("issued"),
            c.get("refused"),
            sum((c.get("errors") or {}).values()),
            c.get("misdelivered"),
            c.get("p50_ms"),
            c.get("p99_ms"),
        ]
        for name, e in report.scenarios.items()
        for phase, r in e.phases()
        for cred, c in (_v(r.by_credential) or {}).items()
    ]
    if any(row[2] == "smartphone" for row in by_credential):  # a line of its own for the smartphone credential
        return [
            "",
            "By credential (card, or the smartphone credential of seed 002):",
            "",
            *_table(
                [
                    "scenario",
                    "phase",
                    "credential",
                    "measured",
                    "issued",
                    "refused",
                    "errors",
                    "misdelivered",
                    "p50 ms",
                    "p99 ms",
                ],
                by_credential,
            ),
        ]
    return []


def md_split(report: BenchReport) -> list[str]:
    """Per scenario: the mean ms of every part, one column per phase, and the total they add up to."""
    out = []
    for name, e in report.scenarios.items():
        phases = [(p, r) for p, r in e.phases() if _v(r.latency_split)]
        if not phases:
            continue
        parts = sorted({k for _, r in phases for k in r.latency_split}, key=part_rank)
        rows = [[part, *[r.latency_split.get(part) for _, r in phases]] for part in parts]
        rows.append(["**total (mean latency)**", *[_v(r.latency_split_total_ms) for _, r in phases]])
        rows.append(["p50 / p99 ms", *[f"{_md(_v(r.p50_ms))} / {_md(_v(r.p99_ms))}" for _, r in phases]])
        out += [f"**{name}** (mean ms per request)", "", *_table(["part", *[p for p, _ in phases]], rows), ""]
        for phase, r in phases:
            if _v(r.haproxy_timers):
                out.append(
                    f"{phase}: HAProxy's hops come from its log timers (%Tw+%Tc+%Tr, one request in "
                    f"{r.haproxy_timers.get('log_sample')} logged); a hop's own work and the line in front of it "
                    "are one part there, because HAProxy does not log when it read a request from its socket."
                )
                out.append("")
    return out


def md_costs(report: BenchReport) -> list[str]:
    rows, notes = [], []
    for name, e in report.scenarios.items():
        for phase, r in e.phases():
            c = _v(r.costs)
            if not c:
                continue
            for p in c["processes"]:
                rows.append([name, phase, p["name"], " ".join(p["hops"]) or "–", p["cores"], p["us_per_request"]])
            hops = ", ".join(f"{k} {v:,.0f}" for k, v in c.get("per_hop_us", {}).items() if v is not None)
            rows.append(
                [
                    name,
                    phase,
                    "**relay chain**",
                    hops or "per hop: not separable (one process serves several hops)",
                    None,
                    c.get("chain_us_per_request"),
                ]
            )
            notes += [f"- {name} {phase}: {n}" for n in c.get("notes", [])]
    if not rows:
        return []
    return [
        *_table(["scenario", "phase", "process", "hops (per-hop µs)", "cores", "CPU µs / request"], rows),
        "",
        *notes,
    ]


def md_cross_check(report: BenchReport) -> list[str]:
    cc = _v(report.cross_check)
    if not cc:
        return []
    rows = []
    for name, e in cc["scenarios"].items():
        k, h, r = e["konbini"], e["haproxy"], e["ratios"]
        rows.append(
            [
                name,
                e["concurrency"],
                k.get("rps"),
                h.get("rps"),
                k.get("p50_ms"),
                h.get("p50_ms"),
                (k.get("costs") or {}).get("chain_us_per_request"),
                (h.get("costs") or {}).get("chain_us_per_request"),
                r["compiled_client"],
                r["generator"],
                r["agree"],
            ]
        )
    head = [
        "scenario",
        "c",
        "konbini req/s",
        "HAProxy req/s",
        "konbini p50 ms",
        "HAProxy p50 ms",
        "konbini chain µs/req",
        "HAProxy µs/req",
        "ratio (compiled client)",
        "ratio (konbini generator)",
        "agree",
    ]
    out = [
        f"Compiled client: {cc['client']}, {cc['duration_s']:g} s per run; ratio = konbini ÷ HAProxy throughput.",
        "",
        *_table(head, rows),
        "",
    ]
    for name, e in cc["scenarios"].items():
        r = e["ratios"]
        if r["agree"] is False:
            out.append(
                f"- {name}: the ratios disagree ({r['generator']} with konbini's generator, {r['compiled_client']} "
                "with the compiled client): both are shown; the compiled client's is free of the Python generator's CPU."
            )
        elif r["generator"] is None:
            out.append(f"- {name}: no generator ratio (the scenario did not run with --baseline haproxy).")
    return out


def md_failover(report: BenchReport) -> list[str]:
    """The failover runs: per second completions, failures (by reason) and who served, the kills,
    restarts, hangs and continues at their second; then per fault its failures by reason and time
    to pass over."""
    out = []
    for name, e in report.scenarios.items():
        for phase, r in e.phases():
            fo = _v(r.failover)
            if not fo:
                continue
            out += md_failover_run(name, phase, r, fo)
    return out


def md_failover_run(name: str, phase: str, r: PhaseResult, fo: dict) -> list[str]:
    """One failover run: its table per second, then its faults."""
    watched = [*fo["targets"]["relays"], *fo["targets"]["servers"]]
    marks: dict[int, list[str]] = {}
    for ev in fo["events"]:
        marks.setdefault(int(ev["at_s"]), []).append(f"{ev['event']} {ev['node']} at {ev['at_s']:.1f} s")
    rows = [
        [
            row["second"],
            row["ok"],
            row["failed"],
            row["reasons"] or "",
            *[row["via"].get(w, 0) for w in watched],
            "; ".join(marks.get(row["second"], [])),
        ]
        for row in fo["per_second"]
    ]
    muni = fo["targets"].get("municipality_name") or fo["targets"]["municipality"]
    out = [
        f"**{name} {phase}**: {_v(r.rate)}/s open loop, {_v(r.ok)} issued, misdelivered "
        f"{_v(r.misdelivered)}; failover {'passed' if fo['ok'] else 'FAILED'}; {muni}'s document servers "
        f"{' and '.join(fo['targets']['servers'])}. Seconds from the end of "
        "warm-up, issuances counted in the second they ended.",
        "",
        *_table(["s", "ok", "failed", "failures by reason", *[f"ok via {w}" for w in watched], "event"], rows),
        "",
    ]
    frows = [
        [
            f["fault"],
            f["node"],
            f["at_s"],
            f["until_s"],
            f["pid_gone"] if f["fault"] == "kill" else "-",
            f["failures"] or "none",
            f["time_to_pass_over_s"],
            f["ok_while_down"],
            f"{f['ok_while_down_via_survivor']} via {f['survivor']}",
        ]
        for f in fo["faults"]
    ]
    out += _table(
        [
            "fault (kill: SIGKILL, hang: SIGSTOP)",
            "node",
            "at s",
            "ended at s",
            "pid gone",
            "failures by reason",
            "time to pass over s",
            "started while down, issued",
            "served by the survivor",
        ],
        frows,
    )
    out += ["", *[f"- fault schedule error: {err}" for err in fo.get("errors", [])], ""]
    return out


def _soak_issuances(soak: dict) -> str:
    """The ledger at the soak's end: issuances not in a final state, and those past their bound."""
    iss = soak.get("issuances")
    if not iss:
        return ""
    return (
        f"; issuances not in a final state at the end {iss['unfinished']}, past their bound "
        f"{iss['past_bound']} (must be 0); by state {iss['states']}"
    )


def plot_failover(name: str, r: PhaseResult) -> str:
    """Completions and failures per second, the faults and their ends as vertical lines."""
    fig, ax = _figure()
    fo = r.failover
    xs = [row["second"] for row in fo["per_second"]]
    ax.bar(xs, [row["ok"] for row in fo["per_second"]], 0.8, label="ok")
    ax.bar(
        xs,
        [row["failed"] for row in fo["per_second"]],
        0.8,
        bottom=[row["ok"] for row in fo["per_second"]],
        label="failed",
    )
    for ev in fo["events"]:
        ax.axvline(ev["at_s"], color="red" if ev["event"] in ("kill", "hang") else "green", linewidth=0.8)
        ax.text(ev["at_s"], ax.get_ylim()[1] * 0.95, f" {ev['event']} {ev['node']}", fontsize=6, rotation=90, va="top")
    ax.set_xlabel("s after warm-up (by end time)")
    ax.set_ylabel("issuances per second")
    ax.set_title(f"{name}: failover")
    ax.legend(fontsize=7)
    return _svg(fig)


def render_markdown(report: BenchReport) -> str:
    o = report.options
    out = [
        f"# konbini bench{' (partial: interrupted)' if report.partial else ''}",
        "",
        f"{report.created} · {report.mode} · {o.get('kiosks')} kiosks · "
        f"{o.get('workers')} generator worker(s) · {report.machine.get('cpus')} CPUs · "
        f"scenarios {' '.join(o.get('scenarios') or [])}",
        "",
    ]
    out += [f"- {n}" for n in report.notes]
    out += ["", "## Summary", "", *md_summary(report), ""]
    if split := md_split(report):
        out += ["## Where the time goes (latency split)", "", *split]
        if _v(report.split_plot):
            out += [f"![latency split]({report.split_plot})", ""]
    if costs := md_costs(report):
        out += ["## Cost model (CPU per completed request, measured window)", "", *costs, ""]
    if cc := md_cross_check(report):
        out += ["## Cross-check with the compiled client", "", *cc, ""]
    if fo := md_failover(report):
        out += ["## Failover (a server SIGKILLed and restarted under load)", "", *fo]
    return "\n".join(out) + "\n"


def html_costs(entry_name: str, entry: ScenarioEntry) -> list[str]:
    """The cost model of a scenario's phases as a table, and its notes."""
    out = []
    for phase, r in entry.phases():
        c = _v(r.costs)
        if not c or not c.get("processes"):
            continue
        out.append(
            f"<table><tr><th colspan='5' style='text-align:left'>{html.escape(entry_name)} {phase}: CPU per completed "
            f"request over {c['window_s']:.1f} s, {c['completed']} requests</th></tr>"
            "<tr><th>process</th><th>hops</th><th>cores</th><th>µs / request</th></tr>"
        )
        for p in c["processes"]:
            out.append(
                f"<tr><td>{html.escape(p['name'])}</td><td>{html.escape(' '.join(p['hops']))}</td>"
                f"<td>{_fmt(p['cores'])}</td><td>{_fmt(p['us_per_request'])}</td></tr>"
            )
        hops = ", ".join(f"{k} {v:,.0f}" for k, v in c.get("per_hop_us", {}).items() if v is not None)
        out.append(
            f"<tr><td><b>relay chain</b></td><td>{html.escape(hops or 'per hop: one process serves several hops')}</td>"
            f"<td></td><td>{_fmt(c.get('chain_us_per_request'))}</td></tr></table>"
        )
        out += [f"<p><em>{phase}: {html.escape(n)}</em></p>" for n in c.get("notes", [])]
    return out


def render_html(report: BenchReport) -> str:
    """report.html: the summary table, each scenario's plots and costs, the cross-checks."""
    parts = html_head(report) + html_summary(report)
    for name, entry in report.scenarios.items():
        parts += html_scenario(name, entry)
    parts += html_cross_checks(report)
    parts.append("<p>JSON twin: report.json</p></body></html>")
    return "\n".join(parts)


def html_head(report: BenchReport) -> list[str]:
    o = report.options
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>konbini bench</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#eee}.plots{display:flex;flex-wrap:wrap;gap:1em}"
        ".plots svg{width:460px;height:auto}</style></head><body>",
        f"<h1>konbini bench{' (partial: interrupted)' if report.partial else ''}</h1>",
        f"<p>{html.escape(report.created)} · {o.get('kiosks')} kiosks · {o.get('workers')} generator worker(s) · "
        f"baseline: {html.escape(str(o.get('baseline')))} · emulated time {html.escape(str(o.get('emulated_time')))} · "
        f"{report.machine.get('cpus')} CPUs</p>",
    ]
    for note in report.notes:
        parts.append(f"<p><em>{html.escape(note)}</em></p>")
    return parts


def html_summary(report: BenchReport) -> list[str]:
    """One row per phase, and konbini ÷ HAProxy under a scenario where both ran."""
    parts: list[str] = []
    parts.append(
        "<table><tr><th>scenario</th><th>phase</th><th>mode</th>"
        + "".join(f"<th>{k}</th>" for k in SUMMARY)
        + "<th>errors</th><th>refused</th><th>gen cpu</th><th>saturated</th><th>relay cpu cores</th><th>largest relay process peak RSS MiB</th></tr>"
    )
    for name, entry in report.scenarios.items():
        for phase, r in entry.phases():
            mode = f"{_v(r.mode, 'sweep')} " + (
                f"{r.rate:g}/s" if _v(r.rate) else f"c={_v(r.concurrency)}" if _v(r.concurrency) else ""
            )
            gen = _v(r.generator, {})
            srv = _v(r.servers, {})
            parts.append(
                f"<tr><td>{html.escape(name)}</td><td>{phase}</td><td>{html.escape(mode)}</td>"
                + "".join(f"<td>{_fmt(_v(getattr(r, k)))}</td>" for k in SUMMARY)
                + f"<td>{_fmt(_v(r.errors))}</td><td>{_fmt(_v(r.refused))}</td><td>{_fmt(gen.get('cpu_fraction_max'))}</td>"
                f"<td>{_fmt(gen.get('generator_saturated'))}</td><td>{_fmt(srv.get('relay_cpu_cores'))}</td><td>{_fmt(srv.get('relay_max_process_peak_rss_mib'))}</td></tr>"
            )
        if entry.ratios is not UNSET:
            parts.append(
                f"<tr><td>{html.escape(name)}</td><td colspan='{len(SUMMARY) + 8}' style='text-align:left'>konbini ÷ HAProxy: "
                + html.escape(", ".join(f"{k} {v}" for k, v in entry.ratios.items()))
                + "</td></tr>"
            )
    parts.append("</table>")
    return parts


def html_scenario(name: str, entry: ScenarioEntry) -> list[str]:
    """A scenario's plots (sweep, or percentiles, timeline, hops and split), failover and soak, and costs."""
    parts: list[str] = []
    parts.append(f"<h2>{html.escape(name)}</h2><p>{html.escape(entry.what)}</p><div class='plots'>")
    try:
        if any(r.is_sweep for _, r in entry.phases()):
            parts.append(plot_sweep(name, entry))
            for phase, r in entry.phases():
                parts.append(
                    f"<p>{phase}: highest rate with p99 &lt; {_v(r.p99_target_ms)} ms: <b>{_fmt(_v(r.best_rate))}</b> req/s</p>"
                )
        else:
            parts += [plot_percentiles(name, entry), plot_timeline(name, entry), plot_hops(name, entry)]
            if any(_v(r.latency_split) for _, r in entry.phases()):
                parts.append(plot_split(name, entry))
        for phase, r in entry.phases():
            if _v(r.failover):
                parts.append(plot_failover(f"{name} {phase}", r))
            if soak := _v(r.soak):
                parts.append(plot_soak(name, entry))
                worst = max((p.get("rss_growth_pct", 0) for p in soak["processes"].values()), default=0)
                parts.append(
                    f"<p>{phase} soak: <b>{'passed' if soak['ok'] else 'FAILED'}</b>; largest RSS growth from 20 % "
                    f"to 90 % of the run: {worst:+.2f} % (limit {soak['rss_growth_limit_pct']} %); errors {soak['errors']}, "
                    f"misdelivered {soak['misdelivered']}{_soak_issuances(soak)}</p>"
                )
    except Exception as exc:  # noqa: BLE001 - a plot must not cost the report
        parts.append(f"<p>plot failed: {html.escape(repr(exc))}</p>")
    parts.append("</div>")
    parts += html_costs(name, entry)
    return parts


def html_cross_checks(report: BenchReport) -> list[str]:
    """The latency-split picture, the compiled client's and h2load's cross-checks, where they ran."""
    parts: list[str] = []
    if _v(report.split_plot):
        parts.append(
            f"<h2>Where the time goes</h2><img src='{html.escape(report.split_plot)}' alt='latency split' style='max-width:100%'>"
        )
    if cc := _v(report.cross_check):
        parts.append(
            f"<h2>Cross-check: {html.escape(cc['client'])}</h2><table><tr><th>scenario</th><th>konbini req/s</th>"
            "<th>HAProxy req/s</th><th>ratio (compiled client)</th><th>ratio (konbini generator)</th><th>agree</th></tr>"
        )
        for name, e in cc["scenarios"].items():
            r = e["ratios"]
            parts.append(
                f"<tr><td>{html.escape(name)}</td><td>{_fmt(e['konbini'].get('rps'))}</td><td>{_fmt(e['haproxy'].get('rps'))}</td>"
                f"<td>{_fmt(r['compiled_client'])}</td><td>{_fmt(r['generator'])}</td><td>{_fmt(r['agree'])}</td></tr>"
            )
        parts.append("</table>")
    if report.h2load is not UNSET:
        h = report.h2load
        parts.append(
            f"<h2>h2load cross-check</h2><p>{html.escape(h.get('note', ''))}</p><table><tr><th>phase</th><th>size</th><th>req/s</th><th>bytes/s</th><th>mean ms</th><th>failed</th></tr>"
        )
        for r in h.get("runs", []):
            parts.append(
                f"<tr><td>{r['phase']}</td><td>{r['size']}</td><td>{_fmt(r.get('rps'))}</td><td>{_fmt(r.get('bytes_per_s'))}</td><td>{_fmt(r.get('mean_ms'))}</td><td>{_fmt(r.get('failed'))}</td></tr>"
            )
        parts.append("</table>")
    return parts
