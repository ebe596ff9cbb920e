"""`konbini bench national-peak` on a national-shaped file cut down to 8 stores an operator:
every phase runs open loop over the whole fleet, issues, and reports per operator with 0
misdelivered; the rates follow the national figure and the day profile."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.national import DAY_PROFILE, ISSUANCES_PER_YEAR, PEAK_HOUR, hour_rate, peak_rate
from kiosk_emu.load.arrivals import piecewise_arrivals

ROOT = Path(__file__).resolve().parent.parent
NATIONAL = ROOT / "topology" / "national.yaml"


def mini_national(path: Path) -> Path:
    """topology/national.yaml with every store range cut to 8 and 40 municipalities (30 taking part)."""
    text = NATIONAL.read_text()
    text = re.sub(
        r'range: "([a-f])\[(0+)1-\d+\]"', lambda m: f'range: "{m[1]}[{m[2]}1-{"0" * (len(m[2]) - 1)}8]"', text
    )
    text = text.replace("count: 1741", "count: 40").replace("participating: 1300", "participating: 30")
    path.write_text(text.replace("name: national", "name: mini-national"))
    return path


def test_the_rates_follow_the_national_figure_and_peak_in_the_evening() -> None:
    per_day = sum(hour_rate(h) * 3600 for h in range(24))
    assert per_day == pytest.approx(ISSUANCES_PER_YEAR / 365)
    assert 17 <= PEAK_HOUR <= 19 and peak_rate() == max(hour_rate(h) for h in range(24))
    assert hour_rate(3) == 0 and hour_rate(23) == 0  # the service is closed at night
    assert 2.0 < peak_rate() < 3.0 and set(DAY_PROFILE) == set(range(6, 23))


def test_piecewise_arrivals_follow_each_segment_rate() -> None:
    rng = random.Random(3)
    times = list(piecewise_arrivals([(100.0, 5.0), (100.0, 0.0), (100.0, 20.0)], 0.0, rng))
    first = sum(t < 100 for t in times)
    quiet = sum(100 <= t < 200 for t in times)
    last = sum(t >= 200 for t in times)
    assert quiet == 0 and 400 < first < 600 and 1800 < last < 2200 and max(times) < 300


def test_national_peak_bench_issues_over_the_whole_fleet_with_nothing_misdelivered(tmp_path) -> None:
    topo = mini_national(tmp_path / "mini.yaml")
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "topology.cli",
        "bench",
        "national-peak",
        "--topology",
        str(topo),
        "--state",
        str(tmp_path / "state"),
        "--out",
        str(out),
        "--processes",
        "2",
        "--duration",
        "2",
        "--warmup",
        "0.5",
        "--levels",
        "1,10",
        "--hour-s",
        "0.2",
        "--no-progress",
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "national-peak.json").read_text())
    assert report["stores"] == 48 and report["operators"] == ["a", "b", "c", "d", "e", "f"]
    assert [p["name"] for p in report["phases"]] == ["day", "peak x1", "peak x10"]
    assert report["phases"][2]["offered_rps"] == pytest.approx(10 * peak_rate(), rel=1e-3)
    total = 0
    for phase in report["phases"]:
        assert phase["misdelivered"] == 0 and not phase["errors"], phase
        assert sum(g["issued"] for g in phase["by_group"].values()) == phase["ok"]
        assert all(g["misdelivered"] == 0 for g in phase["by_group"].values())
        total += phase["ok"]
    x10 = report["phases"][2]
    assert x10["ok"] >= 20 and len(x10["by_group"]) >= 4  # ~47 arrivals over 48 stores of six operators
    assert x10["connections_opened"] > 0 and x10["p99_ms"] >= x10["p50_ms"] > 0
    day = report["phases"][0]
    assert [h["hour"] for h in day["per_hour"]] == sorted(DAY_PROFILE)
    md = (out / "national-peak.md").read_text()
    assert "Per operator" in md and "peak x10" in md and total > 0
