"""The bench report's pure parts: the cost model and its bottleneck notes, HAProxy's logged
timers, the latency split refined with them (still adding up), the cross-check comparison, and
report.md / latency-split.png written from a report."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import crosscheck
from bench.baselines.haproxy import TIMERS_TAG, hop_timers
from bench.costs import CostProcess, cost_model
from bench.report import write_reports
from bench.results import as_report
from kiosk_emu.latency import with_relay_waits
from topology.spec.load import DEFAULT_TOPOLOGY

RELAYS = CostProcess("relays of operator a", "relays", 1, ("dmz-relay", "ec-router", "store-router"))
STORE = CostProcess("relays a store-router", "relays", 2, ("store-router",))
ORIGIN = CostProcess("center side", "origin", 3, ("issuance-center",))
GEN = CostProcess("generator worker 0", "generator", 4)


def test_cost_per_request_is_cpu_over_completed_requests_and_single_hop_processes_give_hops() -> None:
    m = cost_model(
        [RELAYS, STORE, ORIGIN, GEN],
        {RELAYS.name: 0.5, STORE.name: 0.2, ORIGIN.name: 0.1, GEN.name: 0.2},
        window_s=2.0,
        completed=1000,
        cpus=2,
    )
    by = {p["name"]: p for p in m["processes"]}
    assert by[RELAYS.name]["us_per_request"] == 500.0 and by[RELAYS.name]["cores"] == 0.25
    assert m["per_hop_us"] == {"store-router": 200.0}  # the three-hop process cannot be split
    assert m["chain_us_per_request"] == 700.0 and m["origin_us_per_request"] == 100.0
    assert m["notes"] == []


def test_notes_name_the_generator_the_origin_and_the_machine_when_they_limit_a_phase() -> None:
    m = cost_model(
        [RELAYS, ORIGIN, GEN], {RELAYS.name: 0.2, ORIGIN.name: 1.9, GEN.name: 1.9}, window_s=2.0, completed=100, cpus=2
    )
    text = " ".join(m["notes"])
    assert "load generator is the bottleneck" in text
    assert "origin is the bottleneck" in text and "origin costs more per request than the relay chain" in text
    assert "machine is saturated" in text


def test_haproxy_timers_are_read_per_relay_kind_inside_the_window_only() -> None:
    log = "\n".join(
        [
            f"{TIMERS_TAG} 100.500 store-router-a1 0 0 0 12 13 200",
            f"{TIMERS_TAG} 100.600 ec-router-a 0 1 -1 8 9 200",  # Tc -1: reused connection, counts as 0
            f"{TIMERS_TAG} 100.700 dmz-relay-a 0 0 0 -1 5 503",  # no answer: tells nothing
            f"{TIMERS_TAG} 99.000 store-router-a1 0 0 0 99 99 200",  # before the window
            "[WARNING] something else haproxy said",
        ]
    )
    kinds = {"store-router-a1": "store-router", "ec-router-a": "ec-router", "dmz-relay-a": "dmz-relay"}
    t = hop_timers(log, kinds, 100.0, 101.0)
    assert set(t) == {"store-router", "ec-router"}
    assert t["store-router"].logged == 1 and t["store-router"].up_ms == 12
    assert t["ec-router"].up_ms == 9


def test_the_split_refined_with_relay_waits_still_adds_up_to_the_same_total() -> None:
    split = {
        "line kiosk→issuance-center": 18.0,
        "issuance-center queue": 1.5,
        "issuance-center own": 0.5,
        "body": 0.2,
        "generator wait": 0.1,
    }
    out = with_relay_waits(
        split, "issuance-center", [("store-router", 12.0), ("ec-router", 8.0), ("dmz-relay", 5.0)], "haproxy"
    )
    assert sum(out.values()) == pytest.approx(sum(split.values()))
    assert out["line kiosk→store-router + store-router (haproxy)"] == 8.0  # ttfb 20 - 12
    assert out["line store-router→ec-router + ec-router (haproxy)"] == 4.0
    assert out["line dmz-relay→issuance-center"] == 3.0  # 5 - the origin's 2
    assert "line kiosk→issuance-center" not in out


@pytest.mark.skipif(shutil.which("go") is None, reason="go not installed (make setup installs golang-go)")
def test_the_cross_check_client_builds_into_a_relative_state_folder(tmp_path, monkeypatch) -> None:
    # `konbini bench --cross-check` with the default --state (.konbini-bench, relative) failed:
    # "go: GOPATH entry is relative; must be absolute path"
    monkeypatch.chdir(tmp_path)
    binary = crosscheck.build(Path(".konbini-bench/tools"))
    assert binary.is_absolute() and binary.exists()
    assert crosscheck.build(Path(".konbini-bench/tools")) == binary  # built once, then reused


def test_cross_check_ratios_agree_within_a_quarter_and_a_missing_one_is_said() -> None:
    assert crosscheck.compare(0.30, 0.35)["agree"] is True
    assert crosscheck.compare(0.20, 0.35)["agree"] is False
    assert crosscheck.compare(None, 0.35)["agree"] is None
    assert (
        crosscheck.parse('noise\n{"ok": 5, "fail": 0, "rps": 2.5, "MBps": 0, "p50_ms": 1, "p99_ms": 2}\n')["rps"] == 2.5
    )
    with pytest.raises(crosscheck.CrossCheckError):
        crosscheck.parse("go: panic")


def test_report_md_and_the_stacked_split_png_are_written(tmp_path) -> None:
    phase = {
        "throughput_rps": 10.0,
        "p50_ms": 5.0,
        "p99_ms": 9.0,
        "latency_split": {"line kiosk→store-router": 3.0, "body": 1.0},
        "latency_split_total_ms": 4.0,
        "costs": cost_model([RELAYS, ORIGIN, GEN], {RELAYS.name: 0.1, ORIGIN.name: 0.3, GEN.name: 0.1}, 1.0, 100, 2),
    }
    report = {
        "scenarios": {"relay-small": {"konbini": phase, "haproxy": dict(phase), "ratios": {"throughput": 0.5}}},
        "cross_check": {
            "client": "h2mtls_load",
            "duration_s": 1.0,
            "scenarios": {
                "relay-small": {
                    "concurrency": 8,
                    "konbini": {"rps": 1.0},
                    "haproxy": {"rps": 4.0},
                    "ratios": crosscheck.compare(0.5, 0.25),
                }
            },
        },
    }
    write_reports(as_report(report), tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert (tmp_path / "latency-split.png").read_bytes()[:4] == b"\x89PNG"
    assert "| line kiosk→store-router | 3.0 | 3.0 |" in md
    assert "origin costs more per request" in md
    assert "the ratios disagree (0.5 with konbini's generator, 0.25 with the compiled client)" in md


@pytest.mark.skipif(os.geteuid() != 0, reason="NEEDS ROOT: line impairments are kernel rules (nft, NFQUEUE)")
def test_issue_up_applies_the_topology_files_line_impairments(tmp_path) -> None:
    """`konbini issue --up` launches the topology as `konbini up` does, impairments included: a
    30 ms closed line costs an issuance at least one round trip (60 ms) per request it carries (4)."""
    text = DEFAULT_TOPOLOGY.read_text().replace("kind: closed-line}", "kind: closed-line, impair: {delay: 30ms}}")
    topo = tmp_path / "slow.yaml"
    topo.write_text(text)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "topology.cli",
            "issue",
            "--up",
            "--json",
            "--topology",
            str(topo),
            "--state",
            str(tmp_path / "s"),
            "--clock",
            "2026-11-25T10:00:00+09:00",
        ],  # in service hours
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "lines impaired" in done.stderr
    assert json.loads(done.stdout)["latency_ms"] >= 4 * 2 * 30
