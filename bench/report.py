"""The bench report: report.json (machine-readable) and report.html (inline SVG plots, no network)."""

from __future__ import annotations

import html
import io
import json
from pathlib import Path

SUMMARY = ("throughput_rps", "bytes_per_s", "p50_ms", "p90_ms", "p99_ms", "p999_ms", "dropped", "misdelivered")


def write_reports(report: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    j = out_dir / "report.json"
    j.write_text(json.dumps(report, indent=1, ensure_ascii=False, default=str))
    h = out_dir / "report.html"
    h.write_text(render_html(report))
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
    return text[text.find("<svg"):]


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.2f}"
    if isinstance(v, dict):
        return ", ".join(f"{k}: {n}" for k, n in v.items()) or "0"
    return html.escape(str(v))


def _phases(entry: dict) -> list[tuple[str, dict]]:
    return [(p, entry[p]) for p in ("konbini", "lines", "haproxy") if isinstance(entry.get(p), dict)]


def plot_percentiles(name: str, entry: dict) -> str:
    keys = ["p50_ms", "p90_ms", "p99_ms", "p999_ms"]
    fig, ax = _figure()
    phases = _phases(entry)
    width = 0.8 / max(1, len(phases))
    for i, (phase, r) in enumerate(phases):
        vals = [r.get(k) or 0 for k in keys]
        ax.bar([x + i * width for x in range(len(keys))], vals, width, label=phase)
    ax.set_xticks([x + width * (len(phases) - 1) / 2 for x in range(len(keys))], ["p50", "p90", "p99", "p99.9"])
    ax.set_ylabel("ms")
    ax.set_title(f"{name}: latency percentiles")
    ax.legend()
    return _svg(fig)


def plot_timeline(name: str, entry: dict) -> str:
    fig, ax = _figure()
    for phase, r in _phases(entry):
        tl = r.get("timeline") or []
        xs = [t["second"] for t in tl]
        ax.plot(xs, [t["p50_ms"] for t in tl], label=f"{phase} p50")
        ax.plot(xs, [t["p99_ms"] for t in tl], linestyle="--", label=f"{phase} p99")
    ax.set_xlabel("s after warm-up")
    ax.set_ylabel("ms")
    ax.set_title(f"{name}: latency over time")
    ax.legend(fontsize=7)
    return _svg(fig)


def plot_hops(name: str, entry: dict) -> str:
    fig, ax = _figure()
    rows = []
    for phase, r in _phases(entry):
        for hop, p in (r.get("hops") or {}).items():
            rows.append((f"{phase}:{hop}", p.get("p50_ms") or 0, p.get("p99_ms") or 0))
    ys = range(len(rows))
    ax.barh([y - 0.2 for y in ys], [r[1] for r in rows], 0.4, label="p50")
    ax.barh([y + 0.2 for y in ys], [r[2] for r in rows], 0.4, label="p99")
    ax.set_yticks(list(ys), [r[0] for r in rows], fontsize=7)
    ax.set_xlabel("ms (own time per hop, server-timing)")
    ax.set_title(f"{name}: per-hop time")
    ax.legend()
    return _svg(fig)


def plot_sweep(name: str, entry: dict) -> str:
    fig, ax = _figure()
    target = None
    for phase, r in _phases(entry):
        steps = r.get("steps") or []
        target = r.get("p99_target_ms")
        ax.plot([s["rate"] for s in steps], [s["p99_ms"] or 0 for s in steps], marker="o", label=f"{phase} p99")
        ax.plot([s["rate"] for s in steps], [s["p50_ms"] or 0 for s in steps], marker=".", linestyle="--", label=f"{phase} p50")
    if target:
        ax.axhline(target, color="red", linewidth=0.8, label="p99 target")
    ax.set_xlabel("offered rate (req/s)")
    ax.set_ylabel("ms")
    ax.set_title(f"{name}: latency vs rate")
    ax.legend(fontsize=7)
    return _svg(fig)


def plot_soak(name: str, entry: dict) -> str:
    """RSS (left) and open descriptors (right) of every node process over the soak."""
    fig, (rss, fds) = _figure(ncols=2)
    for phase, r in _phases(entry):
        for proc, p in ((r.get("soak") or {}).get("processes") or {}).items():
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


def plot_split(name: str, entry: dict) -> str:
    """The mean latency split into its parts, one stacked bar per phase: the parts add up to the mean latency."""
    fig, ax = _figure()
    phases = [(p, r) for p, r in _phases(entry) if r.get("latency_split")]
    parts = sorted({k for _, r in phases for k in r["latency_split"]})
    bottoms = [0.0] * len(phases)
    for part in parts:
        vals = [max(0.0, r["latency_split"].get(part, 0.0)) for _, r in phases]
        ax.bar(range(len(phases)), vals, 0.6, bottom=bottoms, label=part)
        bottoms = [b + v for b, v in zip(bottoms, vals, strict=True)]
    ax.set_xticks(range(len(phases)), [p for p, _ in phases])
    ax.set_ylabel("mean ms")
    ax.set_title(f"{name}: where the time goes")
    ax.legend(fontsize=5, loc="upper left", bbox_to_anchor=(1, 1))
    return _svg(fig)


def render_html(report: dict) -> str:
    o = report.get("options", {})
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>konbini bench</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#eee}.plots{display:flex;flex-wrap:wrap;gap:1em}"
        ".plots svg{width:460px;height:auto}</style></head><body>",
        f"<h1>konbini bench{' (partial: interrupted)' if report.get('partial') else ''}</h1>",
        f"<p>{html.escape(report.get('created', ''))} · {o.get('kiosks')} kiosks · {o.get('workers')} generator worker(s) · "
        f"baseline: {html.escape(str(o.get('baseline')))} · emulated time {html.escape(str(o.get('emulated_time')))} · "
        f"{report.get('machine', {}).get('cpus')} CPUs</p>",
    ]
    for note in report.get("notes", []):
        parts.append(f"<p><em>{html.escape(note)}</em></p>")
    parts.append("<table><tr><th>scenario</th><th>phase</th><th>mode</th>" + "".join(f"<th>{k}</th>" for k in SUMMARY)
                 + "<th>errors</th><th>refused</th><th>gen cpu</th><th>saturated</th><th>relay cpu cores</th><th>relay peak RSS MiB</th></tr>")
    for name, entry in report.get("scenarios", {}).items():
        for phase, r in _phases(entry):
            mode = f"{r.get('mode', 'sweep')} " + (f"{r['rate']:g}/s" if r.get("rate") else f"c={r.get('concurrency')}" if r.get("concurrency") else "")
            gen = r.get("generator", {})
            srv = r.get("servers", {})
            parts.append(
                f"<tr><td>{html.escape(name)}</td><td>{phase}</td><td>{html.escape(mode)}</td>"
                + "".join(f"<td>{_fmt(r.get(k))}</td>" for k in SUMMARY)
                + f"<td>{_fmt(r.get('errors'))}</td><td>{_fmt(r.get('refused'))}</td><td>{_fmt(gen.get('cpu_fraction_max'))}</td>"
                f"<td>{_fmt(gen.get('generator_saturated'))}</td><td>{_fmt(srv.get('relay_cpu_cores'))}</td><td>{_fmt(srv.get('relay_peak_rss_mib'))}</td></tr>"
            )
        if "ratios" in entry:
            parts.append(f"<tr><td>{html.escape(name)}</td><td colspan='{len(SUMMARY) + 8}' style='text-align:left'>konbini ÷ HAProxy: "
                         + html.escape(", ".join(f"{k} {v}" for k, v in entry["ratios"].items())) + "</td></tr>")
    parts.append("</table>")
    for name, entry in report.get("scenarios", {}).items():
        parts.append(f"<h2>{html.escape(name)}</h2><p>{html.escape(entry.get('what', ''))}</p><div class='plots'>")
        try:
            if any("steps" in r for _, r in _phases(entry)):
                parts.append(plot_sweep(name, entry))
                for phase, r in _phases(entry):
                    parts.append(f"<p>{phase}: highest rate with p99 &lt; {r.get('p99_target_ms')} ms: <b>{_fmt(r.get('best_rate'))}</b> req/s</p>")
            else:
                parts += [plot_percentiles(name, entry), plot_timeline(name, entry), plot_hops(name, entry)]
                if any(r.get("latency_split") for _, r in _phases(entry)):
                    parts.append(plot_split(name, entry))
            for phase, r in _phases(entry):
                if soak := r.get("soak"):
                    parts.append(plot_soak(name, entry))
                    worst = max((p.get("rss_growth_pct", 0) for p in soak["processes"].values()), default=0)
                    parts.append(f"<p>{phase} soak: <b>{'passed' if soak['ok'] else 'FAILED'}</b>; largest RSS growth from 20 % "
                                 f"to 90 % of the run: {worst:+.2f} % (limit {soak['rss_growth_limit_pct']} %); errors {soak['errors']}, "
                                 f"misdelivered {soak['misdelivered']}</p>")
        except Exception as exc:  # noqa: BLE001 - a plot must not cost the report
            parts.append(f"<p>plot failed: {html.escape(repr(exc))}</p>")
        parts.append("</div>")
    if "h2load" in report:
        h = report["h2load"]
        parts.append(f"<h2>h2load cross-check</h2><p>{html.escape(h.get('note', ''))}</p><table><tr><th>phase</th><th>size</th><th>req/s</th><th>bytes/s</th><th>mean ms</th><th>failed</th></tr>")
        for r in h.get("runs", []):
            parts.append(f"<tr><td>{r['phase']}</td><td>{r['size']}</td><td>{_fmt(r.get('rps'))}</td><td>{_fmt(r.get('bytes_per_s'))}</td><td>{_fmt(r.get('mean_ms'))}</td><td>{_fmt(r.get('failed'))}</td></tr>")
        parts.append("</table>")
    parts.append("<p>JSON twin: report.json</p></body></html>")
    return "\n".join(parts)
