"""Faults injected into a running topology (issue 28 item 18): a dead node process is reported
and restarted under `up --restart`, and `konbini node kill|stop|start|restart NODE` acts on the
process serving one node, in loopback mode (`up --processes N`) and in netns mode (root), while
issuance fails over to the surviving relay and recovers. Also `up`'s node table (item 16) and
its refusal of a clock running backwards (item 15)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from io import StringIO
from pathlib import Path

import pytest
from rich.console import Console

from topology.cli.render import show_nodes
from topology.launch import spread
from topology.launch.supervisor import RestartPolicy
from topology.spec.load import load_topology

ROOT = Path(__file__).resolve().parent.parent
REDUNDANT = str(ROOT / "topology" / "redundant.yaml")  # an operator with two DMZ relays
IN_HOURS = "2026-11-25T10:00:00+09:00"
STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"  # every event line starts with the time


def konbini(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "topology.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def _wait_for(path: Path, pattern: str, proc: subprocess.Popen, timeout: float = 90.0) -> str:
    """The launcher's output once `pattern` (a regex) appears in it; polled, bounded."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = path.read_text() if path.exists() else ""
        if re.search(pattern, out):
            return out
        assert proc.poll() is None, out
        time.sleep(0.1)
    raise AssertionError(f"{pattern!r} not seen in {timeout} s: {path.read_text()}")


def _up(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen, Path, Path]:
    state, log = tmp_path / "s", tmp_path / "up.log"
    with log.open("w") as out:
        # 5 processes: the DMZ relays, the EC router and the center side each in a process of its
        # own (with a store or a municipality), so a relay's process can die while the center lives
        up = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "topology.cli",
                "up",
                REDUNDANT,
                "--processes",
                "5",
                "--state",
                str(state),
                "--clock",
                IN_HOURS,
                *extra,
            ],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    _wait_for(log, "Ctrl-C stops", up)
    return up, state, log


def _down(up: subprocess.Popen) -> None:
    if up.poll() is None:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(timeout=30)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait()


def _status(state: Path, *mode: str) -> dict:
    p = konbini("node", "list", "--topology", REDUNDANT, "--state", str(state), "--json", *mode)
    assert p.returncode == 0, p.stdout + p.stderr
    return {proc["process"]: proc for proc in json.loads(p.stdout)["processes"]}


def _serving(status: dict, node: str) -> dict:
    return next(p for p in status.values() if node in p["nodes"])


def _store_beside(status: dict, node: str) -> str:
    """A store of redundant.yaml whose router another process serves than `node`'s (which
    process serves which store follows the partition by listeners, not the store's name)."""
    down = _serving(status, node)["nodes"]
    return next(f"store-a{i}" for i in range(1, 5) if f"store-router-a{i}" not in down)


def _issue(state: Path, *extra: str) -> dict:
    p = konbini("issue", "--topology", REDUNDANT, "--state", str(state), "--json", "--clock", IN_HOURS, *extra)
    assert p.returncode == 0, p.stdout + p.stderr
    out = json.loads(p.stdout)
    assert out["status"] == "issued" and out["signature_valid"] is True, out
    return out


# -- the restart policy (pure) ------------------------------------------------------------------


def test_on_failure_restarts_at_once_then_backs_off_to_a_cap():
    policy = RestartPolicy("on-failure", max_delay_s=30.0)
    assert [policy.delay(n) for n in range(1, 9)] == [0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


def test_restart_no_never_restarts():
    assert all(RestartPolicy("no").delay(n) is None for n in range(1, 5))


# -- what `up` prints -------------------------------------------------------------------------------


def test_up_prints_a_table_that_fits_80_columns_and_names_each_nodes_process():
    topo = load_topology(REDUNDANT)
    parts = spread.partition(topo, 3)
    out = Console(file=StringIO(), width=80)
    show_nodes(
        out,
        topo,
        "konbini topology 'redundant' (loopback, 3 processes)",
        set(),
        processes=[(f"process-{i}", 4000 + i, ids) for i, ids in enumerate(parts)],
    )
    text = out.file.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert re.search(r"^node +kind +site +address +process *$", text, re.M), text
    for i, ids in enumerate(parts):
        for node in ids:  # one row each, whole: the id, its address and its process on one line
            n = topo.nodes[node]
            assert re.search(rf"^{node} +{n.kind} .*{re.escape(n.address)}(:\d+)? +process-{i} *$", text, re.M), node
    assert "process-0 4000" in text  # and the pid of each


def test_one_process_up_prints_a_table_of_whole_rows_in_80_columns(topo):
    out = Console(file=StringIO(), width=80)  # piped: rich's default width
    show_nodes(out, topo, "konbini topology 'default' (loopback)", {n.id for n in topo.nodes.values() if n.is_server})
    text = out.file.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80
    for n in topo.nodes.values():
        ready = "listening" if n.is_server else "client"
        assert re.search(rf"^{n.id} +{n.kind} +{n.site} +{re.escape(n.address)}(:\d+)? +{ready} *$", text, re.M), n.id


def test_past_200_nodes_up_counts_each_kind_and_lists_the_processes(tmp_path):
    from tests.test_expand import SMALL

    big = SMALL.replace("127.64.0.0/28", "127.64.0.0/22").replace('range: "s[01-02]"', 'range: "s[01-40]"')
    (tmp_path / "big.yaml").write_text(big)
    topo = load_topology(tmp_path / "big.yaml")
    assert len(topo.nodes) > 200
    parts = spread.partition(topo, 2)
    out = Console(file=StringIO(), width=80)
    show_nodes(
        out,
        topo,
        "big",
        {n.id for n in topo.nodes.values() if n.is_server},
        processes=[(f"process-{i}", 4000 + i, ids) for i, ids in enumerate(parts)],
    )
    text = out.file.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert re.search(r"^kiosk +80 +0 *$", text, re.M), text
    for i, ids in enumerate(parts):
        assert re.search(rf"^process-{i} +{4000 + i} +{len(ids)} +{ids[0]} +{ids[-1]} *$", text, re.M), text


def test_up_refuses_a_clock_running_backwards():
    p = konbini("up", "--clock-speed", "-5", timeout=60)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.startswith("konbini: --clock-speed must be above 0"), p.stderr


# -- loopback: up --processes N -------------------------------------------------------------------


def test_a_killed_relay_process_is_reported_restarted_and_issuance_fails_over_and_recovers(tmp_path):
    up, state, log = _up(tmp_path)
    try:
        first = _serving(_status(state), "dmz-relay-a1")
        p = konbini("node", "kill", "dmz-relay-a1", "--topology", REDUNDANT, "--state", str(state))
        assert p.returncode == 0, p.stdout + p.stderr
        assert re.match(rf"{STAMP} {first['process']} .*exited \(killed by SIGKILL\)", p.stdout), p.stdout
        text = _wait_for(log, rf"{STAMP} {first['process']} .*up again: pid \d+", up)
        assert "restarting now (--restart on-failure" in text
        again = _serving(_status(state), "dmz-relay-a1")
        assert again["state"] == "up" and again["pid"] != first["pid"] and again["restarts"] == 1

        p = konbini("node", "stop", "dmz-relay-a1", "--topology", REDUNDANT, "--state", str(state))
        assert p.returncode == 0 and "stays down until `konbini node start`" in p.stdout, p.stdout + p.stderr
        assert _serving(_status(state), "dmz-relay-a1")["state"] == "stopped"
        # a store outside the stopped process: its issuance goes through the other relay
        beside = _store_beside(_status(state), "dmz-relay-a1")
        assert _serving(_status(state), beside.replace("store-", "store-router-"))["state"] == "up"
        hops = {h["node"] for h in _issue(state, "--store", beside)["hops"]}
        assert "dmz-relay-a2" in hops and "dmz-relay-a1" not in hops

        p = konbini("node", "start", "dmz-relay-a1", "--topology", REDUNDANT, "--state", str(state))
        assert p.returncode == 0 and "up again" in p.stdout, p.stdout + p.stderr
        _issue(state, "--store", "store-a1")  # and through the restarted relay's side again
        p = konbini("node", "start", "ec-router-a", "--topology", REDUNDANT, "--state", str(state))
        assert p.returncode == 1 and "already up" in p.stdout, p.stdout + p.stderr
        p = konbini("node", "stop", "kiosk-a1-9", "--topology", REDUNDANT, "--state", str(state))
        assert p.returncode == 2 and p.stderr.startswith("konbini: 'kiosk-a1-9' is served by no process"), p.stderr
        events = (state / "processes" / "events.log").read_text().splitlines()
        assert events and all(re.match(STAMP, line) for line in events)
        assert any("`konbini node stop dmz-relay-a1`" in line for line in events)
    finally:
        _down(up)
    assert "stopped; every node shut down." in log.read_text()


def test_a_process_that_dies_unasked_is_restarted_and_the_rest_keep_serving(tmp_path):
    up, state, log = _up(tmp_path)
    try:
        before = _status(state)
        victim = _serving(before, "dmz-relay-a1")
        os.kill(victim["pid"], signal.SIGKILL)  # from outside konbini, as the OOM killer would
        _wait_for(log, rf"{victim['process']} .*up again", up)
        after = _status(state)
        assert all(after[name]["pid"] == p["pid"] for name, p in before.items() if name != victim["process"])
        _issue(state, "--store", "store-a1")
    finally:
        _down(up)


def test_restart_no_leaves_a_dead_process_down_and_the_others_serving(tmp_path):
    up, state, log = _up(tmp_path, "--restart", "no")
    try:
        victim = _serving(_status(state), "dmz-relay-a1")
        os.kill(victim["pid"], signal.SIGKILL)
        _wait_for(log, rf"{victim['process']} .*stays down \(--restart no\)", up)
        assert _serving(_status(state), "dmz-relay-a1")["state"] == "down"
        hops = {h["node"] for h in _issue(state, "--store", _store_beside(_status(state), "dmz-relay-a1"))["hops"]}
        assert "dmz-relay-a2" in hops
        p = konbini("node", "start", "dmz-relay-a1", "--topology", REDUNDANT, "--state", str(state))
        assert p.returncode == 0 and "up again" in p.stdout, p.stdout + p.stderr
    finally:
        _down(up)


def test_node_without_a_running_topology_says_how_to_start_one(tmp_path):
    p = konbini("node", "kill", "dmz-relay-a1", "--topology", REDUNDANT, "--state", str(tmp_path))
    assert p.returncode == 2 and p.stderr.startswith("konbini: no topology with node processes runs"), p.stderr
    assert "konbini up --processes N" in p.stderr and "Traceback" not in p.stderr


# -- netns mode (root) -------------------------------------------------------------------------------

NETNS = os.geteuid() == 0 and shutil.which("ip") and shutil.which("nft")


@pytest.mark.skipif(not NETNS, reason="NETNS TEST SKIPPED: needs root, iproute2 and nftables")
def test_in_netns_mode_a_killed_relay_restarts_and_a_stopped_one_fails_over(tmp_path):
    tag, state, log = f"faults{os.getpid()}", tmp_path / "s", tmp_path / "up.log"
    with log.open("w") as out:
        up = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "topology.cli",
                "up",
                REDUNDANT,
                "--netns",
                "--tag",
                tag,
                "--state",
                str(state),
                "--clock",
                IN_HOURS,
            ],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    node = ("--topology", REDUNDANT, "--state", str(state), "--netns")
    try:
        text = _wait_for(log, "Ctrl-C or `konbini down` stops", up)
        assert re.search(r"^dmz-relay-a1 +dmz-relay +198\.18\.10\.2:8443 +dmz-a1 *$", text, re.M), (
            text
        )  # its site's process
        first = _serving(_status(state, "--netns"), "dmz-relay-a1")
        assert first["nodes"] == ["dmz-relay-a1"]
        p = konbini("node", "kill", "dmz-relay-a1", *node)
        assert p.returncode == 0 and "killed by SIGKILL" in p.stdout, p.stdout + p.stderr
        _wait_for(log, rf"{STAMP} dmz-a1 \(dmz-relay-a1\) up again", up)
        assert _serving(_status(state, "--netns"), "dmz-relay-a1")["pid"] != first["pid"]

        p = konbini("node", "stop", "dmz-relay-a1", *node)
        assert p.returncode == 0 and "stopped by `konbini node stop`" in p.stdout, p.stdout + p.stderr
        hops = {h["node"] for h in _issue(state, "--netns", "--tag", tag)["hops"]}
        assert "dmz-relay-a2" in hops and "dmz-relay-a1" not in hops
        p = konbini("node", "restart", "dmz-relay-a1", *node)
        assert p.returncode == 0 and "up again" in p.stdout, p.stdout + p.stderr
        _issue(state, "--netns", "--tag", tag)
    finally:
        _down(up)
        konbini("down", "--tag", tag, "--state", str(state))
