"""Netns mode: the kernel enforces the allow-lists (nftables per namespace), proven by scapy probes.

One netns topology (namespaces `konbini-t<pid>-*`, so a user's `konbini up --netns` is never
touched) runs for the whole module; every test reads the one probe run or adds its own probes.
The module always ends with `konbini down` for its tag, even when a test fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.konbinirun import running_up, start_up
from topology.check import agents, live, observed
from topology.check.probes import plan_probes
from topology.check.scrape import sample, scrape_in_namespace
from topology.launch import netns
from topology.netns.plan import MONITORING_SITE, build_plan
from topology.policy.compiler import reachability
from topology.policy.nft import compile_ruleset

ROOT = os.geteuid() == 0 and shutil.which("ip") and shutil.which("nft")
needs_root = pytest.mark.skipif(
    not ROOT, reason="NETNS TESTS SKIPPED: they need root, iproute2 and nftables (netns mode creates namespaces)"
)
KONBINI = [str(Path(sys.executable).parent / "konbini")]
CLOCK = "2026-11-24T10:00:00+09:00"  # inside every service window of the default topology
NIGHT = "2026-11-25T02:09:00+09:00"  # outside every service window: as a topology up without --clock at night
TAG = f"t{os.getpid()}"


def konbini(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*KONBINI, *args], capture_output=True, text=True, timeout=timeout)


def netns_running(topo, tag: str, state: Path, clock: str = CLOCK):
    """`konbini up --netns --tag TAG` for a module's tests: yields (plan, state), then Ctrl-C and
    `konbini down`, whatever happened."""
    with running_up("--netns", "--tag", tag, "--state", str(state), "--clock", clock, tag=tag, state=state):
        yield build_plan(topo, tag), state


@pytest.fixture(scope="module")
def netns_up(tmp_path_factory, topo):
    yield from netns_running(topo, TAG, tmp_path_factory.mktemp("konbini-netns"))


@pytest.fixture(scope="module")
def probed(netns_up, topo):
    plan, _ = netns_up
    probes = plan_probes(topo, plan)
    answered, sites = agents.run_probes(plan, probes)
    return {r.id: r for r in observed.compare(probes, answered)}, probes, sites


def results(probed, **match):
    by_id, probes, _ = probed
    found = [by_id[p.id] for p in probes if all(getattr(p, k) == v for k, v in match.items())]
    assert found, f"no probe matches {match}"
    return found


# -- pure: the compiled ruleset -------------------------------------------------------------------


def test_ruleset_allows_exactly_the_allow_list(topo) -> None:
    rules = compile_ruleset(topo, "store-a1")
    assert "policy drop" in rules and "table inet konbini" in rules
    accepts = [line.strip() for line in rules.splitlines() if "ct state new" in line and "input" not in line]
    # input: 2 kiosks x (router + controller); output adds the router's connection to the EC router
    assert sum('"nodes.' in a and ".allow[" in a for a in accepts) == 4 + 5
    # admin ports, input and output alike: only from the store console (the controller) to itself and the 2 kiosks
    admin = [a for a in accepts if ".admin[" in a]
    assert len(admin) == 2 * 3 and all(a.startswith("ip saddr 198.18.11.2 ") and "dport 9440" in a for a in admin)
    # the metrics port: only from the monitoring namespace's address, to the 2 servers
    scrape = [a for a in accepts if "dport 9464" in a]
    assert len(scrape) == 2 and all(a.startswith("ip saddr 198.19.0.1 ") for a in scrape)
    assert 'iifname "mon" ip saddr != 198.19.0.1 counter drop' in rules
    assert 'iifname "wifi-a1" ip saddr != 198.18.11.3 counter drop' in rules


def test_monitoring_namespace_opens_only_scrapes_and_accepts_nothing(topo) -> None:
    rules = compile_ruleset(topo, "monitoring")
    new = [line for line in rules.splitlines() if "ct state new" in line]
    assert new and all("ip saddr 198.19.0.1 " in line and "tcp dport 9464" in line for line in new)
    assert len(new) == sum(1 for n in topo.nodes.values() if n.is_server)
    input_chain = rules.split("chain input {")[1].split("}")[0]
    assert "ct state new" not in input_chain


def test_wifi_namespace_accepts_nothing_new(topo) -> None:
    rules = compile_ruleset(topo, "wifi-a1")
    assert "ct state new" not in rules


def test_policy_show_prints_one_site() -> None:
    out = konbini("policy", "show", "--site", "ec-a")
    assert out.returncode == 0
    assert "store-router-a1 -> ec-router-a" in out.stdout and "konbini-ec-a" in out.stdout


def test_unknown_site_is_one_clear_line() -> None:
    out = konbini("policy", "show", "--site", "nowhere")
    assert out.returncode == 2 and out.stderr.startswith("konbini: unknown site 'nowhere'")


def test_not_root_names_the_commands_needing_root(monkeypatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(netns.NetnsError, match="needs root.*konbini down"):
        netns.require_root("`konbini up --netns`")


def test_loopback_policy_check_shows_app_level_refusals(topo, state) -> None:
    app, note = live.app_checks_loopback(topo, state)
    assert {a["check"] for a in app} == {"plaintext", "no-cert", "kiosk-direct"}
    for a in app:
        assert a["refused"], a
        # the servers' own denial counters, when the check could launch the topology itself
        assert note is not None or a["denials_counted"] >= 1, a


@needs_root  # the issuing check goes to a launch in a network namespace of its own
def test_loopback_policy_check_against_a_running_topology_at_night_passes(tmp_path) -> None:
    """`konbini up` at 02:09 JST: `policy check` runs every annex check against it (not "not run"),
    and the issuing one (SEC-KI-2) on a launch at an open hour, saying so."""
    with running_up("--state", str(tmp_path), "--clock", NIGHT):
        out = konbini("policy", "check", "--state", str(tmp_path), "--report", str(tmp_path / "report"), timeout=300)
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert out.returncode == 0, _failing_rows(tmp_path / "report" / "report.json")
    assert "checked against the running topology" in report["annex_note"] and "2026-11-25 02:" in report["annex_note"]
    for req in ("SEC-ST-3/KI-6", "SEC-KI-1", "SEC-KI-2", "SEC-KI-4", "SEC-KI-5", "SEC-KI-7", "SEC-KI-8"):
        assert report["summary"][req]["checks"] > 0 and report["summary"][req]["failed"] == 0, req
    ki2 = [c for c in report["annex"] if c["requirement"] == "SEC-KI-2"]
    assert all("outside service hours" in c["check"] and "private network namespace" in c["check"] for c in ki2)


@needs_root
def test_netns_annex_checks_at_night_issue_at_an_open_hour_and_say_so(tmp_path_factory, topo) -> None:
    """Measured at 02:09 JST on `up --netns`: SEC-KI-2 had "0 issued" (outside-hours)."""
    running = netns_running(topo, f"n{os.getpid()}", tmp_path_factory.mktemp("konbini-night"), NIGHT)
    plan, state = next(running)
    try:
        annex, note = live.annex_checks_netns(topo, plan, state)
    finally:
        running.close()  # Ctrl-C and `konbini down`
    assert annex and all(c["ok"] for c in annex), [c for c in annex if not c["ok"]]
    ki2 = [c for c in annex if c["requirement"] == "SEC-KI-2"]
    assert ki2 and all("outside service hours" in c["check"] for c in ki2)
    assert "2026-11-25 02:" in note


# -- kernel policy, probed -------------------------------------------------------------------------


@needs_root
def test_store_cannot_reach_issuance_center(probed) -> None:
    for src in ("store-router-a1", "kiosk-a1-1", "store-controller-b2"):
        (r,) = results(probed, kind="tcp-pair", src=src, dst="issuance-center")
        assert r.observed == "nothing" and "SEC-SN-3" in r.requirements


@needs_root
def test_issuance_center_cannot_reach_store(probed) -> None:
    for dst in ("store-router-a1", "store-controller-b3"):
        (r,) = results(probed, kind="tcp-pair", src="issuance-center", dst=dst)
        assert r.ok and r.observed == "nothing" and "SEC-EC-2" in r.requirements


@needs_root
def test_wifi_cannot_reach_kiosk(probed) -> None:
    found = results(probed, kind="wifi-kiosk", src="wifi-a1", dst="kiosk-a1-1")
    assert {r.proto for r in found} == {"tcp", "udp", "icmp"}
    assert all(r.observed == "nothing" for r in found)
    assert all(r.ok for r in results(probed, kind="wifi-kiosk"))


@needs_root
def test_kiosk_cannot_reach_dmz_relay_directly(probed) -> None:
    (r,) = results(probed, kind="tcp-pair", src="kiosk-a1-1", dst="dmz-relay-a")
    assert r.observed == "nothing"


@needs_root
def test_spoofed_source_is_dropped(probed) -> None:
    spoofs = results(probed, kind="spoof")
    assert all(r.observed == "nothing" for r in spoofs)
    # the Wi-Fi claiming to be a kiosk, towards the store router that would accept the kiosk
    assert any(r.sent_from == "wifi-a1" and r.src == "kiosk-a1-1" and r.dst == "store-router-a1" for r in spoofs)


@needs_root
def test_every_allowed_line_is_reachable_on_exactly_its_port(probed, topo) -> None:
    allowed = [r for r in results(probed, kind="tcp-pair") if r.expected == "syn-ack"]
    assert len(allowed) == sum(r.allowed for r in reachability(topo))
    assert all(r.observed == "syn-ack" for r in allowed), [r for r in allowed if not r.ok]
    for kind in ("other-port", "udp", "icmp"):
        assert all(r.observed == "nothing" for r in results(probed, kind=kind)), kind
    assert all(r.ok for r in results(probed, kind="tcp-pair"))


@needs_root
def test_no_namespace_has_a_route_out(probed, netns_up) -> None:
    plan, _ = netns_up
    _, _, sites = probed
    assert set(sites) == {*plan.sites, MONITORING_SITE}
    for rows in observed.surroundings_results(plan, sites, 0):
        assert rows.ok, rows
    assert all(r.observed == "nothing" for r in results(probed, kind="outside"))


@needs_root
def test_a_broken_ruleset_is_caught(netns_up, topo) -> None:
    plan, state = netns_up
    ns = plan.namespace("store-a1")
    wifi, router = plan.address("wifi-a1"), plan.address("store-router-a1")
    subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            ns,
            "nft",
            "insert",
            "rule",
            "inet",
            "konbini",
            "input",
            "ip",
            "saddr",
            wifi,
            "ip",
            "daddr",
            router,
            "tcp",
            "dport",
            "8443",
            "accept",
        ],
        check=True,
    )
    try:
        out = konbini("policy", "check", "--netns", "--tag", TAG, "--state", str(state), "--json", "--no-outside-tools")
        assert out.returncode == 1, out.stderr
        report = json.loads(out.stdout)
        assert not report["ok"]
        (diff,) = report["differences"]
        assert (diff["src"], diff["dst"], diff["observed"]) == ("wifi-a1", "store-router-a1", "syn-ack")
        assert "SEC-ST-4" in diff["requirements"]
    finally:  # restore the compiled ruleset, whatever happened
        subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", str(state / "net" / "store-a1.nft")], check=True)


def _failing_rows(report_file: Path) -> str:
    """What a failed policy check report holds against the annex, for the assertion message."""
    report = json.loads(report_file.read_text())
    failing = {
        "summary": {req: row for req, row in report.get("summary", {}).items() if row.get("failed")},
        "annex": [c for c in report.get("annex", []) if not c.get("ok")],
        "evidence": [c for c in report.get("evidence", []) if not c.get("ok")],
        "app": [a for a in report.get("app", []) if not a.get("refused")],
        "differences": report.get("differences", []),
    }
    return json.dumps(failing, indent=1, default=str)[-6000:]


@needs_root
def test_policy_check_cli_passes_and_writes_report(netns_up, tmp_path, topo) -> None:
    _, state = netns_up
    # The SEC-KI-4 check waits out (up to 65 s) a maintenance lockout left by the module's earlier
    # annex run against the same running nodes, and the outside tools take 60-120 s (testssl.sh
    # against seven nodes is CPU-bound on two cores), so the timeout allows for both.
    out = konbini(
        "policy", "check", "--netns", "--tag", TAG, "--state", str(state), "--report", str(tmp_path), timeout=420
    )
    report_file = tmp_path / "report.json"
    assert out.returncode == 0, (
        _failing_rows(report_file) if report_file.exists() else out.stdout[-2000:]
    ) + out.stderr
    report = json.loads(report_file.read_text())
    assert report["ok"] and not report["differences"]
    for req in (
        "SEC-EC-1",
        "SEC-EC-2",
        "SEC-EC-3",
        "SEC-SN-1",
        "SEC-SN-2",
        "SEC-SN-3",
        "SEC-ST-2",
        "SEC-ST-3/KI-6",
        "SEC-ST-4",
        "SEC-KI-1",
        "SEC-KI-2",
        "SEC-KI-4",
        "SEC-KI-5",
        "SEC-KI-7",
        "SEC-KI-8",
    ):
        assert report["summary"][req]["checks"] > 0 and report["summary"][req]["failed"] == 0, req
    assert report["annex"] and all(c["ok"] for c in report["annex"])
    assert (
        "inside konbini-" in report["annex_note"]
    )  # the live checks ran in the store's namespace, not a loopback copy
    assert all(a["refused"] for a in report["app"])
    assert "SEC-ST-4" in (tmp_path / "report.md").read_text()
    # the outside tools' verdicts, next to konbini's own: testssl.sh and s_client for every server kind, nmap
    evidence = report["evidence"]
    assert evidence and all(c["ok"] for c in evidence), [c for c in evidence if not c["ok"]]
    by_tool = {(c["requirement"], c["tool"].split()[0]) for c in evidence}
    assert by_tool == {("SEC-SN-2", "testssl.sh"), ("SEC-SN-2", "openssl"), ("SEC-ST-4", "nmap"), ("SEC-SN-3", "nmap")}
    kinds = {n.kind for n in topo.nodes.values() if n.is_server}
    assert sum(c["tool"].startswith("testssl.sh") for c in evidence) == len(kinds)
    tools = {t for r in report["requirements"] for t in r["tools"]}
    assert {"testssl.sh -p -s (Debian)", "nmap -sT -Pn"} <= tools
    assert "testssl.sh" in (tmp_path / "report.md").read_text()


@needs_root
def test_only_the_monitoring_namespace_reaches_the_metrics_port(probed) -> None:
    store_side = results(probed, kind="metrics-port", src="kiosk-a1-1") + results(
        probed, kind="metrics-port", src="store-router-a1"
    )
    assert store_side and all(r.ok and r.observed == "nothing" for r in store_side)
    scrapes = results(probed, kind="metrics-port", src="monitoring")
    assert len(scrapes) >= 14 and all(r.ok and r.observed == "syn-ack" for r in scrapes)


@needs_root
def test_metrics_scraped_in_netns_move_after_an_issuance(netns_up, topo) -> None:
    plan, state = netns_up
    router = topo.node("store-router-b1")

    def requests() -> float:
        text = scrape_in_namespace(
            plan.monitoring.namespace, topo.source, state, router.id, plan.address(router.id), plan.monitoring.address
        )
        return sample(text, "konbini_requests_total", method="POST")

    before = requests()
    out = konbini(
        "issue", "--netns", "--tag", TAG, "--state", str(state), "--json", "--store", "store-b1", "--clock", CLOCK
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert requests() >= before + 3  # session, auth, issue (and the notice) through this store router


@needs_root
def test_issuance_end_to_end_in_netns(netns_up) -> None:
    _, state = netns_up
    out = konbini(
        "issue", "--netns", "--tag", TAG, "--state", str(state), "--json", "--store", "store-b2", "--clock", CLOCK
    )
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(out.stdout)
    assert result["status"] == "issued" and result["signature_valid"]
    assert [h["node"] for h in result["hops"]][:4] == [
        "issuance-center",
        "dmz-relay-b",
        "ec-router-b",
        "store-router-b2",
    ]


@needs_root
def test_bench_runs_in_netns_mode_and_tears_down(tmp_path, topo) -> None:
    from bench.runner import BenchOptions, run_bench

    tag = f"b{os.getpid()}"
    opts = BenchOptions(
        scenarios=["relay-small", "issuance"],
        topology=topo,
        state_dir=tmp_path / "state",
        out_dir=tmp_path / "out",
        duration_s=1.5,
        warmup_s=0.3,
        kiosks=8,
        netns=True,
        netns_tag=tag,
    )
    try:
        report = run_bench(opts)
    finally:
        konbini("down", "--tag", tag, "--state", str(tmp_path / "state"))
    assert netns.list_namespaces(f"konbini-{tag}-") == []  # run_bench itself tore everything down
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    assert on_disk["mode"] == report["mode"] == "netns" and not report["partial"]
    for name in ("relay-small", "issuance"):
        r = report["scenarios"][name]["konbini"]
        assert r["ok"] > 0 and r["errors"] == {} and r["misdelivered"] == 0 and not r["partial"], (name, r)
        assert "store-router" in r["hops"] and "issuance-center" in r["hops"]
        assert len(r["generator"]["workers"]) >= 2  # kiosks of several stores: one worker per store namespace


@needs_root
def test_up_refuses_existing_namespace_and_leaves_everything_as_it_was(netns_up) -> None:
    plan, state = netns_up
    before = netns.list_namespaces(plan.prefix)
    out = konbini("up", "--netns", "--tag", TAG, "--state", str(state))
    assert out.returncode == 2 and "already exists" in out.stderr and "konbini down" in out.stderr
    assert netns.list_namespaces(plan.prefix) == before


@needs_root
def test_down_cleans_up_after_the_launcher_is_killed(tmp_path) -> None:
    tag = f"k{os.getpid()}"
    proc, _ = start_up("--netns", "--tag", tag, "--state", str(tmp_path), "--clock", CLOCK)
    try:
        proc.kill()  # SIGKILL: no chance to clean up
        proc.wait()
        assert netns.list_namespaces(f"konbini-{tag}-")
    finally:
        out = konbini("down", "--tag", tag, "--state", str(tmp_path), timeout=30)  # a hung down fails here
    assert out.returncode == 0, out.stderr
    assert netns.list_namespaces(f"konbini-{tag}-") == []
    assert not list((tmp_path / "net" / "pids").glob("*.pid"))
    stray = [
        p
        for p in os.listdir("/proc")
        if p.isdigit() and _comm(p) == "konbini-node" and _alive(p) and tag in _cmdline_ns(p)
    ]
    assert stray == []


def _comm(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _alive(pid: str) -> bool:
    try:
        return " Z " not in Path(f"/proc/{pid}/stat").read_text().split(")", 1)[1][:4]
    except OSError:
        return False


def _cmdline_ns(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""
