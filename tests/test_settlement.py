"""Monthly settlement (BIZ-6): deadlines with holiday shifts from the `holidays` library, totals, fixing."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import date, datetime
from pathlib import Path

import pytest

from gateway.business.clock import JST
from gateway.business.ledger import IssuanceRecord, LedgerDB, MonthFixed
from gateway.business.settlement import (
    CONSIGNMENT_FEE,
    SettlementError,
    deadlines,
    is_closed,
    report,
    totals,
)


@pytest.mark.parametrize(
    "month, reconcile, fix, invoice, payment",
    [
        # the 20th of Dec 2026 is a Sunday: payment moves to the next bank business day
        ("2026-11", date(2026, 12, 8), date(2026, 12, 9), date(2026, 12, 15), date(2026, 12, 21)),
        # 20 Jul 2026 is Marine Day (a Monday holiday): payment on Tuesday the 21st
        ("2026-06", date(2026, 7, 8), date(2026, 7, 9), date(2026, 7, 15), date(2026, 7, 21)),
        # 8 Jan 2029 is Coming of Age Day: reconcile moves back to Friday the 5th
        ("2028-12", date(2029, 1, 5), date(2029, 1, 9), date(2029, 1, 15), date(2029, 1, 22)),
        # 9 Oct 2028 is Sports Day, 8 Oct a Sunday: both move back to Friday the 6th
        ("2028-09", date(2028, 10, 6), date(2028, 10, 6), date(2028, 10, 15), date(2028, 10, 20)),
        # 8 and 9 Aug 2026 are a weekend: both on Friday the 7th
        ("2026-07", date(2026, 8, 7), date(2026, 8, 7), date(2026, 8, 15), date(2026, 8, 20)),
    ],
)
def test_deadlines_shift_around_weekends_and_national_holidays(month, reconcile, fix, invoice, payment):
    d = deadlines(month)
    assert (d.reconcile, d.fix, d.invoice, d.payment) == (reconcile, fix, invoice, payment)


def test_bad_month_is_one_clear_error():
    with pytest.raises(SettlementError, match="expected YYYY-MM"):
        deadlines("2026-13")


def _rec(iid: str, operator: str, copies: int, fee: int, month: str = "2026-11") -> IssuanceRecord:
    return IssuanceRecord(
        iid, "s-" + iid, "kiosk-" + operator, operator, "131016", "residence-record", copies, fee, month
    )


def _ledger(tmp_path: Path) -> LedgerDB:
    db = LedgerDB(tmp_path / "ledger.sqlite")
    at = datetime(2026, 11, 24, 10, 0, tzinfo=JST)
    with db.transaction():
        for rec in (_rec("i1", "a", 1, 200), _rec("i2", "a", 2, 400), _rec("i3", "b", 3, 360), _rec("i4", "b", 2, 400)):
            db.create_issuance(rec, at)
        db.record_notice("i1", at, 1, 200)
        db.record_notice("i2", at, 2, 400)
        db.record_notice("i3", at, 3, 360)
        db.record_notice("i4", at, 2, 400, refunded=True)  # misprint: no copies, no fee
        db.record_correction("i2", at, 1, 200, "one copy was reported twice")
    return db


def test_totals_apply_corrections_and_refunds_per_operator(tmp_path):
    t = totals(_ledger(tmp_path).entries(), "2026-11")
    assert (t["a"].copies, t["a"].fees, t["a"].consignment, t["a"].amount_due) == (2, 400, 230, 170)
    assert (t["b"].copies, t["b"].fees, t["b"].refunds, t["b"].refunded_copies) == (3, 360, 400, 2)
    assert t["b"].amount_due == 360 - 3 * CONSIGNMENT_FEE


def test_a_month_not_yet_closed_cannot_be_settled(tmp_path):
    db = _ledger(tmp_path)
    with pytest.raises(SettlementError, match="not closed yet"):
        report(db.entries("2026-11"), "2026-11", datetime(2026, 11, 30, 23, 59, tzinfo=JST))
    assert is_closed("2026-11", datetime(2026, 12, 1, 0, 0, tzinfo=JST))


def test_fixed_month_refuses_every_later_change(tmp_path):
    db = _ledger(tmp_path)
    now = datetime(2026, 12, 9, 10, tzinfo=JST)
    with db.transaction():
        db.fix_month("2026-11", now, report(db.entries("2026-11"), "2026-11", now))
    with pytest.raises(MonthFixed, match="2026-11 is fixed"):
        with db.transaction():
            db.record_correction("i1", now, 2, 400, "late")
    db2 = LedgerDB(db.path)  # and after a restart
    with pytest.raises(MonthFixed):
        with db2.transaction():
            db2.record_notice("i1", now, 1, 200)
    assert db2.verify() > 0


def _konbini(*args: str, state: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "topology.cli", *args, "--state", str(state)], capture_output=True, text=True, timeout=60
    )


def test_settle_cli_reports_fixes_and_then_refuses(tmp_path):
    _ledger(tmp_path).close()
    p = _konbini("settle", "--month", "2026-11", "--json", "--clock", "2026-12-02T10:00+09:00", state=tmp_path)
    assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout)
    assert rep["operators"]["a"]["amount_due"] == 170 and rep["deadlines"]["payment"] == "2026-12-21"
    assert rep["status"] == "open"
    p = _konbini("settle", "--month", "2026-11", "--fix", "--clock", "2026-12-09T10:00+09:00", state=tmp_path)
    assert p.returncode == 0 and "fixed" in p.stdout
    p = _konbini("settle", "--month", "2026-11", "--fix", "--clock", "2026-12-09T10:00+09:00", state=tmp_path)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "already fixed" in p.stderr
    p = _konbini("settle", "--month", "2026-12", "--clock", "2026-12-09T10:00+09:00", state=tmp_path)
    assert p.returncode == 2 and "not closed yet" in p.stderr and "Traceback" not in p.stderr
