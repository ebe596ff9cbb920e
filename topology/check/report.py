"""The policy check's report: every security-annex requirement with the checks that are evidence for
it and the tools that observed them, as Markdown, HTML and JSON.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from topology.check.observed import Result

# DESIGN §2, every security-annex ID: the rule in a few words, as the report prints it
REQUIREMENTS = {
    "SEC-EC-1": "EC center router dedicated to the service; other routers refused",
    "SEC-EC-2": "DMZ: only DMZ<->issuance center and DMZ<->store; issuance center<->store forbidden",
    "SEC-EC-3": "a DMZ relay mediates between the store network and the issuance center",
    "SEC-SN-1": "closed dedicated lines, no third-party access",
    "SEC-SN-2": "certificate data encrypted in transit (TLS 1.3, mutual authentication)",
    "SEC-SN-3": "every store connection goes through the EC center",
    "SEC-ST-2": "the store router restricts in-store traffic at protocol level",
    "SEC-ST-3/KI-6": "store staff cannot operate store-controller / kiosk programs",
    "SEC-ST-4": "in-store wireless cannot reach kiosks",
    "SEC-KI-1": "issuance requires the card's authentication (signed challenge after PIN)",
    "SEC-KI-2": "certificate data erased from the kiosk after printing, verifiably",
    "SEC-KI-4": "only maintenance staff reach the kiosk system (password, rate-limited)",
    "SEC-KI-5": "the kiosk's issuance log, without personal data",
    "SEC-KI-7": "kiosk faults notified to the store register and the maintenance center",
    "SEC-KI-8": "the store controller reports a silent kiosk within a bound",
}
OUT_OF_SCOPE = {
    "SEC-ST-1, SEC-KI-3 and the annex's other physical/organisational items": "locks, cameras, ISMS certification, franchise rules: DESIGN §2 leaves them out; no network "
    "emulation can show them, so they are audited on site, not by konbini",
}
NETNS_ONLY = ("SEC-EC-2 kernel filtering", "SEC-SN-1 no route out / spoofing", "SEC-ST-4 Wi-Fi blocked in the kernel")


def _tool(r: Result) -> str:
    if r.kind in ("interfaces", "default-route", "route-out"):
        return "ip link/route in each namespace"
    return "scapy probes (topology/check/probe.py)"


def requirement_summary(
    results: list[Result], app: list[dict], annex: Iterable[dict]
) -> tuple[dict[str, dict], dict[str, set[str]]]:
    """Per requirement ID: how many checks were evidence for it and how many failed; and the tools
    that observed it. `annex`: the annex checks and any outside tools' evidence, shaped alike."""
    summary: dict[str, dict] = {}
    tools: dict[str, set[str]] = {}

    def count(req: str, failed: bool, tool: str) -> None:
        s = summary.setdefault(req, {"checks": 0, "failed": 0})
        s["checks"] += 1
        s["failed"] += failed
        tools.setdefault(req, set()).add(tool)

    for r in results:
        for req in r.requirements:
            count(req, not r.ok, _tool(r))
    for a in app:
        for req in a["requirements"]:
            count(req, not a["refused"], "konbini app check (topology/check/app.py)")
    for c in annex:
        count(c["requirement"], not c["ok"], c["tool"])
    return summary, tools


def requirements(summary: dict[str, dict], tools: dict[str, set[str]], netns: bool) -> list[dict[str, Any]]:
    """Every requirement of the annex, in REQUIREMENTS' order, with its status."""
    out = []
    for req, rule in REQUIREMENTS.items():
        s = summary.get(req, {"checks": 0, "failed": 0})
        status = (
            "FAIL" if s["failed"] else ("pass" if s["checks"] else ("needs --netns" if not netns else "NOT CHECKED"))
        )
        out.append({"id": req, "rule": rule, **s, "status": status, "tools": sorted(tools.get(req, ()))})
    return out


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(report: dict) -> str:
    lines = [
        f"# konbini policy check: {report['topology']} ({report['mode']})",
        "",
        f"**{'PASS' if report['ok'] else 'FAIL'}** — {report['probes']} kernel-level probes, "
        f"{len(report['differences'])} differences, {len(report['app'])} app-level checks, {report['elapsed_s']} s.",
        "",
        "## Every requirement of the security annex (DESIGN §2)",
        "",
        "| requirement | rule | checks | failed | status | observed by |",
        "|---|---|---:|---:|---|---|",
        *(
            f"| {r['id']} | {r['rule']} | {r['checks']} | {r['failed']} | {r['status']} | {'; '.join(r['tools'])} |"
            for r in report.get("requirements", ())
        ),
        "",
        "Out of scope: " + "; ".join(f"{k}: {v}" for k, v in report.get("out_of_scope", {}).items()) + ".",
        "",
        f"Compiled policy against the expected matrix (allow-lists and admin surfaces, every principal): "
        f"{report['matrix']['pairs']} pairs, {len(report['matrix']['differences'])} differences.",
        "",
        *_markdown_evidence(report),
    ]
    return "\n".join(lines + _markdown_notes(report)) + "\n"


def _markdown_evidence(report: dict) -> list[str]:
    return [
        "## Kiosk and store checks (live, against the running topology)",
        "",
        "| requirement | check | expected | observed | ok | tool |",
        "|---|---|---|---|---|---|",
        *(
            f"| {c['requirement']} | {_cell(c['check'])} | {_cell(c['expected'])} | {_cell(c['observed'])} | "
            f"{'yes' if c['ok'] else '**NO**'} | {c['tool']} |"
            for c in [*report.get("annex", ()), *report.get("evidence", ())]
        ),
        "",
        "## App level",
        "",
        "| check | from | to | refused | detail | requirements |",
        "|---|---|---|---|---|---|",
        *(
            f"| {a['check']} | {a.get('src', '-')} | {a.get('dst', '-')} | {'yes' if a['refused'] else '**NO**'} | {a['detail']} | {', '.join(a['requirements'])} |"
            for a in report["app"]
        ),
    ]


def _markdown_notes(report: dict) -> list[str]:
    lines: list[str] = []
    if report.get("app_note"):
        lines += ["", f"Note: {report['app_note']}"]
    if report.get("annex_note"):
        lines += ["", f"Note: {report['annex_note']}"]
    if report["needs_netns"]:
        lines += ["", "## Needs `--netns` (root)", "", *(f"- {n}" for n in report["needs_netns"])]
    if report.get("rule_origins"):
        lines += [
            "",
            "## Allow entries and the template lines they came from",
            "",
            "| allow entry | written at |",
            "|---|---|",
        ]
        lines += [f"| {rule} | {origin} |" for rule, origin in report["rule_origins"].items()]
    if report["differences"]:
        lines += [
            "",
            "## Differences",
            "",
            "| kind | from site | src | dst | proto/port | expected | observed | requirements |",
            "|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {d['kind']} | {d['sent_from']} | {d['src']} | {d['dst']} | {d['proto']}/{d['port']} | {d['expected']} | {d['observed']} | {', '.join(d['requirements'])} |"
            for d in report["differences"]
        ]
    return lines


def _table(head: tuple[str, ...], rows: list[tuple]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{th}</tr>{trs}</table>"


def render_html(report: dict) -> str:
    """The same report as one self-contained HTML page (no scripts, no outside resources)."""
    esc = html.escape

    verdict = "PASS" if report["ok"] else "FAIL"
    parts = [
        "<!doctype html><meta charset='utf-8'>",
        f"<title>konbini policy check: {esc(report['topology'])}</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #999;padding:3px 6px;font-size:90%;vertical-align:top}"
        ".FAIL,.NO{color:#b00;font-weight:bold}</style>",
        f"<h1>konbini policy check: {esc(report['topology'])} ({esc(report['mode'])})</h1>",
        f"<p class='{verdict}'>{verdict}: {report['probes']} kernel-level probes, {len(report['differences'])} differences, "
        f"{len(report['app'])} app-level checks, {len(report.get('annex', ()))} kiosk/store checks, {report['elapsed_s']} s.</p>",
        "<h2>Every requirement of the security annex (DESIGN §2)</h2>",
        _table(
            ("requirement", "rule", "checks", "failed", "status", "observed by"),
            [
                (r["id"], r["rule"], r["checks"], r["failed"], r["status"], "; ".join(r["tools"]))
                for r in report.get("requirements", ())
            ],
        ),
        "<h3>Out of scope</h3><ul>"
        + "".join(f"<li><b>{esc(k)}</b>: {esc(v)}</li>" for k, v in report.get("out_of_scope", {}).items())
        + "</ul>",
        *_html_evidence(report),
    ]
    return "\n".join(parts + _html_notes(report)) + "\n"


def _html_evidence(report: dict) -> list[str]:
    return [
        "<h2>Kiosk and store checks</h2>",
        _table(
            ("requirement", "check", "expected", "observed", "ok", "tool"),
            [
                (c["requirement"], c["check"], c["expected"], c["observed"], "yes" if c["ok"] else "NO", c["tool"])
                for c in [*report.get("annex", ()), *report.get("evidence", ())]
            ],
        ),
        "<h2>App level</h2>",
        _table(
            ("check", "from", "to", "refused", "detail", "requirements"),
            [
                (
                    a["check"],
                    a.get("src", "-"),
                    a.get("dst", "-"),
                    "yes" if a["refused"] else "NO",
                    a["detail"],
                    ", ".join(a["requirements"]),
                )
                for a in report["app"]
            ],
        ),
    ]


def _html_notes(report: dict) -> list[str]:
    parts: list[str] = []
    if report.get("rule_origins"):
        parts += [
            "<h2>Allow entries and the template lines they came from</h2>",
            _table(("allow entry", "written at"), list(report["rule_origins"].items())),
        ]
    if report["differences"]:
        parts += [
            "<h2>Differences</h2>",
            _table(
                ("kind", "from site", "src", "dst", "proto/port", "expected", "observed"),
                [
                    (
                        d["kind"],
                        d["sent_from"],
                        d["src"],
                        d["dst"],
                        f"{d['proto']}/{d['port']}",
                        d["expected"],
                        d["observed"],
                    )
                    for d in report["differences"]
                ],
            ),
        ]
    return parts


def write_report(report: dict, directory: Path) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    md, js = directory / "report.md", directory / "report.json"
    md.write_text(render_markdown(report))
    (directory / "report.html").write_text(render_html(report))
    js.write_text(json.dumps(report, indent=1))
    return md, js
