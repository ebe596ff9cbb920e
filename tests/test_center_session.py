"""The issuance center's session and issuance life cycle, exhaustively and without a socket.

Every (state, event) pair of both tables moves where the table says; every pair outside them
raises LifecycleError naming role, state and event and changes nothing; a cancel anywhere ends
the request so that nothing can afterwards be sealed or delivered (INT-1). The issue request's
two pure steps (decide, seal) are checked against the same machines.
"""

from __future__ import annotations

import base64
import itertools
from collections import deque

import msgspec
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.business.session import (
    ISSUANCE_DELIVERED,
    ISSUANCE_TRANSITIONS,
    SESSION_FINAL,
    SESSION_TRANSITIONS,
    Issuance,
    IssuanceEvent,
    IssuanceState,
    LifecycleError,
    Session,
    SessionEvent,
    SessionState,
)
from gateway.nodes.center.issuing import Go, Refuse, decide, seal
from gateway.protocol.messages import Binding, IssueRequest
from tests.conftest import TEST_TIME

MUNI_A = "131016"
KEY = ec.generate_private_key(ec.SECP256R1())


def new_session() -> Session:
    return Session("sess-1", "kiosk-a1-1", "store-a1", b"c" * 32, 0.0)


def new_issuance() -> Issuance:
    return Issuance("iss-1", "sess-1", "kiosk-a1-1", "store-a1", MUNI_A, "residence-record", 1, 200)


def events_to(table: dict, start, goal) -> list:
    """The shortest legal event sequence from `start` to `goal` (states are reached, never set)."""
    seen, queue = {start: []}, deque([start])
    while queue:
        state = queue.popleft()
        for (src, event), dst in table.items():
            if src is state and dst not in seen:
                seen[dst] = [*seen[state], event]
                queue.append(dst)
    return seen[goal]


def session_in(state: SessionState) -> Session:
    s = new_session()
    for event in events_to(SESSION_TRANSITIONS, SessionState.CHALLENGED, state):
        s.fire(event)
    assert s.state is state
    return s


def issuance_in(state: IssuanceState) -> Issuance:
    iss = new_issuance()
    for event in events_to(ISSUANCE_TRANSITIONS, IssuanceState.STREAMING, state):
        iss.fire(event)
    assert iss.state is state
    return iss


# -- the tables ---------------------------------------------------------------------------------


def test_every_state_of_both_machines_is_reachable_from_the_start():
    for state in SessionState:
        session_in(state)
    for state in IssuanceState:
        issuance_in(state)


@pytest.mark.parametrize("pair", list(SESSION_TRANSITIONS), ids=lambda p: f"{p[0].name}-{p[1].name}")
def test_session_moves_as_the_table_says(pair):
    state, event = pair
    s = session_in(state)
    assert s.can(event)
    assert s.fire(event) is SESSION_TRANSITIONS[pair] is s.state


SESSION_ILLEGAL = [p for p in itertools.product(SessionState, SessionEvent) if p not in SESSION_TRANSITIONS]


@pytest.mark.parametrize("pair", SESSION_ILLEGAL, ids=lambda p: f"{p[0].name}-{p[1].name}")
def test_session_refuses_every_pair_outside_the_table(pair):
    state, event = pair
    s = session_in(state)
    assert not s.can(event)
    with pytest.raises(LifecycleError) as err:
        s.fire(event)
    assert (err.value.role, err.value.state, err.value.event) == ("session", state, event)
    assert str(err.value) == f"session: event {event.name} not allowed in state {state.name}"
    assert s.state is state  # a refused event changes nothing


@pytest.mark.parametrize("pair", list(ISSUANCE_TRANSITIONS), ids=lambda p: f"{p[0].name}-{p[1].name}")
def test_issuance_moves_as_the_table_says(pair):
    state, event = pair
    iss = issuance_in(state)
    assert iss.can(event)
    assert iss.fire(event) is ISSUANCE_TRANSITIONS[pair] is iss.state


ISSUANCE_ILLEGAL = [p for p in itertools.product(IssuanceState, IssuanceEvent) if p not in ISSUANCE_TRANSITIONS]


@pytest.mark.parametrize("pair", ISSUANCE_ILLEGAL, ids=lambda p: f"{p[0].name}-{p[1].name}")
def test_issuance_refuses_every_pair_outside_the_table(pair):
    state, event = pair
    iss = issuance_in(state)
    assert not iss.can(event)
    with pytest.raises(LifecycleError) as err:
        iss.fire(event)
    assert (err.value.role, err.value.state, err.value.event) == ("issuance", state, event)
    assert "issuance" in str(err.value) and state.name in str(err.value) and event.name in str(err.value)
    assert iss.state is state


def test_the_tables_cover_every_pair_exactly_once_between_legal_and_illegal():
    assert len(SESSION_TRANSITIONS) + len(SESSION_ILLEGAL) == len(SessionState) * len(SessionEvent)
    assert len(ISSUANCE_TRANSITIONS) + len(ISSUANCE_ILLEGAL) == len(IssuanceState) * len(IssuanceEvent)


def test_a_session_serves_one_challenge_answer_and_one_issuance():
    s = new_session()
    for event in (SessionEvent.ANSWER, SessionEvent.VERIFIED, SessionEvent.ISSUE, SessionEvent.SEAL):
        s.fire(event)
    assert s.state is SessionState.DONE and s.finished
    for event in (SessionEvent.ANSWER, SessionEvent.ISSUE, SessionEvent.SEAL):
        assert not s.can(event)


def test_a_rejected_answer_burns_the_challenge():
    s = new_session()
    s.fire(SessionEvent.ANSWER)
    assert not s.can(SessionEvent.ANSWER)  # a second answer while the first is checked is refused
    s.fire(SessionEvent.REJECTED)
    assert s.state is SessionState.CLOSED and not s.can(SessionEvent.ANSWER)


def test_states_read_as_their_wire_text_for_the_ledger_and_reports():
    assert IssuanceState.COMPLETED == "completed" and IssuanceState.CANCELLED.value == "cancelled"
    assert SessionState.CLOSED == "closed"


# -- cancel anywhere cancels the whole request (INT-1) ---------------------------------------


@pytest.mark.parametrize("state", list(SessionState), ids=lambda s: s.name)
def test_a_cancel_at_every_session_state_ends_it_and_nothing_is_sealed_after(state):
    s = session_in(state)
    s.fire(SessionEvent.CANCEL)
    assert s.state in SESSION_FINAL
    assert s.state is (SessionState.DONE if state is SessionState.DONE else SessionState.CLOSED)
    for event in SessionEvent:
        if event is not SessionEvent.CANCEL:
            with pytest.raises(LifecycleError):
                s.fire(event)
    s.fire(SessionEvent.CANCEL)  # a second cancel (the timeout and the reset both fire) is harmless
    assert s.state in SESSION_FINAL


@pytest.mark.parametrize("state", list(IssuanceState), ids=lambda s: s.name)
def test_a_cancel_at_every_issuance_state_cancels_it_unless_already_delivered(state):
    iss = issuance_in(state)
    iss.fire(IssuanceEvent.CANCEL)
    if state in ISSUANCE_DELIVERED:
        assert iss.state is state and iss.delivered  # the document has left; its notice still settles it
        return
    assert iss.state is IssuanceState.CANCELLED and not iss.delivered
    for event in (IssuanceEvent.SEAL, IssuanceEvent.NOTICE):
        with pytest.raises(LifecycleError):
            iss.fire(event)


# -- the pure steps of an issue request -------------------------------------------------------


def issuing_pair() -> tuple[Session, Issuance]:
    s = session_in(SessionState.AUTHENTICATED)
    s.card = "f" * 64
    s.fire(SessionEvent.ISSUE)
    return s, new_issuance()


def test_seal_binds_the_document_to_this_issuance_session_kiosk_and_card():
    s, iss = issuing_pair()
    trailers = dict(seal(KEY, s, iss, "a" * 64, 123))
    blob = base64.b64decode(trailers[b"konbini-binding"])
    KEY.public_key().verify(base64.b64decode(trailers[b"konbini-signature"]), blob, ec.ECDSA(hashes.SHA256()))
    assert msgspec.json.decode(blob, type=Binding) == Binding(
        "iss-1", "sess-1", "kiosk-a1-1", "f" * 64, "a" * 64, 123, "residence-record", 1, 200
    )
    assert (s.state, iss.state) == (SessionState.ISSUING, IssuanceState.STREAMING)  # sealing moves nothing


@pytest.mark.parametrize("state", list(SessionState), ids=lambda s: s.name)
def test_nothing_is_sealed_for_a_cancelled_session_whatever_its_state(state):
    s = session_in(state)
    s.fire(SessionEvent.CANCEL)
    with pytest.raises(LifecycleError, match="session"):
        seal(KEY, s, new_issuance(), "a" * 64, 1)


@pytest.mark.parametrize("state", [s for s in IssuanceState if s is not IssuanceState.STREAMING], ids=lambda s: s.name)
def test_nothing_is_sealed_twice_nor_after_a_cancel(state):
    s, _ = issuing_pair()
    iss = issuance_in(state)
    with pytest.raises(LifecycleError, match="issuance"):
        seal(KEY, s, iss, "a" * 64, 1)
    iss = new_issuance()
    iss.fire(IssuanceEvent.CANCEL)
    with pytest.raises(LifecycleError, match="issuance"):
        seal(KEY, s, iss, "a" * 64, 1)


@pytest.mark.parametrize(
    "state, status",
    [(s, 403 if s is SessionState.CHALLENGED else 409) for s in SessionState if s is not SessionState.AUTHENTICATED],
    ids=lambda v: getattr(v, "name", str(v)),
)
def test_decide_refuses_an_issue_unless_the_session_is_authenticated_and_unused(topo, state, status):
    verdict = decide(
        session_in(state),
        IssueRequest(MUNI_A, "residence-record"),
        TEST_TIME,
        topo.service_hours,
        topo.municipalities(),
    )
    assert verdict == Refuse(status, "session-state")


def test_decide_lets_an_authenticated_request_go_with_its_fee_and_a_capped_size(topo):
    s = session_in(SessionState.AUTHENTICATED)
    munis = topo.municipalities()
    assert decide(s, IssueRequest(MUNI_A, "residence-record"), TEST_TIME, topo.service_hours, munis) == Go(
        200, 64 * 1024
    )
    big = IssueRequest(MUNI_A, "residence-record", copies=2, size=1 << 40)
    assert decide(s, big, TEST_TIME, topo.service_hours, munis) == Go(400, 64 * 1024 * 1024)
    assert s.state is SessionState.AUTHENTICATED  # deciding moves nothing


@pytest.mark.parametrize(
    "muni, at, reason",
    [
        ("999999", TEST_TIME, "municipality-unknown"),
        (MUNI_A, TEST_TIME.replace(hour=5), "outside-hours"),
    ],
)
def test_decide_passes_business_refusals_through_and_leaves_the_session_usable(topo, muni, at, reason):
    s = session_in(SessionState.AUTHENTICATED)
    verdict = decide(s, IssueRequest(muni, "residence-record"), at, topo.service_hours, topo.municipalities())
    assert isinstance(verdict, Refuse) and (verdict.status, verdict.reason) == (403, reason)
    assert s.can(SessionEvent.ISSUE)


def test_a_misprint_notice_refunds_the_issuance_and_a_repeat_keeps_the_first_notices_word():
    """The center's memory says what the ledger says (LedgerDB.record_notice): refunded for a
    misprint's notice, and a repeated notice, of either kind, changes nothing."""
    iss = issuance_in(IssuanceState.SENT)
    assert iss.fire(IssuanceEvent.REFUND) is IssuanceState.REFUNDED and iss.delivered and iss.finished
    for event in (IssuanceEvent.NOTICE, IssuanceEvent.REFUND, IssuanceEvent.CANCEL):
        assert iss.fire(event) is IssuanceState.REFUNDED
    iss = issuance_in(IssuanceState.COMPLETED)
    assert iss.fire(IssuanceEvent.REFUND) is IssuanceState.COMPLETED
    assert not issuance_in(IssuanceState.STREAMING).can(IssuanceEvent.REFUND)  # nothing delivered, nothing refunded
