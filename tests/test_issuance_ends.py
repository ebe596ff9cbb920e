"""Every issuance ends within a bound (completed, cancelled or expired), in the ledger and in the
center's memory: a kiosk that resets while the center awaits the ledger write, a kiosk that goes
away after the document left, a center that died with rows unfinished."""

from __future__ import annotations

import threading
import time

import trio
import trio.testing

from gateway.business.clock import Clock
from gateway.business.ledger import IssuanceRecord, LedgerDB, ledger_path
from gateway.nodes.center import issuing as center_module
from gateway.protocol.messages import IssueRequest
from kiosk_emu.kiosk import Kiosk, issue_at
from tests.conftest import TEST_TIME
from topology.launch.loopback import run_topology

MUNI_A = "131016"


async def until(condition, bound: float = 10.0) -> None:
    """Poll `condition` until it holds, for at most `bound` seconds."""
    with trio.fail_after(bound):
        while not condition():
            await trio.sleep(0.02)


def state_in_ledger(net, iid: str) -> str | None:
    rec = net.app("issuance-center").ledger.db.find_issuance(iid)
    return rec.state if rec else None


async def test_a_kiosk_reset_while_the_ledger_writes_leaves_the_issuance_cancelled(net, monkeypatch):
    """The kiosk goes away while the center awaits the issuance's ledger write: the write commits
    anyway, and the cancel must follow it. (Before: the row stayed `created` for good.)"""
    entered, release = threading.Event(), threading.Event()
    written: list[str] = []
    create = LedgerDB.create_issuance

    def slow_create(db, rec, at):
        written.append(rec.id)
        entered.set()
        release.wait(30)
        return create(db, rec, at)

    monkeypatch.setattr(LedgerDB, "create_issuance", slow_create)
    card = net.cards.ensure_pool(1)[0]
    kiosk = Kiosk(net.context("kiosk-a1-1"), net.state_dir)
    conn = await kiosk.connect()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.run)
        with trio.CancelScope() as scope:
            nursery.start_soon(kiosk.issue, conn, card, "1234", IssueRequest(MUNI_A, "residence-record"))
            await until(entered.is_set)
            scope.cancel()
        conn.close()  # the kiosk's connection goes: its stream is reset through the three relays
    center = net.app("issuance-center")
    await until(lambda: not center.sessions or all(s.finished for s in center.sessions._by_id.values()))
    release.set()
    (iid,) = written
    await until(lambda: state_in_ledger(net, iid) == "cancelled")


async def test_a_delivered_issuance_whose_notice_never_comes_expires_and_leaves_memory(net, monkeypatch):
    """The kiosk went away after the document left: no notice comes. After NOTICE_TTL the center
    expires it (ledger and memory), its metrics say so, and a late notice still completes it."""

    async def lost(self, *args, **kw):
        return False  # the notice never reaches the center

    monkeypatch.setattr(Kiosk, "_deliver", lost)
    card = net.cards.ensure_pool(1)[0]
    r = await issue_at(net, "kiosk-a1-1", card, "1234", IssueRequest(MUNI_A, "residence-record"))
    assert r.status == "issued" and r.notice_pending
    center = net.app("issuance-center")
    await until(lambda: state_in_ledger(net, r.issuance_id) == "sent")
    assert gauge(center, "konbini_notices_awaited") == 1
    assert center.expire_awaited(time.monotonic()) == 0  # within its bound: still awaited
    assert center.expire_awaited(time.monotonic() + center_module.NOTICE_TTL + 1) == 1
    assert r.issuance_id not in center.issuances
    assert gauge(center, "konbini_notices_awaited") == 0 and gauge(center, "konbini_issuances_expired_total") == 1
    assert gauge(center, "konbini_issuances_in_memory", state="sent") == 0
    await until(lambda: state_in_ledger(net, r.issuance_id) == "expired")
    monkeypatch.undo()
    kiosk = Kiosk(net.context("kiosk-a1-1"), net.state_dir)
    conn = await kiosk.connect()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.run)
        assert await kiosk.flush_outbox(conn) == 0  # the late notice is acknowledged
        conn.close()
    assert state_in_ledger(net, r.issuance_id) == "completed"


def gauge(center, name: str, **labels: str) -> float:
    for family in center.collect():
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    raise AssertionError(f"{name} {labels} not collected")


async def test_a_center_starting_expires_the_rows_a_dead_center_left_unfinished(topo, state, nursery):
    """Rows `created` or `sent` long ago (a center that died mid-issuance) are expired at start;
    they no longer count as live."""
    db = LedgerDB(ledger_path(topo.ledger, state))
    long_ago = TEST_TIME.replace(hour=TEST_TIME.hour - 1)
    with db.transaction():
        for iid in ("iss-dead-streaming", "iss-dead-sent"):
            db.create_issuance(
                IssuanceRecord(iid, "s", "kiosk-a1-1", "a", MUNI_A, "residence-record", 1, 200, "2026-11"), long_ago
            )
        db.set_state("iss-dead-sent", "sent", long_ago)
    db.close()
    net = await nursery.start(
        lambda task_status: run_topology(topo, state, clock=Clock(TEST_TIME), task_status=task_status)
    )
    await until(lambda: {state_in_ledger(net, i) for i in ("iss-dead-streaming", "iss-dead-sent")} == {"expired"})
