"""The ledger: migrations, the hash chain, notices exactly once across restarts, batched commits."""

from __future__ import annotations

import multiprocessing
import sqlite3
from datetime import datetime

import pytest
import trio

from gateway.business.clock import JST
from gateway.business.ledger import (
    MEMORY,
    MIGRATIONS,
    VOID_STAMP,
    IssuanceRecord,
    Ledger,
    LedgerDB,
    LedgerTampered,
    MonthFixed,
    UnknownIssuance,
    ledger_path,
)
from gateway.business.session import IssuanceState
from tests.forked import at_once

AT = datetime(2026, 11, 24, 10, 0, tzinfo=JST)


def rec(iid: str, copies: int = 1, fee: int = 200, month: str = "2026-11") -> IssuanceRecord:
    return IssuanceRecord(iid, "sess", "kiosk-a1-1", "a", "131016", "residence-record", copies, fee, month)


def issued(db: LedgerDB, iid: str, copies: int = 1, fee: int = 200) -> None:
    with db.transaction():
        db.create_issuance(rec(iid, copies, fee), AT)
        db.set_state(iid, "sent", AT)


def test_schema_is_migrated_once_and_reopening_keeps_it(tmp_path):
    db = LedgerDB(tmp_path / "l.sqlite")
    assert db.version == len(MIGRATIONS)
    assert db.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    issued(db, "i1")
    db.close()
    again = LedgerDB(tmp_path / "l.sqlite")
    assert again.version == len(MIGRATIONS) and again.count("issuance") == 1


def test_two_processes_opening_one_new_ledger_at_once_migrate_it_once(tmp_path):
    """A standby center in its own process opens the shared ledger as the first one does. (Before
    the fix 25 of 30 such rounds failed: "table entries already exists", "database is locked".)"""
    ctx = multiprocessing.get_context("fork")
    for round_ in range(5):
        path = tmp_path / f"l{round_}.sqlite"
        start = ctx.Barrier(6)
        procs = [ctx.Process(target=_open_at_once, args=(str(path), start)) for _ in range(6)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
        assert [p.exitcode for p in procs] == [0] * 6
        db = LedgerDB(path)
        assert [r[0] for r in db.conn.execute("SELECT version FROM schema_version")] == list(
            range(1, len(MIGRATIONS) + 1)
        )
        db.close()


def _open_at_once(path: str, start) -> None:
    start.wait(10)
    LedgerDB(path).close()


def test_worker_processes_writing_one_ledger_keep_one_chain_and_one_notice_each(tmp_path):
    """The issuance center's workers share its ledger file. Each appends under SQLite's write lock
    and must chain onto what the others committed; every worker then notices every issuance,
    and each is recorded once. (With the chain head cached per connection, verify() failed:
    "row 51 (issuance) does not match the hash chain".)"""
    path = tmp_path / "l.sqlite"
    LedgerDB(path).close()
    firsts = at_once(_worker_writes, [(str(path), w) for w in range(4)])
    db = LedgerDB(path)
    assert db.verify() == 4 * 25 * 2 + 4 * 25 * 3  # issuance + sent each; notice + payment + copy each
    assert db.count("notice") == 100 and sum(firsts) == 100  # each issuance noticed once, whoever was first
    db.close()


def _worker_writes(start, new, path: str, worker: int) -> None:
    db = LedgerDB(path)
    start.wait(10)
    for i in range(25):  # interleaved with the other workers' transactions
        issued(db, f"w{worker}-{i}")
    start.wait(30)
    first = 0
    for w in range(4):  # every worker notices every issuance: a kiosk's retry reaching another worker
        for i in range(25):
            with db.transaction():
                first += db.record_notice(f"w{w}-{i}", AT, 1, 200)
    db.close()
    new.put(first)


def test_a_late_sent_from_another_worker_does_not_undo_a_notice(tmp_path):
    db = LedgerDB(tmp_path / "l.sqlite")
    with db.transaction():
        db.create_issuance(rec("i1"), AT)
        db.record_notice("i1", AT, 1, 200)  # noticed through one worker ...
        db.set_state("i1", "sent", AT)  # ... before the delivering worker's lazy "sent" committed
    assert db.issuance("i1").state == "completed" and db.count("sent") == 0


def test_notice_is_recorded_once_even_after_a_restart(tmp_path):
    db = LedgerDB(tmp_path / "l.sqlite")
    issued(db, "i1", copies=2, fee=400)
    with db.transaction():
        assert db.record_notice("i1", AT, 2, 400) is True
        assert db.record_notice("i1", AT, 2, 400) is False
    db.close()
    db = LedgerDB(tmp_path / "l.sqlite")
    with db.transaction():
        assert db.record_notice("i1", AT, 2, 400) is False
    assert (db.count("notice"), db.count("payment"), db.count("copy")) == (1, 1, 2)
    assert db.issuance("i1").state == "completed"


def test_misprint_refunds_and_stamps_every_copy_void(tmp_path):
    db = LedgerDB(tmp_path / "l.sqlite")
    issued(db, "i1", copies=3, fee=600)
    with db.transaction():
        db.record_notice("i1", AT, 3, 600, refunded=True)
    rows = db.entries("2026-11")
    copies = [r for r in rows if r["kind"] == "copy"]
    assert len(copies) == 3 and all(VOID_STAMP in r["detail"] for r in copies)
    assert [r["amount"] for r in rows if r["kind"] in ("payment", "refund")] == [600, -600]
    assert db.issuance("i1").state == "refunded"


def test_chain_is_intact_then_a_changed_row_is_one_clear_error(tmp_path):
    db = LedgerDB(tmp_path / "l.sqlite")
    for i in range(5):
        issued(db, f"i{i}")
    assert db.verify() == 10
    raw = sqlite3.connect(tmp_path / "l.sqlite")
    raw.execute("UPDATE entries SET amount = 1 WHERE seq = 3")
    raw.commit()
    with pytest.raises(LedgerTampered, match=r"row 3 \(issuance\) does not match the hash chain"):
        db.verify()


def test_a_removed_row_breaks_the_chain(tmp_path):
    db = LedgerDB(tmp_path / "l.sqlite")
    for i in range(3):
        issued(db, f"i{i}")
    db.conn.execute("DELETE FROM entries WHERE seq = 2")
    with pytest.raises(LedgerTampered, match="row 3"):
        db.verify()


def test_a_refused_operation_leaves_no_trace_and_the_chain_goes_on(tmp_path):
    db = LedgerDB(tmp_path / "l.sqlite")
    issued(db, "i1")
    with pytest.raises(UnknownIssuance):
        with db.transaction():
            db.record_notice("nope", AT, 1, 200)
    with db.transaction():
        db.fix_month("2026-10", AT, {})
    with pytest.raises(MonthFixed):
        with db.transaction():
            db.create_issuance(rec("old", month="2026-10"), AT)
    issued(db, "i2")
    assert db.verify() == db.conn.execute("SELECT count(*) FROM entries").fetchone()[0]


def test_ledger_path_defaults_into_the_state_dir(tmp_path):
    assert ledger_path(None, tmp_path) == str(tmp_path / "ledger.sqlite")
    assert ledger_path("x/l.db", tmp_path) == str(tmp_path / "x/l.db")
    assert ledger_path("/abs/l.db", tmp_path) == "/abs/l.db"
    assert ledger_path(MEMORY, tmp_path) == MEMORY


@pytest.mark.parametrize("where", ["file", MEMORY])
async def test_writer_batches_concurrent_operations_and_isolates_failures(tmp_path, where):
    ledger = Ledger.open(tmp_path / "l.sqlite" if where == "file" else MEMORY)
    results: dict[str, object] = {}

    async def one(i: int) -> None:
        await ledger.call(LedgerDB.create_issuance, rec(f"i{i}"), AT)
        try:
            results[f"i{i}"] = await ledger.call(LedgerDB.record_notice, f"i{i}" if i % 10 else "missing", AT, 1, 200)
        except UnknownIssuance as exc:
            results[f"i{i}"] = exc

    async with trio.open_nursery() as nursery:
        await nursery.start(ledger.run)
        async with trio.open_nursery() as burst:
            for i in range(100):
                burst.start_soon(one, i)
        nursery.cancel_scope.cancel()
    assert ledger.ops == 200 and ledger.batches < 50  # one commit served many operations
    assert sum(isinstance(v, UnknownIssuance) for v in results.values()) == 10
    assert sum(v is True for v in results.values()) == 90
    assert ledger.db.count("notice") == 90 and ledger.db.verify() == 100 + 90 * 3


# -- every issuance ends: rows left unfinished are expired ---------------------------------------


def test_rows_left_unfinished_past_their_bound_are_expired_and_a_late_notice_still_completes_them():
    """A center that died leaves rows `created` (streaming) or `sent` (awaiting the notice) that no
    one will finish: past their bound they expire, as facts in the chain; younger ones are left
    to their center. Expired, not cancelled: the document may have been printed, so a late notice
    is still taken."""
    db = LedgerDB(MEMORY)
    early, late = AT.replace(hour=9), AT.replace(hour=11)
    with db.transaction():
        for iid, at in (("old-created", early), ("new-created", late)):
            db.create_issuance(rec(iid), at)
        for iid, at in (("old-sent", early), ("new-sent", late)):
            db.create_issuance(rec(iid), at)
            db.set_state(iid, "sent", at)
        db.create_issuance(rec("done"), early)
        db.set_state("done", "sent", early)
        db.record_notice("done", early, 1, 200)
    assert db.unfinished() == {"created": 2, "sent": 2}
    with db.transaction():
        stale = db.expire_stale(late, created_before=AT, sent_before=AT)
    assert sorted(stale) == ["old-created", "old-sent"]
    assert {i: db.issuance(i).state for i in ("old-created", "old-sent", "new-created", "new-sent", "done")} == {
        "old-created": "expired",
        "old-sent": "expired",
        "new-created": "created",
        "new-sent": "sent",
        "done": "completed",
    }
    assert db.count("expired") == 2 and db.verify() == len(db.entries())
    with db.transaction():
        assert db.record_notice("old-sent", late, 1, 200)  # the resident paid: the notice counts
    assert db.issuance("old-sent").state == "completed"


def test_expiring_leaves_a_fixed_month_alone():
    db = LedgerDB(MEMORY)
    with db.transaction():
        db.create_issuance(rec("oct", month="2026-10"), AT.replace(month=10))
        db.fix_month("2026-10", AT, {})
        stale = db.expire_stale(AT, created_before=AT, sent_before=AT)
    assert stale == [] and db.issuance("oct").state == "created"  # fixed data is never modified (BIZ-6)


def test_a_ledger_from_before_the_state_times_is_migrated_and_its_unfinished_rows_count_as_stale(tmp_path):
    path = tmp_path / "old.sqlite"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)")
    for version, script in enumerate(MIGRATIONS[:-1], start=1):  # every one but the state times
        conn.executescript(script)
        conn.execute("INSERT INTO schema_version VALUES (?, datetime('now'))", (version,))
    conn.execute(
        "INSERT INTO issuances (id, session, kiosk, operator, municipality, cert_type, copies, fee, month, state)"
        " VALUES ('i-old', 's', 'k', 'a', '131016', 'residence-record', 1, 200, '2026-11', 'created')"
    )
    conn.close()
    db = LedgerDB(path)
    assert db.version == len(MIGRATIONS) and db.issuance("i-old").changed is None
    with db.transaction():
        assert db.expire_stale(AT, created_before=AT.replace(hour=0), sent_before=AT.replace(hour=0)) == ["i-old"]


# -- one vocabulary: the ledger's states are the center's IssuanceState --------------------------


def test_an_old_ledgers_stored_states_read_as_the_centers_issuance_states(tmp_path):
    """Rows written by an older konbini (every state spelling it stored) read back as IssuanceState
    members, unfinished ones counted under them, without a migration: the spellings are the values."""
    path = tmp_path / "old.sqlite"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)")
    for version, script in enumerate(MIGRATIONS, start=1):
        conn.executescript(script)
        conn.execute("INSERT INTO schema_version VALUES (?, datetime('now'))", (version,))
    stored = ("created", "sent", "completed", "refunded", "cancelled", "expired")
    for state in stored:
        conn.execute(
            "INSERT INTO issuances (id, session, kiosk, operator, municipality, cert_type, copies, fee, month, state)"
            " VALUES (?, 's', 'k', 'a', '131016', 'residence-record', 1, 200, '2026-11', ?)",
            (f"i-{state}", state),
        )
    conn.close()
    db = LedgerDB(path)
    assert {db.issuance(f"i-{state}").state for state in stored} == set(IssuanceState)
    assert db.issuance("i-created").state is IssuanceState.STREAMING
    assert db.issuance("i-refunded").state is IssuanceState.REFUNDED
    assert all(isinstance(state, IssuanceState) for state in db.unfinished())


def test_a_state_no_issuance_has_never_enters_the_ledger():
    db = LedgerDB(MEMORY)
    with db.transaction():
        db.create_issuance(rec("i1"), AT)
    with pytest.raises(ValueError), db.transaction():
        db.set_state("i1", "delivered", AT)
    assert db.issuance("i1").state is IssuanceState.STREAMING and db.count("delivered") == 0
