"""Where an issuance center keeps its kiosk sessions: in its memory, or shared by its workers.

One center process keeps them in a dict (`LocalSessions`). Several workers serving one center on
one address (SO_REUSEPORT) cannot: a relay that pools its upstream connections (HAProxy does)
sends a kiosk's challenge to one worker and its answer to another. `SharedSessions` keeps them in
one SQLite file every worker opens, and makes every move of a session's state machine a
compare-and-set (`UPDATE ... WHERE state = <the state it was read in>`): of two workers answering
one challenge, or issuing on one session, one wins and the other is told (`SessionMoved`), so
"a challenge is answered once, a session is used for one issuance" holds across processes.

Sessions live SESSION_TTL seconds and need no durability beyond that: the file is WAL with
synchronous=OFF (consistent between processes, no fsync per move), and the calls are made
in the event loop: each is one short statement, cheaper than a hop to a thread. Both stores drop expired
sessions at every new one. `created` is time.monotonic(), one clock for every process on Linux.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from gateway.business.session import Session, SessionEvent, SessionState

SCHEMA = (
    # named anew when its columns change: a session lives two minutes, an old file's table is left to lie
    """CREATE TABLE IF NOT EXISTS kiosk_sessions (
        id TEXT PRIMARY KEY, kiosk TEXT NOT NULL, store TEXT NOT NULL, challenge BLOB NOT NULL,
        created REAL NOT NULL, state TEXT NOT NULL, card TEXT, card_id TEXT)""",
    "CREATE INDEX IF NOT EXISTS kiosk_sessions_created ON kiosk_sessions(created)",
)


class SessionMoved(Exception):
    """Another worker moved this session first (answered its challenge, started its issuance)."""


class LocalSessions:
    """One process's sessions, in creation order (so expiry costs what it drops)."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._by_id: dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def add(self, s: Session) -> None:
        cutoff = time.monotonic() - self.ttl
        while self._by_id:
            sid, old = next(iter(self._by_id.items()))
            if old.created >= cutoff:
                break
            del self._by_id[sid]
        self._by_id[s.id] = s

    def get(self, sid: str) -> Session | None:
        s = self._by_id.get(sid)
        if s is not None and time.monotonic() - s.created > self.ttl:
            del self._by_id[sid]
            return None
        return s

    def fire(self, s: Session, event: SessionEvent) -> SessionState:
        return s.fire(event)


class SharedSessions:
    """The sessions of every worker of one center, in one SQLite file."""

    def __init__(self, path: str | Path, ttl: float) -> None:
        self.ttl = ttl
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA busy_timeout=5000")
        for attempt in range(100):  # workers starting together: see LedgerDB._set_wal
            try:
                self.conn.execute("PRAGMA journal_mode=WAL")
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or attempt == 99:
                    raise
                time.sleep(0.05)
        self.conn.execute("PRAGMA synchronous=OFF")
        with self.conn:  # one worker creates the table; the others find it
            for statement in SCHEMA:
                self.conn.execute(statement)

    def close(self) -> None:
        self.conn.close()

    def __len__(self) -> int:
        n: int = self.conn.execute(
            "SELECT count(*) FROM kiosk_sessions WHERE created >= ?", (time.monotonic() - self.ttl,)
        ).fetchone()[0]
        return n

    def add(self, s: Session) -> None:
        with self.conn:
            self.conn.execute("DELETE FROM kiosk_sessions WHERE created < ?", (time.monotonic() - self.ttl,))
            self.conn.execute(
                "INSERT INTO kiosk_sessions VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (s.id, s.kiosk, s.store, s.challenge, s.created, s.state.value, s.card, s.card_id),
            )

    def get(self, sid: str) -> Session | None:
        """The session as the file has it now (another worker may have moved it since)."""
        row = self.conn.execute(
            "SELECT kiosk, store, challenge, created, state, card, card_id FROM kiosk_sessions WHERE id = ?", (sid,)
        ).fetchone()
        if row is None or time.monotonic() - row[3] > self.ttl:
            return None
        kiosk, store, challenge, created, state, card, card_id = row
        return Session(sid, kiosk, store, challenge, created, SessionState(state), card, card_id)

    def fire(self, s: Session, event: SessionEvent) -> SessionState:
        """`s.fire(event)`, written only if no other worker moved the session since it was read.
        A CANCEL always ends the session here; any other event finding it moved raises SessionMoved
        and leaves `s` as it was."""
        old = s.state
        s.require(event)
        new: SessionState = s.TABLE[old, event]
        if event is SessionEvent.CANCEL:
            self.conn.execute(
                "UPDATE kiosk_sessions SET state = ? WHERE id = ? AND state NOT IN (?, ?)",
                (new.value, s.id, SessionState.DONE.value, SessionState.CLOSED.value),
            )
        else:
            cur = self.conn.execute(
                "UPDATE kiosk_sessions SET state = ?, card = ?, card_id = ? WHERE id = ? AND state = ?",
                (new.value, s.card, s.card_id, s.id, old.value),
            )
            if cur.rowcount != 1:
                raise SessionMoved(f"session {s.id}: moved by another worker before {event.name}")
        s.state = new
        return new
