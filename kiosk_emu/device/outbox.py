"""The kiosk's durable outbox of completion notices (BIZ-5: exactly once in effect).

A notice is written here (SQLite, synchronous=FULL) before the resident is told the issuance
is done; it is then sent, and resent with capped exponential backoff until the center
acknowledges it. The center deduplicates by issuance id, so "at least once" from here becomes
"exactly once" in the ledger. A notice the center refuses for good (a 4xx: unknown issuance,
month fixed) is kept as `rejected` with its reason for staff, never silently dropped.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

BACKOFF_BASE = 0.2  # seconds
BACKOFF_CAP = 60.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS notices (
    issuance_id TEXT PRIMARY KEY,
    path TEXT NOT NULL,
    body BLOB NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL DEFAULT 0,
    reason TEXT
);
CREATE INDEX IF NOT EXISTS notices_pending ON notices(state, next_at);
"""


def backoff(attempts: int) -> float:
    """Seconds to wait after `attempts` failed sends: 0.2, 0.4, 0.8, ... capped at a minute."""
    return min(BACKOFF_CAP, BACKOFF_BASE * 2 ** max(0, attempts - 1))


@dataclass(frozen=True)
class Pending:
    issuance_id: str
    path: str
    body: bytes
    attempts: int


class Outbox:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.execute("PRAGMA busy_timeout=5000")
        self.conn.executescript(_SCHEMA)

    @classmethod
    def of_kiosk(cls, state_dir: Path, kiosk_id: str) -> Outbox:
        return cls(Path(state_dir) / "outbox" / f"{kiosk_id}.sqlite")

    def close(self) -> None:
        self.conn.close()

    def hold(self, issuance_id: str, path: str, body: bytes) -> None:
        """Before printing: the notice that must go out if the kiosk dies before the print is
        confirmed (the job refunded). Held, not sent, until `confirm` or `release_held`."""
        self.conn.execute(
            "INSERT INTO notices (issuance_id, path, body, state) VALUES (?, ?, ?, 'held') "
            "ON CONFLICT (issuance_id) DO NOTHING",
            (issuance_id, path, body),
        )

    def confirm(self, issuance_id: str, path: str, body: bytes) -> None:
        """After printing: the held notice becomes the real one, due now (durable on return)."""
        self.conn.execute(
            "INSERT INTO notices (issuance_id, path, body) VALUES (?, ?, ?) ON CONFLICT (issuance_id) "
            "DO UPDATE SET path = excluded.path, body = excluded.body, state = 'pending' WHERE state = 'held'",
            (issuance_id, path, body),
        )

    def release_held(self) -> int:
        """At kiosk start: a held notice means the kiosk died between payment and a confirmed print;
        the job is refunded and its copies void (BIZ-4), so the held refund notice goes out."""
        return self.conn.execute("UPDATE notices SET state = 'pending' WHERE state = 'held'").rowcount

    def due(self, now: float, limit: int = 100) -> list[Pending]:
        rows = self.conn.execute(
            "SELECT issuance_id, path, body, attempts FROM notices WHERE state = 'pending' AND next_at <= ? "
            "ORDER BY next_at LIMIT ?",
            (now, limit),
        )
        return [Pending(*r) for r in rows]

    def next_due(self) -> float | None:
        row = self.conn.execute("SELECT min(next_at) FROM notices WHERE state = 'pending'").fetchone()
        return row[0]

    def acked(self, issuance_id: str) -> None:
        self.conn.execute("UPDATE notices SET state = 'acked', reason = NULL WHERE issuance_id = ?", (issuance_id,))

    def rejected(self, issuance_id: str, reason: str) -> None:
        self.conn.execute(
            "UPDATE notices SET state = 'rejected', reason = ? WHERE issuance_id = ?", (reason, issuance_id)
        )

    def failed(self, issuance_id: str, now: float, reason: str) -> float:
        """Count a failed send; returns when to try again."""
        attempts = (
            self.conn.execute("SELECT attempts FROM notices WHERE issuance_id = ?", (issuance_id,)).fetchone()[0] + 1
        )
        at = now + backoff(attempts)
        self.conn.execute(
            "UPDATE notices SET attempts = ?, next_at = ?, reason = ? WHERE issuance_id = ?",
            (attempts, at, reason, issuance_id),
        )
        return at

    def states(self) -> dict[str, str]:
        return dict(self.conn.execute("SELECT issuance_id, state FROM notices"))
