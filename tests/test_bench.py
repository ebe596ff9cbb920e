"""`konbini bench` end to end on a tiny load: every scenario's report is complete and consistent,
the HAProxy baseline runs on the same addresses, and bad input gets one line and a non-zero exit.

The servers listen on a port of their own (not 8443) so a topology running beside the tests
does not collide with them."""

from __future__ import annotations

import json
import shutil
import socket
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from bench.runner import BenchError, BenchOptions, run_bench
from bench.scenarios import SCENARIOS
from bench.soak import unfinished_issuances
from bench.topology import with_kiosks, with_port
from gateway.business.clock import JST
from gateway.business.ledger import IssuanceRecord, LedgerDB
from gateway.business.session import NOTICE_TTL
from topology.cli.main import main as konbini
from topology.spec.load import DEFAULT_TOPOLOGY, load_topology


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def options(tmp: Path, scenarios: list[str], **kw) -> BenchOptions:
    topo = with_port(load_topology(DEFAULT_TOPOLOGY), free_port())
    base = dict(
        scenarios=scenarios,
        topology=topo,
        state_dir=tmp / "state",
        out_dir=tmp / "out",
        rate=8.0,
        duration_s=0.8,
        warmup_s=0.2,
        kiosks=4,
        workers=1,
        sweep_steps=2,
    )
    base.update(kw)
    return BenchOptions(**base)


# The failover scenario needs a redundant topology and kills processes: tests/test_failover_bench.py.
ON_DEFAULT = [n for n, s in SCENARIOS.items() if not s.failover]


def outcomes_add_up(r: dict) -> bool:
    counted = (
        r["ok"]
        + sum(r["refused"].values())
        + sum(r["cancelled"].values())
        + r["misdelivered"]
        + sum(r["errors"].values())
    )
    return r["arrivals"] == r["dropped"] + counted


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("bench")
    out = run_bench(options(tmp, ON_DEFAULT))
    out["_dir"] = str(tmp / "out")
    return out


def test_report_files_are_written_and_open_without_network(report: dict) -> None:
    out = Path(report["_dir"])
    on_disk = json.loads((out / "report.json").read_text())
    assert set(on_disk["scenarios"]) == set(ON_DEFAULT)
    page = (out / "report.html").read_text()
    assert "<svg" in page
    # the per-process memory bound is about the largest relay process, not the sum over them
    servers = [e["konbini"]["servers"] for e in on_disk["scenarios"].values() if "servers" in e.get("konbini", {})]
    assert servers and all(
        0 < s["relay_max_process_peak_rss_mib"] < s["relay_peak_rss_mib"] for s in servers
    )  # two relay processes
    assert (
        "largest relay process peak RSS MiB" in page
        and "largest relay process peak RSS MiB" in (out / "report.md").read_text()
    )
    assert "<script" not in page and "<link" not in page and 'href="http' not in page and 'src="http' not in page


@pytest.mark.parametrize("name", [n for n in ON_DEFAULT if not SCENARIOS[n].sweep])
def test_each_scenario_report_is_complete_and_consistent(report: dict, name: str) -> None:
    r = report["scenarios"][name]["konbini"]
    for key in (
        "throughput_rps",
        "bytes_per_s",
        "p50_ms",
        "p90_ms",
        "p99_ms",
        "p999_ms",
        "errors",
        "misdelivered",
        "dropped",
        "hops",
        "generator",
    ):
        assert key in r, key
    assert r["arrivals"] > 0 and not r["partial"]
    assert outcomes_add_up(r)
    assert r["misdelivered"] == 0
    assert r["errors"] == {}
    assert r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] <= r["p999_ms"]
    assert "store-router" in r["hops"] and "issuance-center" in r["hops"]
    if SCENARIOS[name].success_only:
        assert r["refused"] == {} and r["cancelled"] == {}
        assert r["ok"] == r["arrivals"] - r["dropped"]
    if SCENARIOS[name].workload.kind == "relay":
        assert r["bytes_per_s"] == pytest.approx(r["throughput_rps"] * SCENARIOS[name].workload.size, rel=0.01)
    else:
        assert "ocsp" in r["hops"] and "municipality" in r["hops"]
    assert r["servers"]["relay_peak_rss_mib"] > 0


def test_mixed_refusals_are_the_expected_ones(report: dict) -> None:
    r = report["scenarios"]["mixed"]["konbini"]
    assert set(r["refused"]) <= {"pin-wrong", "outside-hours", "card-revoked"}


def test_injected_timeouts_cancel_whole_requests_and_never_misdeliver(report: dict) -> None:
    r = report["scenarios"]["issuance-timeouts"]["konbini"]
    assert set(r["cancelled"]) <= {"timeout"}
    assert r["misdelivered"] == 0 and r["errors"] == {}


def test_sweep_reports_steps_and_a_best_rate(report: dict) -> None:
    s = report["scenarios"]["sweep"]["konbini"]
    assert 1 <= len(s["steps"]) <= 2
    assert s["steps"][0]["rate"] == 8.0
    assert s["best_rate"] in (None, *[st["rate"] for st in s["steps"] if st["pass"]])


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy not installed")
def test_haproxy_baseline_runs_on_the_same_addresses_and_gives_ratios(tmp_path: Path) -> None:
    # enough requests that HAProxy's 1-in-10 timer log has some inside the measured window
    rep = run_bench(options(tmp_path, ["relay-small"], baseline="haproxy", rate=60.0, duration_s=1.5))
    entry = rep["scenarios"]["relay-small"]
    k, h = entry["konbini"], entry["haproxy"]
    assert h["errors"] == {} and h["ok"] > 0 and outcomes_add_up(h)
    assert "store-router" not in h["hops"] and "issuance-center" in h["hops"]  # haproxy adds no server-timing
    assert entry["ratios"]["throughput"] == pytest.approx(k["throughput_rps"] / h["throughput_rps"], rel=0.01)
    cfg = (tmp_path / "state" / "haproxy" / "haproxy.cfg").read_text()
    assert "verify required alpn h2" in cfg and "set-header konbini-kiosk" in cfg
    # the cost model: both chains' processes, µs per completed request over the measured window
    for r, role in ((k, "relays"), (h, "baseline")):
        c = r["costs"]
        roles = {p["role"] for p in c["processes"]}
        assert {role, "origin", "generator"} <= roles, roles
        assert c["completed"] == r["ok"] and c["window_s"] > 0
        chain_cpu = sum(
            p["cpu_s"] for p in c["processes"] if p["role"] == role
        )  # whole clock ticks: may be 0 on a tiny load
        assert c["chain_us_per_request"] == pytest.approx(chain_cpu / c["completed"] * 1e6, abs=0.1)
    # HAProxy's hops in the split, from its logged timers; the parts still add up to the mean latency
    assert any(part.endswith("(haproxy)") for part in h["latency_split"]), h["latency_split"]
    assert sum(h["latency_split"].values()) == pytest.approx(h["latency_split_total_ms"], abs=0.05)
    assert (tmp_path / "out" / "latency-split.png").exists() and "Cost model" in (
        tmp_path / "out" / "report.md"
    ).read_text()


def test_kiosks_beyond_the_topology_join_their_store() -> None:
    topo, ids = with_kiosks(load_topology(DEFAULT_TOPOLOGY), 30)
    assert len(ids) == len(set(ids)) == 30
    a1 = topo.node("store-router-a1")
    assert "kiosk-a1-5" in {s for rule in a1.allow for s in rule.sources}
    assert topo.node("kiosk-a1-5").address == "127.18.11.15"


# -- bad input: one line, non-zero exit --------------------------------------------------------


def test_unknown_scenario(capsys) -> None:
    assert konbini(["bench", "relay-huge"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("konbini: unknown scenario 'relay-huge'") and "\n" not in err


@pytest.mark.parametrize("rate", ["0", "-3"])
def test_impossible_rate(capsys, rate: str) -> None:
    assert konbini(["bench", "relay-small", f"--rate={rate}"]) == 2
    assert "impossible rate" in capsys.readouterr().err


def test_haproxy_missing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    with pytest.raises(BenchError, match="haproxy is not installed"):
        run_bench(options(tmp_path, ["relay-small"], baseline="haproxy"))


def test_topology_that_cannot_start(tmp_path: Path) -> None:
    opts = options(tmp_path, ["relay-small"])
    port = opts.topology.node("issuance-center").port
    with socket.socket() as s:  # someone already listens on the issuance center's address
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.18.0.1", port))
        s.listen()
        with pytest.raises(BenchError, match=r"issuance-center: address 127\.18\.0\.1:\d+ is taken"):
            run_bench(opts)


def test_soak_report_samples_every_node_process_and_its_verdict_follows_its_numbers(tmp_path) -> None:
    """The 30-second version of `konbini bench soak --duration 600` (the long one is a benchmark)."""
    report = run_bench(options(tmp_path, ["soak"], duration_s=30.0, warmup_s=2.0, rate=10.0))
    r = report["scenarios"]["soak"]["konbini"]
    soak = r["soak"]
    assert set(soak["processes"]) == {
        "relays-0",
        "relays-1",
        "origin-0",
    }  # one relay process per operator, the center side
    for name, p in soak["processes"].items():
        series = p["series"]
        assert p["samples"] == len(series) >= 30, name  # about one sample every 0.5 s over 30+ s
        assert [x["s"] for x in series] == sorted(x["s"] for x in series)
        assert all(x["rss_mib"] > 0 and x["fds"] > 0 for x in series)
        assert p["rss_growth_pct"] == round(
            (p["rss_mib_at_90pct"] - p["rss_mib_at_20pct"]) / p["rss_mib_at_20pct"] * 100, 2
        )
        assert p["ok"] == (
            p["rss_growth_pct"] < soak["rss_growth_limit_pct"]
            and p["fds_at_90pct"] - p["fds_at_20pct"] <= soak["fd_slack"]
        )
    assert soak["errors"] == sum(r["errors"].values()) == 0
    assert soak["misdelivered"] == r["misdelivered"] == 0
    iss = soak["issuances"]  # the ledger at the end: nothing left unfinished past its bound
    assert iss["past_bound"] == 0 and sum(iss["states"].values()) >= r["ok"]
    assert soak["ok"] == (all(p["ok"] for p in soak["processes"].values()) and iss["past_bound"] == 0)
    assert "descriptors per node process" in (tmp_path / "out" / "report.html").read_text()


def test_the_soak_counts_issuances_left_unfinished_past_their_bound(tmp_path) -> None:
    """What the soak's verdict reads from the ledger: a row `sent` longer than NOTICE_TTL before the
    ledger's latest change is past its bound; a younger one, or a final one, is not."""
    db = LedgerDB(tmp_path / "ledger.sqlite")
    t0 = datetime(2026, 11, 24, 10, 0, tzinfo=JST)
    with db.transaction():
        for iid, at in (("stale", t0), ("young", t0 + timedelta(seconds=NOTICE_TTL)), ("done", t0)):
            db.create_issuance(IssuanceRecord(iid, "s", "k", "a", "131016", "residence-record", 1, 200, "2026-11"), at)
            db.set_state(iid, "sent", at)
        db.record_notice("done", t0 + timedelta(seconds=2 * NOTICE_TTL), 1, 200)
    db.close()
    iss = unfinished_issuances(str(tmp_path / "ledger.sqlite"))
    assert iss["states"] == {"sent": 2, "completed": 1} and iss["unfinished"] == 2 and iss["past_bound"] == 1
    assert unfinished_issuances(str(tmp_path / "none.sqlite")) is None


def test_the_center_side_in_a_process_per_role_issues_and_shows_each_roles_cost(tmp_path: Path) -> None:
    out = run_bench(options(tmp_path, ["issuance"], center_processes="role"))
    r = out["scenarios"]["issuance"]["konbini"]
    assert r["ok"] > 0 and r["misdelivered"] == 0 and not r["errors"]
    origin = {p["name"]: p["hops"] for p in r["costs"]["processes"] if p["role"] == "origin"}
    assert origin == {
        "issuance centers": ["issuance-center"],
        "municipality servers": ["municipality"],
        "ocsp servers": ["ocsp"],
    }
    # CPU comes from /proc in 10 ms ticks: in this short run the municipality or OCSP process may
    # show none; the issuance centers, about 10 ms an issuance, always do
    cpu = {p["name"]: p["cpu_s"] for p in r["costs"]["processes"] if p["role"] == "origin"}
    assert cpu["issuance centers"] > 0 and all(v >= 0 for v in cpu.values())


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy not installed")
def test_center_workers_share_the_center_side_addresses_sessions_and_ledger(tmp_path: Path) -> None:
    """Two workers on the center side's addresses. konbini's relays keep a kiosk's requests on one
    upstream connection; HAProxy pools its connections to the center, so one kiosk's challenge,
    answer and issue reach different workers: the sessions they share must make that work."""
    out = run_bench(
        options(tmp_path, ["issuance"], center_workers=2, baseline="haproxy", rate=60.0, duration_s=2.0, kiosks=16)
    )
    for chain in ("konbini", "haproxy"):
        r = out["scenarios"]["issuance"][chain]
        assert r["ok"] > 0 and r["misdelivered"] == 0 and not r["errors"] and not r["refused"], (chain, r)
        origin = {p["name"] for p in r["costs"]["processes"] if p["role"] == "origin"}
        assert origin == {"center worker 1", "center worker 2"}  # both bound the same addresses and served
    assert out["options"]["center_workers"] == 2
    db = LedgerDB(tmp_path / "state" / "ledger.sqlite")
    try:
        assert db.verify() > 0 and db.count("issuance") >= r["ok"]  # one chain, whichever worker wrote
    finally:
        db.close()


def test_center_workers_must_be_one_or_more_and_alone(tmp_path: Path) -> None:
    with pytest.raises(BenchError, match="--center-workers must be >= 1"):
        run_bench(options(tmp_path, ["issuance"], center_workers=0))
    with pytest.raises(BenchError, match="--center-workers is for loopback mode"):
        run_bench(options(tmp_path, ["issuance"], center_workers=2, center_processes="role"))


def test_center_processes_must_be_one_or_role(tmp_path: Path) -> None:
    with pytest.raises(BenchError, match="--center-processes 'many'"):
        run_bench(options(tmp_path, ["issuance"], center_processes="many"))
