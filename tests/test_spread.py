"""`konbini up --processes N`: the nodes spread over N forked processes, whole sites each,
balanced by listeners, and the topology works across them as in one process."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from gateway.business import pdf
from gateway.nodes.municipality import municipalities_font
from tests.test_expand import SMALL
from topology.launch import spread
from topology.launch.netns import NODEHOST_COMM, stop_nodehosts
from topology.launch.servers import before_fork
from topology.spec.load import DEFAULT_TOPOLOGY, load_topology

ROOT = Path(__file__).resolve().parent.parent
IN_HOURS = "2026-11-25T10:00:00+09:00"


def test_every_hosted_node_is_in_exactly_one_process_with_its_whole_site(topo):
    parts = spread.partition(topo, 3)
    assert len(parts) == 3
    placed = [n for part in parts for n in part]
    assert sorted(placed) == sorted(n for ids in spread.hosted(topo).values() for n in ids)
    assert len(placed) == len(set(placed))
    where = {n: i for i, part in enumerate(parts) for n in part}
    for ids in spread.hosted(topo).values():
        assert len({where[n] for n in ids}) == 1  # a store's router, controller and kiosks together
    kiosks = [n.id for n in topo.of_kind("kiosk")]
    assert set(kiosks) <= set(placed)  # their maintenance endpoints are served too


def test_the_spread_is_balanced_to_within_one_site(tmp_path):
    big = SMALL  # two DMZ relays, several stores: sites of different weights
    (tmp_path / "t.yaml").write_text(big)
    topo = load_topology(tmp_path / "t.yaml")
    for n in (1, 2, 3):
        parts = spread.partition(topo, n)
        loads = [spread._weight(topo, p) for p in parts]
        heaviest_site = max(spread._weight(topo, ids) for ids in spread.hosted(topo).values())
        assert max(loads) - min(loads) <= heaviest_site, (n, loads)
    assert len(spread.partition(topo, 1000)) == len(spread.hosted(topo))  # never an empty process


def test_the_launcher_makes_what_every_node_process_would_make_alike_before_it_forks(state):
    """National: 20 processes each built the address index (0.7 s), and each imported fontTools and
    read the municipalities' font cut (0.5 s); made once in the parent, the children inherit them."""
    topo = load_topology(DEFAULT_TOPOLOGY)  # a fresh one: no index built yet
    munis = [n.id for n in topo.nodes.values() if n.kind == "municipality"]
    pdf.font.cache_clear()
    before_fork(topo, state, ["store-router-a1", munis[0]])
    assert {"_address_index", "_kind_index"} <= set(topo.__dict__)
    assert pdf.font.cache_info().currsize == 1
    municipalities_font(topo, state)  # what a municipality's prepare asks for: already made
    assert pdf.font.cache_info().hits == 1 and pdf.font.cache_info().currsize == 1


def _wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = path.read_text() if path.exists() else ""
        if text in out:
            return out
        assert proc.poll() is None, out
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not seen in {timeout} s: {path.read_text()}")


def _children(pid: int) -> list[int]:
    """The nodehosts `pid` forked (not, as root, the impairment daemon it also starts)."""
    kids = [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return [k for k in kids if Path(f"/proc/{k}/comm").read_text().strip() == NODEHOST_COMM.decode()]


def test_the_launchers_own_work_runs_while_the_node_processes_start(state):
    """National: the line impairments took 7 s of one core before any node process started (the
    other core idle); `up` now sets them up once the processes are forked, before they are ready."""
    topo = load_topology(DEFAULT_TOPOLOGY)
    seen: list[set[int]] = []
    me = os.getpid()
    kids = Path(f"/proc/{me}/task/{me}/children")  # by pid: a child names itself (comm) a moment later

    def children() -> set[int]:
        return {int(p) for p in kids.read_text().split()}

    before = children()  # an earlier test's child of this (pytest's) process is not one of these
    try:
        hosts = spread.start(topo, state, 2, meanwhile=lambda: seen.append(children() - before))
        try:
            assert seen == [{h.pid for h in hosts}]
        finally:
            stop_nodehosts(hosts)
    finally:
        gc.unfreeze()  # fork_nodehosts froze this (pytest's) process for its children


def test_up_with_two_processes_issues_across_them_and_stops_them_all(tmp_path):
    state, log = tmp_path / "s", tmp_path / "up.log"
    with log.open("w") as out:
        up = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "topology.cli",
                "up",
                "--processes",
                "2",
                "--state",
                str(state),
                "--clock",
                IN_HOURS,
            ],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        text = _wait_for(log, "Ctrl-C stops", up)
        assert "2 processes" in text
        hosts = _children(up.pid)
        assert len(hosts) == 2
        # the issuance's path crosses both processes (so it is really served across them)
        parts = spread.partition(load_topology(ROOT / "topology" / "default.yaml"), 2)
        chain = ("store-router-a1", "ec-router-a", "dmz-relay-a", "issuance-center", "ocsp")
        assert {i for i, p in enumerate(parts) for n in chain if n in p} == {0, 1}
        done = subprocess.run(
            [sys.executable, "-m", "topology.cli", "issue", "--state", str(state), "--clock", IN_HOURS, "--json"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        issued = json.loads(done.stdout)
        assert issued["status"] == "issued" and issued["signature_valid"] is True, issued
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=30) == 0
        assert "stopped; every node shut down." in log.read_text()
        for pid in hosts:
            assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    finally:
        if up.poll() is None:
            os.kill(up.pid, signal.SIGKILL)
            up.wait()
