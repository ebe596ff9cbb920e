"""INT-1 under SIGKILL: a relay process or the center killed while many kiosks' document streams
share one upstream connection (the center's to each municipality; the relays' too once they
pool). Each issuance completes with its own document or fails whole, and the ledger matches
what the kiosks printed (tests/test_crash.py's audit). docs/int1.md.

The lab of tests/test_crash.py (center, relays and kiosks in three processes on one state
directory), through tests/int1lab.py: its kiosks ask for 1 MiB documents, so most of each
issuance is its document stream and every kill cuts some of them. Its mutation test runs the
same with relays that end a cut document as if it were whole (tests/int1lab.py
`relay_ending_cut_documents`) and requires the check to catch it. The municipalities are paced
(`PACE`) and each kill waits for a document under way (tests/int1lab.py `STREAMING`): killed at
a count of documents printed alone, a kill could fall between documents, and in one loaded CI
run the mutation test saw none cut.
"""

from __future__ import annotations

import queue
import random
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from kiosk_emu.card import CardStore
from tests.conftest import TEST_TIME
from tests.crashlab import write_shifted_topology
from tests.int1lab import STREAMING
from tests.test_crash import CARDS, SEED, Lab, audit, flush_everything
from tests.test_int1_topology import POOLING, RELAY_MODES
from topology.pki import PKI
from topology.spec.load import load_topology

DOC_SIZE = 1 << 20
PACE = 4 << 20  # bytes a second from each municipality: a document is under way for a quarter second
ISSUED = 60  # documents printed, all kiosks together (failed attempts while a node restarts are not counted)
KILLS = ("center", "relays", "center", "center")
BUDGET = 120.0  # seconds for the kiosks' part of the run


class SharedLab(Lab):
    """The crash lab, its children through tests/int1lab.py."""

    def __init__(self, state: Path, topo_file: Path, broken: str | None = None) -> None:
        super().__init__(state, topo_file)
        self.broken = broken

    def argv(self, role: str, **kw) -> list[str]:
        argv = super().argv(role, **kw)
        module = argv.index("-m") + 1
        if argv[module] == "topology.launch.nodehost":
            broken = ["--break", self.broken] if self.broken and role == "relays" else []
            paced = ["--pace", str(PACE)] if role == "center" else []
            return [sys.executable, "-m", "tests.int1lab", "node", *broken, *paced, *argv[module + 1 :]]
        return [sys.executable, "-m", "tests.int1lab", "kiosks", "--doc-size", str(DOC_SIZE), *argv[module + 2 :]]


def lab_files(tmp: Path, mode: str) -> tuple[Path, Path]:
    state = tmp / "state"
    state.mkdir()
    topo_file = state / "topology.yaml"
    write_shifted_topology(topo_file)
    if POOLING:  # the relays' upstream mode, as the file says it
        with topo_file.open("a", encoding="utf-8") as f:
            f.write(f"\nupstream_connections:\n  ec-router: {{mode: {mode}}}\n  dmz-relay: {{mode: {mode}}}\n")
    pki = PKI.ensure(state, load_topology(topo_file))
    CardStore(state, pki, clock=lambda: TEST_TIME).ensure_pool(CARDS)
    return state, topo_file


def kill_while_issuing(lab: Lab, rng: random.Random, kills: list[str]) -> list[tuple[str, int]]:
    """As test_crash's `run_with_kills`, counting documents printed rather than attempts (while a
    node restarts, the kiosks' attempts fail fast and would use up a count of attempts); once a
    kill point is reached, the kill waits for the center to say a document is under way."""
    points = sorted(rng.sample(range(5, ISSUED - 5), len(kills)))
    killed: list[tuple[str, int]] = []
    deadline = time.monotonic() + BUDGET

    def issued() -> int:
        return sum(r["status"] == "issued" for r in lab.results)

    while issued() < ISSUED or len(killed) < len(kills):
        try:
            who, line = lab.take(deadline - time.monotonic())
        except queue.Empty:
            pytest.fail(f"no progress: {issued()} issued, kills {killed}")
        if line is None and who.proc.poll() is not None and who in lab.children.values():
            pytest.fail(f"{who.name} died by itself ({who.proc.returncode})\n{who.tail()}")
        due = len(killed) < len(kills) and issued() >= points[len(killed)]
        if due and who is lab.children["center"] and line == STREAMING:
            time.sleep(rng.uniform(0, 0.02))  # somewhere inside the documents in flight
            role = kills[len(killed)]
            lab.children[role].kill()
            killed.append((role, issued()))
            lab.start(role)
    assert lab.children["kiosks"].stop() == 0, lab.children["kiosks"].tail()
    return killed


def check_kills_leave_each_issuance_whole_or_failed(state: Path, topo_file: Path, broken: str | None = None) -> str:
    """Kill the center and the relays at seeded moments (each restarted at once) while the kiosks
    issue; then: no kiosk was handed a document that is not its own whole one (the kiosk checks
    the signed binding, digest and length, and the resident the paper names, and says
    "misdelivered" otherwise), and the books balance (test_crash's audit)."""
    rng = random.Random(SEED + 31)
    kills = list(KILLS)
    lab = SharedLab(state, topo_file, broken)
    t0 = time.monotonic()
    try:
        for role in ("center", "relays", "kiosks"):
            lab.start(role)
        killed = kill_while_issuing(lab, rng, kills)
        flush_everything(lab, ["center", "relays"])
    finally:
        lab.stop_all()
    statuses = Counter(f"{r['status']}:{r['reason']}" if r["reason"] else r["status"] for r in lab.results)
    wrong = [r for r in lab.results if r["status"] == "misdelivered"]
    assert not wrong, f"documents not whole or not the resident's: {wrong[:3]} ({statuses})"
    print("outcomes:", dict(statuses))
    # While a node restarts, the kiosks retry at once and fail fast before any issuance exists:
    # those attempts are churn, not issuances, and would fail the audit's count of the service kept up.
    lab.results = [r for r in lab.results if r.get("issuance") or r["status"] == "refused"]
    lab.results = [r for r in lab.results if r["reason"] not in ("upstream-unavailable", "upstream-timeout")]
    summary = audit(state, lab, kiosk_kills=0)
    return f"kills {killed}, {summary}, {time.monotonic() - t0:.1f} s"


@pytest.mark.parametrize("mode", RELAY_MODES)
def test_a_relay_or_the_center_killed_leaves_each_issuance_whole_or_failed(tmp_path, mode) -> None:
    """Checked: fails on relays that end a cut document as whole (the next test): kiosks report
    documents "misdelivered". Killed at counts of documents printed alone, one run in two missed
    it with 512 KiB documents, and with 1 MiB ones three runs in eight here; killed while a paced
    document is under way, and with the variant broken where a relay first learns of a reset
    upstream stream, it was caught in every run since."""
    print("\nkill run:", check_kills_leave_each_issuance_whole_or_failed(*lab_files(tmp_path, mode)))


@pytest.mark.parametrize("mode", RELAY_MODES)
def test_the_kill_check_catches_relays_that_end_a_cut_document_as_whole(tmp_path, mode) -> None:
    with pytest.raises(AssertionError, match="not whole"):
        check_kills_leave_each_issuance_whole_or_failed(*lab_files(tmp_path, mode), "relay-ending-cut-documents")
