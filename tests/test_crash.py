"""SIGKILL the kiosk, the relays and the center at seeded random moments during a few hundred
issuances, restart each at once, then check the ledger against what the kiosks printed (BIZ-5):
zero lost, zero duplicated, fees exact, hash chain intact. The second test runs the center side
as two workers on the same addresses (SO_REUSEPORT) and kills the busier one mid-issuance.

Three child processes on one shared state directory, on a 127.x block off the default plan:
  center  `python -m topology.launch.nodehost` with the issuance center, OCSP and the municipalities
  relays  `python -m topology.launch.nodehost` with operator a's store routers, EC router and DMZ relay
  kiosks  `python -m tests.crashlab kiosks` with operator a's six kiosks (outboxes running)
"""

from __future__ import annotations

import json
import os
import queue
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import msgspec
import pytest

from gateway.business.ledger import LedgerDB
from gateway.protocol.messages import CompletionNotice
from kiosk_emu.card import CardStore
from tests.conftest import TEST_TIME
from tests.crashlab import TEST_TIME as LAB_TIME
from tests.crashlab import read_jsonl, write_shifted_topology
from topology.pki import PKI
from topology.spec.load import load_topology

ROOT = Path(__file__).resolve().parent.parent
SEED = 20261124
ISSUANCES = 240  # attempts, all kiosks together
KILLS = ("kiosks", "relays", "center") * 2  # each killed twice, in a seeded order at seeded moments
CARDS = 16
CENTER = "issuance-center,ocsp,muni-a,muni-b,muni-c"
RELAYS = "store-router-a1,store-router-a2,store-router-a3,ec-router-a,dmz-relay-a"
KIOSKS = "kiosk-a1-1,kiosk-a1-2,kiosk-a2-1,kiosk-a2-2,kiosk-a3-1,kiosk-a3-2"
WORKERS = ("center-1", "center-2")  # the second test's center side: two workers, one address each node
WORKER_ISSUANCES = 160
WORKER_KILLS = 4
READY_TIMEOUT = 20.0
BUDGET = 55.0  # the whole run, seconds


class Child:
    """One child process; its stdout lines go to the shared queue as (child, line), (child, None) at EOF."""

    def __init__(self, name: str, argv: list[str], logdir: Path, events: queue.Queue) -> None:
        self.name = name
        self.log = logdir / f"{name}.stderr"
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen(
                argv, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1
            )
        threading.Thread(target=self._read, args=(events,), daemon=True).start()

    def _read(self, events: queue.Queue) -> None:
        for line in self.proc.stdout:
            if line.endswith("\n"):  # a line cut off by SIGKILL was never said
                events.put((self, line[:-1]))
        events.put((self, None))

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 15.0) -> int:
        """Graceful: close stdin (nodehost and the kiosks stop at EOF)."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        return self.proc.wait(timeout)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


class Lab:
    def __init__(self, state: Path, topo_file: Path) -> None:
        self.state, self.topo_file = state, topo_file
        self.events: queue.Queue = queue.Queue()
        self.results: list[dict] = []
        self.lives = Counter()
        self.children: dict[str, Child] = {}

    def argv(self, role: str, **kw) -> list[str]:
        """Roles: center, relays, kiosks; center-1, center-2 ... are center workers (SO_REUSEPORT)."""
        if role.startswith("center") or role == "relays":
            workers = ["--reuse-port"] if role.startswith("center-") else []
            return [
                sys.executable,
                "-m",
                "topology.launch.nodehost",
                "--topology",
                str(self.topo_file),
                "--state",
                str(self.state),
                "--mode",
                "loopback",
                "--clock",
                LAB_TIME,
                "--nodes",
                RELAYS if role == "relays" else CENTER,
                *workers,
            ]
        return [
            sys.executable,
            "-m",
            "tests.crashlab",
            "kiosks",
            "--topology",
            str(self.topo_file),
            "--state",
            str(self.state),
            "--kiosks",
            KIOSKS,
            "--seed",
            str(SEED),
            "--life",
            str(self.lives[role]),
            "--cards",
            str(CARDS),
            *(["--flush-only"] if kw.get("flush_only") else []),
        ]

    def start(self, role: str, **kw) -> Child:
        self.lives[role] += 1
        child = Child(f"{role}-{self.lives[role]}", self.argv(role, **kw), self.state, self.events)
        self.children[role] = child
        self.wait_line(child, "ready")
        return child

    def take(self, timeout: float) -> tuple[Child, str | None]:
        child, line = self.events.get(timeout=max(timeout, 0.01))
        if line is not None and line.startswith("R "):
            self.results.append(json.loads(line[2:]))
        return child, line

    def wait_line(self, child: Child, prefix: str, timeout: float = READY_TIMEOUT) -> str:
        """Read events (recording results) until `child` prints a line starting with `prefix`."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                who, line = self.take(deadline - time.monotonic())
            except queue.Empty:
                pytest.fail(f"{child.name}: no {prefix!r} within {timeout} s\n{child.tail()}")
            if who is child and line is None:
                pytest.fail(f"{child.name} exited ({child.proc.wait()}) before {prefix!r}\n{child.tail()}")
            if who is child and line.startswith(prefix):
                return line

    def stop_all(self) -> None:
        for child in self.children.values():
            if child.proc.poll() is None:
                child.kill()


@pytest.fixture
def lab_state(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    state = tmp_path_factory.mktemp("konbini-crash")
    topo_file = state / "topology.yaml"
    write_shifted_topology(topo_file, paired=True)
    pki = PKI.ensure(state, load_topology(topo_file))
    CardStore(state, pki, clock=lambda: TEST_TIME).ensure_pool(CARDS)
    return state, topo_file


def test_sigkill_anywhere_loses_and_duplicates_no_notice(lab_state) -> None:
    state, topo_file = lab_state
    rng = random.Random(SEED)
    kills = list(KILLS)
    rng.shuffle(kills)
    lab = Lab(state, topo_file)
    t0 = time.monotonic()
    try:
        for role in ("center", "relays", "kiosks"):
            lab.start(role)
        killed = run_with_kills(lab, rng, ISSUANCES, kills, lambda role: role)
        flush_everything(lab, ["center", "relays"])
    finally:
        lab.stop_all()
    elapsed = time.monotonic() - t0
    assert Counter(r for r, _ in killed) == Counter(KILLS)
    summary = audit(state, lab, Counter(r for r, _ in killed)["kiosks"])
    print(f"\ncrash run: seed {SEED}, kills {killed}, {summary}, {elapsed:.1f} s")


def test_a_center_worker_killed_mid_issuance_loses_and_duplicates_no_notice(lab_state) -> None:
    """The center side in two worker processes sharing its addresses (SO_REUSEPORT) and its ledger.
    At each seeded point the worker holding more of the center's connections (so issuances are in
    flight on it) is SIGKILLed and restarted. Its kiosks' notices are retried on new connections,
    which may reach the other worker: it finds the issuance in the shared ledger. The books must
    balance as in the test above."""
    state, topo_file = lab_state
    rng = random.Random(SEED + 1)
    center = load_topology(topo_file).node("issuance-center")
    lab = Lab(state, topo_file)
    t0 = time.monotonic()

    def busiest(_: str) -> str:
        load = {w: established(lab.children[w].proc.pid, center.address, center.port) for w in WORKERS}
        assert max(load.values()) > 0, f"no connection to the center on either worker: {load}"
        return max(WORKERS, key=lambda w: (load[w], w))

    try:
        for role in (*WORKERS, "relays", "kiosks"):
            lab.start(role)
        killed = run_with_kills(lab, rng, WORKER_ISSUANCES, ["worker"] * WORKER_KILLS, busiest)
        flush_everything(lab, [*WORKERS, "relays"])
    finally:
        lab.stop_all()
    elapsed = time.monotonic() - t0
    summary = audit(state, lab, kiosk_kills=0)
    print(f"\nworker crash run: seed {SEED + 1}, kills {killed}, {summary}, {elapsed:.1f} s")


def run_with_kills(lab: Lab, rng: random.Random, total: int, kills: list[str], victim) -> list[tuple[str, int]]:
    """Let the kiosks make `total` attempts; at seeded points SIGKILL `victim(kind)` (a role) and
    restart it at once. Returns (role, attempts so far) per kill."""
    # the last kill point leaves a third of the attempts: a restart (seconds) must not outlast them
    points = sorted(rng.sample(range(15, total * 2 // 3), len(kills)))
    killed: list[tuple[str, int]] = []
    t0 = time.monotonic()
    while len(lab.results) < total:
        assert time.monotonic() - t0 < BUDGET, f"too slow: {len(lab.results)} attempts, kills {killed}"
        try:
            who, line = lab.take(BUDGET - (time.monotonic() - t0))
        except queue.Empty:
            pytest.fail(f"no progress: {len(lab.results)} attempts, kills {killed}")
        if line is None and who.proc.poll() is not None and who in lab.children.values():
            pytest.fail(f"{who.name} died by itself ({who.proc.returncode})\n{who.tail()}")
        if len(killed) < len(kills) and len(lab.results) >= points[len(killed)]:
            time.sleep(rng.uniform(0, 0.02))  # somewhere inside the issuances in flight, not between them
            role = victim(kills[len(killed)])
            lab.children[role].kill()
            killed.append((role, len(lab.results)))
            lab.start(role)
    assert len(killed) == len(kills)
    assert lab.children["kiosks"].stop() == 0, lab.children["kiosks"].tail()
    return killed


def flush_everything(lab: Lab, servers: list[str]) -> None:
    """A clean stop of `servers`, a restart of the center (one process) and the relays, and every
    kiosk outbox flushed through them."""
    for role in servers:
        assert lab.children[role].stop() == 0, lab.children[role].tail()
    lab.start("center")
    lab.start("relays")
    flusher = Child("flush", lab.argv("kiosks", flush_only=True), lab.state, lab.events)
    lab.children["kiosks"] = flusher
    left = lab.wait_line(flusher, "flushed", timeout=BUDGET)
    assert flusher.proc.wait(10) == 0
    assert left == "flushed 0", f"notices still waiting in the outboxes: {left}"
    for role in ("center", "relays"):
        assert lab.children[role].stop() == 0, lab.children[role].tail()


def established(pid: int, address: str, port: int) -> int:
    """TCP connections of process `pid` established at `address:port` (its sockets' inodes in
    /proc/PID/fd, matched against /proc/PID/net/tcp)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            link = os.readlink(fd)
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    local = f"{socket.inet_aton(address)[::-1].hex().upper()}:{port:04X}"
    n = 0
    for row in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        f = row.split()
        n += f[1] == local and f[3] == "01" and f[9] in inodes  # 01: ESTABLISHED
    return n


def audit(state: Path, lab: Lab, kiosk_kills: int) -> str:
    """The books after a crash run: what the kiosks printed, their outboxes and the ledger agree
    (zero lost, zero duplicated, fees exact, hash chain intact). Returns a one-line summary."""
    # -- what the kiosks recorded -------------------------------------------------------------
    statuses = Counter(r["status"] for r in lab.results)
    assert statuses["issued"] >= len(lab.results) // 3, statuses  # the kills did not stop the service for long

    printed: dict[str, dict] = {}  # issuance -> the kiosk's "printed" / "misprint-refunded" event
    for log in sorted((state / "kiosk-logs").glob("*.jsonl")):
        for ev in read_jsonl(log):
            if ev["event"] in ("printed", "misprint-refunded"):
                assert ev["issuance"] not in printed, f"printed twice: {ev}"
                printed[ev["issuance"]] = ev
    outboxed: dict[str, CompletionNotice] = {}  # issuance -> the notice the kiosk made durable
    for db in sorted((state / "outbox").glob("*.sqlite")):
        conn = sqlite3.connect(db)
        for iid, body, st, reason in conn.execute("SELECT issuance_id, body, state, reason FROM notices"):
            assert st == "acked", f"{db.name}: notice {iid} is {st} ({reason})"
            outboxed[iid] = msgspec.json.decode(body, type=CompletionNotice)
        conn.close()
    # The notice is durable before printing is reported: every logged print has its notice.
    assert set(printed) <= set(outboxed), set(printed) - set(outboxed)
    # A kiosk killed between its outbox write and its log line: printed and noticed, but not logged.
    unlogged = set(outboxed) - set(printed)
    assert len(unlogged) <= kiosk_kills * len(KIOSKS.split(",")), unlogged
    # Every paid job has its notice: a refund notice is held before payment and released at restart
    # when the print was never confirmed, so a kill between payment and print loses nothing.
    paid = {
        ev["issuance"]
        for log in (state / "kiosk-logs").glob("*.jsonl")
        for ev in read_jsonl(log)
        if ev["event"] == "paid"
    }
    paid_unnoticed = paid - set(outboxed)
    assert not paid_unnoticed, f"paid without a notice: {sorted(paid_unnoticed)}"
    leftovers = sorted(p.name for p in (state / "spool").rglob("*") if p.is_file())
    assert not leftovers, f"certificate data left on a kiosk after its restart: {leftovers}"
    issued = {r["issuance"] for r in lab.results if r["status"] in ("issued", "refunded")}
    assert issued <= set(printed)  # what the kiosks told residents was logged

    # -- the ledger against them --------------------------------------------------------------
    db = LedgerDB(state / "ledger.sqlite")
    try:
        rows = db.verify()  # the hash chain is intact
        noticed = {r[0] for r in db.conn.execute("SELECT issuance_id FROM notices")}
        assert noticed == set(outboxed), (
            f"lost: {sorted(set(outboxed) - noticed)}; noticed without a print: {sorted(noticed - set(outboxed))}"
        )
        per_kind = Counter((e["issuance_id"], e["kind"]) for e in db.entries())
        states = dict(db.conn.execute("SELECT id, state FROM issuances"))
        ledger_fees = 0
        for iid, notice in outboxed.items():
            rec = db.issuance(iid)
            assert (rec.copies, rec.fee) == (notice.copies, notice.fee), iid
            assert per_kind[(iid, "notice")] == 1 and per_kind[(iid, "payment")] == 1, f"duplicated: {iid}"
            assert per_kind[(iid, "copy")] == notice.copies
            assert per_kind[(iid, "refund")] == int(notice.refunded)
            assert states[iid] == ("refunded" if notice.refunded else "completed")
            if iid in printed:
                assert printed[iid]["fee"] == rec.fee and printed[iid]["event"] == (
                    "misprint-refunded" if notice.refunded else "printed"
                )
        for iid, state_ in states.items():  # cancelled by a kill (or refused): never completed, never printed
            if iid not in outboxed:
                assert state_ in ("created", "sent", "cancelled", "expired"), (iid, state_)
                assert iid not in printed
                assert not any(per_kind[(iid, k)] for k in ("notice", "payment", "copy", "refund"))
        ledger_fees = sum(e["amount"] for e in db.entries() if e["kind"] in ("payment", "refund"))
        kiosk_fees = sum(n.fee for n in outboxed.values() if not n.refunded)
        logged_fees = sum(ev["fee"] for ev in printed.values() if ev["event"] == "printed")
        unlogged_fees = sum(outboxed[i].fee for i in unlogged if not outboxed[i].refunded)
        assert ledger_fees == kiosk_fees == logged_fees + unlogged_fees
    finally:
        db.close()
    outcomes = Counter(f"{r['status']}:{r['reason']}" if r["reason"] else r["status"] for r in lab.results)
    return (
        f"{len(lab.results)} attempts {dict(outcomes)}, "
        f"{len(printed)} printed (+{len(unlogged)} noticed, killed before the log line; {len(paid_unnoticed)} paid, killed before the notice), {len(noticed)} noticed, "
        f"not completed {dict(Counter(s for i, s in states.items() if i not in noticed))}, fees {ledger_fees} yen, {rows} ledger rows"
    )
