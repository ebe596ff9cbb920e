"""A bench run's results as declared structs: the report, each scenario's entry, each phase's result.

The runner builds a report as JSON-shaped data (the load generator's merged result is one);
`as_report` checks it against these structs once, on its way out, and report.py, the CLI and
`load_report` read the typed result. A key a phase does not have (a sweep has no histogram, a loopback phase no
soak) stays UNSET and is left out of the JSON, so report.json keeps the keys it always had and
an older report.json still loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
from msgspec import UNSET, UnsetType

Json = dict[str, Any]


class PhaseResult(msgspec.Struct, kw_only=True):
    """One phase of one scenario (konbini's relays, the same with lines impaired, HAProxy's): a
    measured load (`kiosk_emu.load.merge.merge_results` and the runner's costs), or a sweep."""

    scenario: str | UnsetType = UNSET
    phase: str | UnsetType = UNSET
    mode: str | UnsetType = UNSET  # "open" | "closed"
    rate: float | None | UnsetType = UNSET
    concurrency: int | None | UnsetType = UNSET
    duration_s: float | UnsetType = UNSET
    warmup_s: float | UnsetType = UNSET
    measured_s: float | UnsetType = UNSET
    kiosks: int | UnsetType = UNSET
    arrivals: int | UnsetType = UNSET
    dropped: int | UnsetType = UNSET
    ok: int | UnsetType = UNSET
    refused: dict[str, int] | UnsetType = UNSET
    cancelled: dict[str, int] | UnsetType = UNSET
    misdelivered: int | UnsetType = UNSET
    errors: dict[str, int] | UnsetType = UNSET
    throughput_rps: float | UnsetType = UNSET
    ok_rps: float | UnsetType = UNSET
    bytes_per_s: float | UnsetType = UNSET
    p50_ms: float | None | UnsetType = UNSET
    p90_ms: float | None | UnsetType = UNSET
    p99_ms: float | None | UnsetType = UNSET
    p999_ms: float | None | UnsetType = UNSET
    max_ms: float | None | UnsetType = UNSET
    mean_ms: float | None | UnsetType = UNSET
    latency_count: int | UnsetType = UNSET
    latency_hist: str | UnsetType = UNSET
    hops: dict[str, Json] | UnsetType = UNSET
    latency_split: dict[str, float] | UnsetType = UNSET
    latency_split_total_ms: float | None | UnsetType = UNSET
    timeline: list[Json] | UnsetType = UNSET
    generator: Json | UnsetType = UNSET
    partial: bool | UnsetType = UNSET
    connections_opened: int | UnsetType = UNSET
    misdelivery_reasons: dict[str, int] | UnsetType = UNSET
    by_group: dict[str, Json] | UnsetType = UNSET
    by_credential: dict[str, Json] | UnsetType = UNSET
    trace: list[Any] | UnsetType = UNSET
    costs: Json | UnsetType = UNSET
    servers: Json | UnsetType = UNSET
    haproxy_timers: Json | UnsetType = UNSET
    soak: Json | UnsetType = UNSET
    failover: Json | UnsetType = UNSET
    lines: Json | UnsetType = UNSET
    # a sweep: rising rates until the p99 target fails
    p99_target_ms: float | UnsetType = UNSET
    best_rate: float | None | UnsetType = UNSET
    steps: list[Json] | UnsetType = UNSET

    @property
    def is_sweep(self) -> bool:
        return self.steps is not UNSET


class ScenarioEntry(msgspec.Struct, kw_only=True):
    """One scenario: its phases, and konbini ÷ HAProxy where both ran."""

    what: str = ""
    success_only: bool = False
    konbini: PhaseResult | UnsetType = UNSET
    lines: PhaseResult | UnsetType = UNSET
    haproxy: PhaseResult | UnsetType = UNSET
    ratios: dict[str, float | None] | UnsetType = UNSET

    def phases(self) -> list[tuple[str, PhaseResult]]:
        """(phase name, result) of the phases that ran, in report order."""
        return [(name, r) for name in PHASE_ORDER if isinstance(r := getattr(self, name), PhaseResult)]


PHASE_ORDER = ("konbini", "lines", "haproxy")


class BenchReport(msgspec.Struct, kw_only=True):
    """report.json."""

    created: str = ""
    mode: str = "loopback"
    machine: Json = msgspec.field(default_factory=dict)
    options: Json = msgspec.field(default_factory=dict)
    notes: list[str] = msgspec.field(default_factory=list)
    scenarios: dict[str, ScenarioEntry] = msgspec.field(default_factory=dict)
    partial: bool = False
    cross_check: Json | UnsetType = UNSET
    h2load: Json | UnsetType = UNSET
    split_plot: str | UnsetType = UNSET  # latency-split.png, beside report.json, when a phase has a split


def as_report(report: Json) -> BenchReport:
    """The runner's report, checked against the structs."""
    return msgspec.convert(report, BenchReport)


def load_report(path: Path) -> BenchReport:
    """A report.json, this version's or an older one."""
    return msgspec.json.decode(path.read_bytes(), type=BenchReport)


def ratios(k: Json, h: Json) -> Json:
    """konbini ÷ HAProxy: throughput (>1: konbini faster) and latency (>1: konbini slower)."""

    def div(a, b):
        return round(a / b, 3) if a is not None and b else None

    out = {"throughput": div(k.get("throughput_rps"), h.get("throughput_rps"))}
    if "best_rate" in k:
        out["best_rate"] = div(k.get("best_rate"), h.get("best_rate"))
    else:
        out["p50"] = div(k.get("p50_ms"), h.get("p50_ms"))
        out["p99"] = div(k.get("p99_ms"), h.get("p99_ms"))
    return out
