"""Where the center keeps kiosk sessions: one process's memory, or a file its workers share.

The shared store must keep the session rules across processes: a session made by one worker is
found by another, a challenge is answered once and a session issues once even when two workers
try at the same moment, and expired sessions are dropped."""

from __future__ import annotations

import pytest

from gateway.business.session import LifecycleError, Session, SessionEvent, SessionState
from gateway.business.sessions import LocalSessions, SessionMoved, SharedSessions
from tests.forked import at_once


def new(sid: str = "s1", created: float | None = None) -> Session:
    import time

    return Session(sid, "kiosk-a1-1", "store-a1", b"c" * 32, time.monotonic() if created is None else created)


@pytest.fixture(params=["local", "shared"])
def stores(request, tmp_path):
    """Two views of one store: two workers' connections to the file, or one dict twice."""
    if request.param == "local":
        one = LocalSessions(120.0)
        yield one, one
        return
    a, b = SharedSessions(tmp_path / "s.sqlite", 120.0), SharedSessions(tmp_path / "s.sqlite", 120.0)
    yield a, b
    a.close()
    b.close()


def test_a_session_made_by_one_worker_moves_on_another(stores):
    a, b = stores
    a.add(new())
    s = b.get("s1")
    assert s is not None and (s.kiosk, s.challenge, s.state) == ("kiosk-a1-1", b"c" * 32, SessionState.CHALLENGED)
    b.fire(s, SessionEvent.ANSWER)
    s.card = "fingerprint"
    b.fire(s, SessionEvent.VERIFIED)
    again = a.get("s1")
    assert (again.state, again.card) == (SessionState.AUTHENTICATED, "fingerprint")
    with pytest.raises(LifecycleError):  # the machine's own rules still hold
        a.fire(again, SessionEvent.SEAL)


def test_of_two_workers_answering_one_challenge_one_wins(tmp_path):
    a, b = SharedSessions(tmp_path / "s.sqlite", 120.0), SharedSessions(tmp_path / "s.sqlite", 120.0)
    a.add(new())
    mine, theirs = a.get("s1"), b.get("s1")  # both read it CHALLENGED
    a.fire(mine, SessionEvent.ANSWER)
    with pytest.raises(SessionMoved):
        b.fire(theirs, SessionEvent.ANSWER)
    assert theirs.state is SessionState.CHALLENGED  # the loser's copy is left as it was
    b.fire(theirs, SessionEvent.CANCEL)  # a cancel always ends it ...
    assert a.get("s1").state is SessionState.CLOSED
    a.fire(mine, SessionEvent.CANCEL)
    assert a.get("s1").state is SessionState.CLOSED


def test_a_finished_session_stays_finished_whatever_cancels_it(tmp_path):
    a = SharedSessions(tmp_path / "s.sqlite", 120.0)
    a.add(new())
    s = a.get("s1")
    for event in (SessionEvent.ANSWER, SessionEvent.VERIFIED, SessionEvent.ISSUE, SessionEvent.SEAL):
        a.fire(s, event)
    stale = Session("s1", "kiosk-a1-1", "store-a1", b"c" * 32, s.created, SessionState.ISSUING)
    a.fire(stale, SessionEvent.CANCEL)  # a worker's late cancel of a delivered session
    assert a.get("s1").state is SessionState.DONE


def test_expired_sessions_are_gone_and_dropped_at_the_next_new_one(stores):
    a, b = stores
    a.add(new("old", created=0.0))
    assert b.get("old") is None
    a.add(new("fresh"))
    assert len(a) == len(b) == 1


def test_many_processes_issuing_on_one_session_issue_once(tmp_path):
    path = tmp_path / "s.sqlite"
    a = SharedSessions(path, 120.0)
    wins = 0
    for round_ in range(10):
        sid = f"s{round_}"
        a.add(new(sid))
        s = a.get(sid)
        for event in (SessionEvent.ANSWER, SessionEvent.VERIFIED):
            a.fire(s, event)
        results = at_once(_issue_once, [(str(path), sid)] * 4, timeout=30)
        assert results.count(True) == 1, results
        wins += 1
    assert wins == 10 and a.get("s9").state is SessionState.ISSUING


def _issue_once(start, won, path: str, sid: str) -> None:
    store = SharedSessions(path, 120.0)
    s = store.get(sid)
    start.wait(10)
    try:
        store.fire(s, SessionEvent.ISSUE)
        won.put(True)
    except SessionMoved:
        won.put(False)
    store.close()
