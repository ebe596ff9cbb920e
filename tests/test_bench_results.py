"""report.json through the result structs (bench/results.py): an older report still loads, and a
report written from the structs keeps every key the older one had."""

from __future__ import annotations

import json
from pathlib import Path

from msgspec import UNSET

from bench.report import write_reports
from bench.results import BenchReport, PhaseResult, as_report, load_report, ratios

# Written by `run_bench` (tests/test_bench.py) before the results were structs; it has no
# `by_credential`, which later phases carry.
OLDER = Path(__file__).parent / "data" / "bench" / "report-older.json"


def _keys(value, at: str = "") -> set[str]:
    """Every key path in a JSON document (list items share their list's path)."""
    if isinstance(value, dict):
        return {p for k, v in value.items() for p in {f"{at}/{k}"} | _keys(v, f"{at}/{k}")}
    if isinstance(value, list):
        return {p for v in value for p in _keys(v, f"{at}[]")}
    return set()


def test_an_older_report_loads_into_the_structs_with_its_figures():
    raw = json.loads(OLDER.read_text())
    report = load_report(OLDER)
    assert isinstance(report, BenchReport) and list(report.scenarios) == list(raw["scenarios"])
    r = report.scenarios["relay-small"].konbini
    assert isinstance(r, PhaseResult) and not r.is_sweep
    assert (r.ok, r.p99_ms, r.errors) == (
        raw["scenarios"]["relay-small"]["konbini"]["ok"],
        raw["scenarios"]["relay-small"]["konbini"]["p99_ms"],
        {},
    )
    assert r.by_credential is UNSET  # not in that version's results
    assert report.scenarios["sweep"].konbini.is_sweep
    assert [p for p, _ in report.scenarios["relay-small"].phases()] == ["konbini"]


def test_a_report_written_from_the_structs_keeps_the_older_reports_keys(tmp_path):
    write_reports(load_report(OLDER), tmp_path)
    assert _keys(json.loads((tmp_path / "report.json").read_text())) == _keys(json.loads(OLDER.read_text()))
    assert "relay-small" in (tmp_path / "report.md").read_text()


def test_the_runners_report_converts_with_the_keys_a_phase_has_and_no_others():
    phase = {"scenario": "s", "ok": 3, "p50_ms": None, "errors": {}, "refused": {"pin-wrong": 1}}
    report = as_report({"created": "now", "scenarios": {"s": {"what": "w", "konbini": phase}}})
    r = report.scenarios["s"].konbini
    assert (r.ok, r.p50_ms, r.refused, r.soak) == (3, None, {"pin-wrong": 1}, UNSET)
    assert report.scenarios["s"].haproxy is UNSET


def test_ratios_of_a_sweep_compare_best_rates_and_of_a_load_throughput_and_latency():
    assert ratios({"throughput_rps": 5.0, "best_rate": 10.0}, {"throughput_rps": 10.0, "best_rate": 40.0}) == {
        "throughput": 0.5,
        "best_rate": 0.25,
    }
    assert ratios({"throughput_rps": 5.0, "p50_ms": 2.0, "p99_ms": None}, {"throughput_rps": 10.0, "p50_ms": 1.0}) == {
        "throughput": 0.5,
        "p50": 2.0,
        "p99": None,
    }
