"""The issuance ledger: every issuance, copy, payment, refund, notice and correction, in SQLite.

Theory of operation. `LedgerDB` is the synchronous core: one SQLite file (WAL, synchronous=FULL)
whose schema is migrated by code (`schema_version` + the ordered `MIGRATIONS`). Facts are
appended to `entries`, never updated; each entry's `hash` is sha256(previous hash + the
canonical row), so `verify()` finds any row changed, removed or reordered outside konbini.
Several processes may write one file (the issuance center's workers): each transaction takes
SQLite's write lock first (BEGIN IMMEDIATE) and reads the chain's head under it. `issuances`
and `notices` are indexes over those facts: the issuance's current state, and the one notice
per issuance id that makes notices exactly-once across restarts
(`INSERT ... ON CONFLICT DO NOTHING`). A month fixed by settlement refuses every later change.

`Ledger` is the Trio side: one writer task takes operations from a memory channel, runs every
operation waiting at that moment in one transaction (a savepoint each, so one refused operation
does not sink its neighbours) in a worker thread, and commits once per batch. Callers await
their own result, so an acknowledgement is only sent after its fact is durable, and a burst of
concurrent issuances costs one fsync rather than one each.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import trio

from gateway.business.session import ISSUANCE_NOTICED, IssuanceState

GENESIS = "0" * 64
MEMORY = ":memory:"
VOID_STAMP = "返金済・無効"  # stamped on every copy of a misprinted job (BIZ-4, 001 §9)
BATCH_MAX = 512
LAZY_FLUSH = 0.005  # seconds a batch of facts nobody waits on may wait for company before committing

MIGRATIONS: tuple[str, ...] = (
    # 1: the chained facts and the indexes over them
    """
    CREATE TABLE entries (
        seq INTEGER PRIMARY KEY,
        kind TEXT NOT NULL,
        issuance_id TEXT,
        at TEXT NOT NULL,
        month TEXT,
        operator TEXT,
        municipality TEXT,
        kiosk TEXT,
        cert_type TEXT,
        copies INTEGER NOT NULL DEFAULT 0,
        amount INTEGER NOT NULL DEFAULT 0,
        detail TEXT NOT NULL DEFAULT '{}',
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL
    );
    CREATE INDEX entries_issuance ON entries(issuance_id);
    CREATE INDEX entries_month ON entries(month);
    CREATE TABLE issuances (
        id TEXT PRIMARY KEY,
        session TEXT NOT NULL,
        kiosk TEXT NOT NULL,
        operator TEXT,
        municipality TEXT NOT NULL,
        cert_type TEXT NOT NULL,
        copies INTEGER NOT NULL,
        fee INTEGER NOT NULL,
        month TEXT NOT NULL,
        state TEXT NOT NULL
    );
    CREATE TABLE notices (
        issuance_id TEXT PRIMARY KEY,
        at TEXT NOT NULL
    );
    CREATE TABLE months (
        month TEXT PRIMARY KEY,
        fixed_at TEXT NOT NULL,
        report TEXT NOT NULL
    );
    """,
    # 2: outages for the SLA (BIZ-9): complete outages of a scope ("service", a kiosk id, ...)
    """
    CREATE TABLE outages (
        id INTEGER PRIMARY KEY,
        scope TEXT NOT NULL,
        start TEXT NOT NULL,
        end TEXT NOT NULL,
        cause TEXT NOT NULL DEFAULT ''
    );
    """,
    # 3: the card each issuance was made for (its opaque id, printed on the paper too): an auditor
    # joins paper, ledger row and card (INT-1)
    "ALTER TABLE issuances ADD COLUMN card TEXT",
    # 4: when each issuance last changed state, so that one left unfinished (a center that died, a
    # kiosk that never sent its notice) is found and expired; rows from before have none: stale
    """
    ALTER TABLE issuances ADD COLUMN changed TEXT;
    CREATE INDEX issuances_unfinished ON issuances(state, changed);
    """,
)
# The issuances' states are the center's IssuanceState, stored as their values (which never change
# spelling, so every ledger file reads). Every state but these is final.
UNFINISHED = (IssuanceState.STREAMING, IssuanceState.SENT)

_ENTRY_FIELDS = (
    "seq",
    "kind",
    "issuance_id",
    "at",
    "month",
    "operator",
    "municipality",
    "kiosk",
    "cert_type",
    "copies",
    "amount",
    "detail",
)


class LedgerError(Exception):
    """A ledger problem the user can hit; one line naming the reason and the file."""


class LedgerTampered(LedgerError):
    pass


class MonthFixed(LedgerError):
    """A change to a month whose settlement is fixed (BIZ-6: fixed data is never modified)."""

    def __init__(self, month: str, what: str) -> None:
        super().__init__(f"month {month} is fixed by settlement; {what} refused (fixed data is never modified)")
        self.month = month


class UnknownIssuance(LedgerError):
    pass


@dataclass(frozen=True)
class IssuanceRecord:
    id: str
    session: str
    kiosk: str
    operator: str | None
    municipality: str
    cert_type: str
    copies: int
    fee: int
    month: str
    state: IssuanceState = IssuanceState.STREAMING
    card: str | None = None  # the card's opaque id (its certificate's subject), never personal data
    changed: str | None = None  # when the state last changed (the clock's ISO text)


def _iso(at: datetime | str) -> str:
    return at if isinstance(at, str) else at.isoformat()


def month_of(at: datetime) -> str:
    return at.strftime("%Y-%m")


def canonical(row: dict[str, Any]) -> str:
    return json.dumps([row[k] for k in _ENTRY_FIELDS], ensure_ascii=False, separators=(",", ":"))


def chain_hash(prev_hash: str, row: dict[str, Any]) -> str:
    return hashlib.sha256((prev_hash + canonical(row)).encode()).hexdigest()


class LedgerDB:
    """The synchronous core; one connection, used by one thread at a time."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._last_hash, self._fixed = GENESIS, set[str]()
        self._shared = False  # a file other processes may write: the chain head is read at each transaction
        if self.path != MEMORY:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            self.conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self.conn.row_factory = sqlite3.Row
            self.conn.execute("PRAGMA busy_timeout=5000")
            if self.path != MEMORY:
                self._set_wal()
            self.conn.execute("PRAGMA synchronous=FULL")
            self.migrate()
        except sqlite3.DatabaseError as exc:
            raise LedgerError(f"ledger {self.path}: cannot open ({exc})") from None
        self._reload()
        self._shared = self.path != MEMORY

    def _reload(self) -> None:
        """The chain's last hash and the fixed months, as the file has them now. Read at open and
        again under each transaction's write lock: another process may have appended since (the
        issuance center's workers, a standby center), and a hash cached here would fork the chain."""
        last = self.conn.execute("SELECT hash FROM entries ORDER BY seq DESC LIMIT 1").fetchone()
        self._last_hash = last[0] if last else GENESIS
        self._fixed = {r[0] for r in self.conn.execute("SELECT month FROM months")}

    def close(self) -> None:
        self.conn.close()

    def _set_wal(self, tries: int = 100) -> None:
        """Switch a new file to WAL. SQLite answers "locked" at once, without its busy handler, when
        another process switches the same new file in the same moment (two centers starting): try
        again for up to 5 s."""
        for attempt in range(tries):
            try:
                self.conn.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or attempt == tries - 1:
                    raise
                time.sleep(0.05)

    # -- schema ------------------------------------------------------------------------------

    @property
    def version(self) -> int:
        row = self.conn.execute("SELECT max(version) FROM schema_version").fetchone()
        return row[0] or 0

    def migrate(self) -> None:
        """Apply every migration newer than the file, each in its own transaction. The version is
        read again under the write lock: two centers opening one new ledger at once (a standby
        center in its own process) apply each migration once, not twice."""
        self.conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
        )
        current = self._check_version(self.version)
        for version in range(current + 1, len(MIGRATIONS) + 1):
            with self.transaction():
                if self._check_version(self.version) >= version:
                    continue
                for statement in MIGRATIONS[version - 1].split(";"):
                    if statement.strip():
                        self.conn.execute(statement)
                self.conn.execute("INSERT INTO schema_version VALUES (?, datetime('now'))", (version,))

    def _check_version(self, current: int) -> int:
        if current > len(MIGRATIONS):
            raise LedgerError(
                f"ledger {self.path}: schema version {current} is newer than this konbini ({len(MIGRATIONS)})"
            )
        return current

    @contextmanager
    def transaction(self) -> Iterator[LedgerDB]:
        """One write transaction: committed when the block ends, rolled back (the chain's head and
        the fixed months with it) when it raises."""
        last, fixed = self._last_hash, set(self._fixed)
        self.conn.execute("BEGIN IMMEDIATE")
        if self._shared:
            self._reload()  # another writer may have committed since our last transaction
        try:
            yield self
        except BaseException:
            self.conn.execute("ROLLBACK")
            self._last_hash, self._fixed = last, fixed
            raise
        self.conn.execute("COMMIT")

    # -- appending facts ---------------------------------------------------------------------

    def append(
        self,
        kind: str,
        at: datetime | str,
        *,
        issuance_id: str | None = None,
        month: str | None = None,
        operator: str | None = None,
        municipality: str | None = None,
        kiosk: str | None = None,
        cert_type: str | None = None,
        copies: int = 0,
        amount: int = 0,
        detail: dict[str, Any] | None = None,
    ) -> int:
        """Append one chained fact; call inside a transaction."""
        if month is not None and month in self._fixed:
            raise MonthFixed(month, f"{kind} for {issuance_id or 'this month'}")
        row = {
            "seq": None,
            "kind": kind,
            "issuance_id": issuance_id,
            "at": at if isinstance(at, str) else at.isoformat(),
            "month": month,
            "operator": operator,
            "municipality": municipality,
            "kiosk": kiosk,
            "cert_type": cert_type,
            "copies": copies,
            "amount": amount,
            "detail": json.dumps(detail or {}, ensure_ascii=False, sort_keys=True),
        }
        seq: int = self.conn.execute("SELECT coalesce(max(seq), 0) + 1 FROM entries").fetchone()[0]
        row["seq"] = seq
        digest = chain_hash(self._last_hash, row)
        self.conn.execute(
            f"INSERT INTO entries ({', '.join(_ENTRY_FIELDS)}, prev_hash, hash) VALUES ({', '.join('?' * (len(_ENTRY_FIELDS) + 2))})",
            [row[k] for k in _ENTRY_FIELDS] + [self._last_hash, digest],
        )
        self._last_hash = digest
        return seq

    def _fact(self, kind: str, rec: IssuanceRecord, at: datetime | str, **kw: Any) -> int:
        return self.append(
            kind,
            at,
            issuance_id=rec.id,
            month=rec.month,
            operator=rec.operator,
            municipality=rec.municipality,
            kiosk=rec.kiosk,
            cert_type=rec.cert_type,
            **kw,
        )

    def create_issuance(self, rec: IssuanceRecord, at: datetime | str) -> None:
        self._fact(
            "issuance", rec, at, copies=rec.copies, amount=rec.fee, detail={"session": rec.session, "card": rec.card}
        )
        self.conn.execute(
            "INSERT INTO issuances (id, session, kiosk, operator, municipality, cert_type, copies, fee, month, state, card, changed)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                rec.id,
                rec.session,
                rec.kiosk,
                rec.operator,
                rec.municipality,
                rec.cert_type,
                rec.copies,
                rec.fee,
                rec.month,
                IssuanceState.STREAMING.value,
                rec.card,
                _iso(at),
            ),
        )

    def set_state(self, issuance_id: str, state: IssuanceState, at: datetime | str) -> None:
        """created -> sent | cancelled | expired, sent -> expired; each change is a fact too. An
        issuance already noticed keeps its state: with several center workers, the worker that
        delivered may commit its "sent" after another worker recorded the kiosk's notice (a notice
        retried on a new connection)."""
        state = IssuanceState(state)  # a spelling no state has never enters the ledger
        rec = self.issuance(issuance_id)
        if rec.state in ISSUANCE_NOTICED:
            return
        self._fact(state.value, rec, at)
        self.conn.execute(
            "UPDATE issuances SET state = ?, changed = ? WHERE id = ?", (state.value, _iso(at), issuance_id)
        )

    def expire_stale(self, at: datetime, created_before: datetime, sent_before: datetime) -> list[str]:
        """Every issuance still `created` (its document was streaming) since before `created_before`,
        or `sent` (awaiting its notice) since before `sent_before`, is expired: its center died, or
        its kiosk went away. Expired, not cancelled: a document whose "sent" was lost with its center
        may have been printed, and a late notice must still be taken (`record_notice` does). A fixed
        month's rows are never modified (BIZ-6). The ids expired."""
        stale = [
            r[0]
            for r in self.conn.execute(
                "SELECT id FROM issuances WHERE ((state = ? AND coalesce(changed, '') < ?)"
                " OR (state = ? AND coalesce(changed, '') < ?)) AND month NOT IN (SELECT month FROM months)",
                (IssuanceState.STREAMING.value, _iso(created_before), IssuanceState.SENT.value, _iso(sent_before)),
            )
        ]
        for iid in stale:
            self.set_state(iid, IssuanceState.EXPIRED, at)
        return stale

    def unfinished(self) -> dict[IssuanceState, int]:
        """How many issuances are in each unfinished state."""
        rows = self.conn.execute(
            f"SELECT state, count(*) FROM issuances WHERE state IN ({', '.join('?' * len(UNFINISHED))}) GROUP BY state",
            [state.value for state in UNFINISHED],
        )
        return {IssuanceState(state): n for state, n in rows}

    def record_notice(
        self, issuance_id: str, at: datetime | str, copies: int, fee: int, refunded: bool = False
    ) -> bool:
        """The completion notice: payment, one row per copy, refund if misprinted. False when a duplicate."""
        rec = self.issuance(issuance_id)
        if rec.month in self._fixed:
            raise MonthFixed(rec.month, f"notice for {issuance_id}")
        at_s = at if isinstance(at, str) else at.isoformat()
        cur = self.conn.execute(
            "INSERT INTO notices VALUES (?, ?) ON CONFLICT (issuance_id) DO NOTHING", (issuance_id, at_s)
        )
        if cur.rowcount == 0:
            return False
        self._fact("notice", rec, at, copies=copies, amount=fee, detail={"refunded": refunded})
        self._fact("payment", rec, at, amount=fee)
        for no in range(1, copies + 1):
            self._fact("copy", rec, at, copies=1, detail={"no": no, "stamp": VOID_STAMP if refunded else None})
        if refunded:
            self._fact("refund", rec, at, amount=-fee, detail={"reason": "misprint", "stamp": VOID_STAMP})
        self.conn.execute(
            "UPDATE issuances SET state = ?, changed = ? WHERE id = ?",
            ((IssuanceState.REFUNDED if refunded else IssuanceState.COMPLETED).value, at_s, issuance_id),
        )
        return True

    def record_correction(self, issuance_id: str, at: datetime | str, copies: int, fee: int, reason: str) -> int:
        """A correction amends a noticed issuance's copies and fee, until its month is fixed (001 §13.2)."""
        rec = self.issuance(issuance_id)
        if rec.month in self._fixed:
            raise MonthFixed(rec.month, f"correction of {issuance_id}")
        if self.conn.execute("SELECT 1 FROM notices WHERE issuance_id = ?", (issuance_id,)).fetchone() is None:
            raise UnknownIssuance(f"issuance {issuance_id} has no completion notice yet; nothing to correct")
        return self._fact("correction", rec, at, copies=copies, amount=fee, detail={"reason": reason})

    def fix_month(self, month: str, at: datetime | str, report: dict[str, Any]) -> None:
        if month in self._fixed:
            raise MonthFixed(month, "fixing it again")
        self.append("month-fixed", at, detail={"month": month})
        self.conn.execute(
            "INSERT INTO months VALUES (?, ?, ?)",
            (
                month,
                at if isinstance(at, str) else at.isoformat(),
                json.dumps(report, ensure_ascii=False, sort_keys=True),
            ),
        )
        self._fixed.add(month)

    def record_outage(self, scope: str, start: datetime, end: datetime, cause: str = "") -> None:
        self.conn.execute(
            "INSERT INTO outages (scope, start, end, cause) VALUES (?, ?, ?, ?)",
            (scope, start.isoformat(), end.isoformat(), cause),
        )

    # -- reading -----------------------------------------------------------------------------

    def issuance(self, issuance_id: str) -> IssuanceRecord:
        row = self.conn.execute("SELECT * FROM issuances WHERE id = ?", (issuance_id,)).fetchone()
        if row is None:
            raise UnknownIssuance(f"issuance {issuance_id} is not in the ledger")
        return IssuanceRecord(**{**dict(row), "state": IssuanceState(row["state"])})

    def find_issuance(self, issuance_id: str) -> IssuanceRecord | None:
        try:
            return self.issuance(issuance_id)
        except UnknownIssuance:
            return None

    def entries(self, month: str | None = None) -> list[dict[str, Any]]:
        sql, args = "SELECT * FROM entries", list[str]()
        if month is not None:
            sql, args = sql + " WHERE month = ?", [month]
        return [dict(r) for r in self.conn.execute(sql + " ORDER BY seq", args)]

    def fixed_report(self, month: str) -> dict[str, Any] | None:
        row = self.conn.execute("SELECT report FROM months WHERE month = ?", (month,)).fetchone()
        report: dict[str, Any] | None = json.loads(row[0]) if row else None
        return report

    def outages(self) -> list[tuple[str, datetime, datetime]]:
        return [
            (r[0], datetime.fromisoformat(r[1]), datetime.fromisoformat(r[2]))
            for r in self.conn.execute("SELECT scope, start, end FROM outages ORDER BY start")
        ]

    def count(self, kind: str) -> int:
        n: int = self.conn.execute("SELECT count(*) FROM entries WHERE kind = ?", (kind,)).fetchone()[0]
        return n

    def verify(self) -> int:
        """Walk the hash chain; the number of rows when intact, else LedgerTampered naming the first bad row."""
        prev, n = GENESIS, 0
        for row in self.conn.execute("SELECT * FROM entries ORDER BY seq"):
            row = dict(row)
            n += 1
            if row["seq"] != n or row["prev_hash"] != prev or chain_hash(prev, row) != row["hash"]:
                raise LedgerTampered(
                    f"ledger {self.path}: row {row['seq']} ({row['kind']}) does not match the hash chain; "
                    "it was changed, removed or reordered outside konbini"
                )
            prev = row["hash"]
        return n

    # -- batches (the writer task) -----------------------------------------------------------

    def run_batch(self, batch: list[_Op]) -> None:
        """Run every operation in one transaction, a savepoint each; commit once."""
        try:
            with self.transaction():
                for op in batch:
                    last, fixed = self._last_hash, set(self._fixed)
                    self.conn.execute("SAVEPOINT op")
                    try:
                        op.result = op.fn(self, *op.args)
                    except Exception as exc:  # the operation's own refusal; its neighbours go on
                        self.conn.execute("ROLLBACK TO op")
                        self._last_hash, self._fixed = last, fixed
                        op.error = exc
                    self.conn.execute("RELEASE op")
        except sqlite3.Error as exc:
            for op in batch:
                op.error = op.error or LedgerError(f"ledger {self.path}: commit failed ({exc})")


@dataclass(eq=False)
class _Op:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    done: trio.Event = field(default_factory=trio.Event)
    result: Any = None
    error: BaseException | None = None
    waited: bool = True


class Ledger:
    """The Trio face of a LedgerDB: `await ledger.call(LedgerDB.method, *args)`, committed in batches."""

    def __init__(self, db: LedgerDB) -> None:
        self.db = db
        self._send, self._recv = trio.open_memory_channel[_Op](4096)
        self.batches = 0
        self.ops = 0

    @classmethod
    def open(cls, path: str | Path) -> Ledger:
        return cls(LedgerDB(path))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The one writer: take what is waiting, commit it as one batch, wake the callers."""
        task_status.started()
        async for first in self._recv:
            batch = [first]
            while len(batch) < BATCH_MAX:
                try:
                    batch.append(self._recv.receive_nowait())
                except trio.WouldBlock:
                    break
            if not any(op.waited for op in batch):
                # Nobody waits on these facts (an issuance "sent"): let them ride with the next commit
                # someone does wait for, instead of paying an fsync of their own.
                with trio.move_on_after(LAZY_FLUSH):
                    while len(batch) < BATCH_MAX and not batch[-1].waited:
                        batch.append(await self._recv.receive())
            # Not cancellable: a started commit always finishes and its callers are told.
            await trio.to_thread.run_sync(self.db.run_batch, batch)
            self.batches += 1
            self.ops += len(batch)
            for op in batch:
                op.done.set()

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        op = _Op(fn, args)
        await self._send.send(op)
        await op.done.wait()
        if op.error is not None:
            raise op.error
        return op.result

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Fire and forget (a fact nobody waits on); dropped with a log line only if the queue is full."""
        try:
            self._send.send_nowait(_Op(fn, args, waited=False))
        except trio.WouldBlock:
            import logging

            logging.getLogger("konbini.ledger").error("ledger queue full; %s dropped", getattr(fn, "__name__", fn))


def ledger_path(ledger: str | None, state_dir: str | Path) -> str:
    """The topology's `ledger:` value resolved: default <state_dir>/ledger.sqlite; relative paths
    live inside the state directory; ":memory:" keeps it in memory (for comparison runs only)."""
    if ledger == MEMORY:
        return MEMORY
    if not ledger:
        return str(Path(state_dir) / "ledger.sqlite")
    p = Path(ledger)
    return str(p if p.is_absolute() else Path(state_dir) / p)
