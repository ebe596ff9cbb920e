"""The issuance center's side of a kiosk session and of its one issuance, as sans-IO state machines.

Theory of operation: the center keeps two small machines. A kiosk *session* is opened with a
fresh challenge, answered once with the card's signature, and then usable for exactly one
issuance. An *issuance* is born when the business rules let a request go, streams the
municipality's document through, and is delivered when the signed binding leaves with the
document's last bytes; the kiosk's completion notice then completes it, or, if none comes within
the center's bound (a kiosk cancelled after the document left), it expires. The center's I/O code
fires events at the machines and asks them what is allowed; the machines never touch a socket,
a clock, the ledger or the network. Two rules:
1. every transition is in SESSION_TRANSITIONS or ISSUANCE_TRANSITIONS; anything else raises
   LifecycleError naming the role, the state and the event;
2. CANCEL is allowed in every state and cancels the whole request (INT-1): before delivery it
   ends the session CLOSED and the issuance CANCELLED, from where nothing can be sealed,
   delivered or noticed; after delivery (or once final) it changes nothing, because a document
   that has left cannot be called back and its notice still has to settle it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import Any, ClassVar, Generic, TypeVar


class SessionState(StrEnum):
    CHALLENGED = "challenged"  # a fresh challenge is out, unanswered
    VERIFYING = "verifying"  # the answer is being checked; the challenge is spent either way
    AUTHENTICATED = "authenticated"  # the card is proven; one issuance may start
    ISSUING = "issuing"  # the session's issuance is streaming
    DONE = "done"  # its issuance was sealed and delivered
    CLOSED = "closed"  # refused or cancelled: usable for nothing more


class SessionEvent(Enum):
    ANSWER = "answer"  # the kiosk answers the challenge
    VERIFIED = "verified"  # signature, chain, validity and revocation all good
    REJECTED = "rejected"  # any of those failed
    ISSUE = "issue"  # the business rules let an issuance go
    SEAL = "seal"  # the signed binding went out with the document
    CANCEL = "cancel"  # a timeout, reset or failure anywhere in the request


class IssuanceState(StrEnum):
    """One vocabulary for the center's memory and the ledger's rows: the values are what the
    ledger stores (gateway/business/ledger.py), so they never change spelling."""

    STREAMING = "created"  # recorded in the ledger ("created" there); the document is on its way
    SENT = "sent"  # delivered with its signed binding
    COMPLETED = "completed"  # the kiosk's completion notice is in
    REFUNDED = "refunded"  # the notice is in, saying the print failed and the fee went back (BIZ-4)
    CANCELLED = "cancelled"  # cancelled whole; never delivered
    EXPIRED = "expired"  # delivered, but no completion notice came within the center's bound


class IssuanceEvent(Enum):
    SEAL = "seal"
    NOTICE = "notice"  # a completion notice (a repeat is a duplicate, acknowledged again)
    REFUND = "refund"  # a completion notice of a misprint, refunded
    CANCEL = "cancel"
    EXPIRE = "expire"  # the center stops waiting for the notice (a late one still reaches the ledger)


# Every issuance ends within a bound (seconds): one not delivered within DELIVERY_TIMEOUT is
# cancelled; one delivered whose completion notice is not in within NOTICE_TTL expires.
DELIVERY_TIMEOUT = 120.0
NOTICE_TTL = 120.0

SS, SE = SessionState, SessionEvent
IS, IE = IssuanceState, IssuanceEvent

SESSION_TRANSITIONS: dict[tuple[SessionState, SessionEvent], SessionState] = {
    (SS.CHALLENGED, SE.ANSWER): SS.VERIFYING,
    (SS.VERIFYING, SE.VERIFIED): SS.AUTHENTICATED,
    (SS.VERIFYING, SE.REJECTED): SS.CLOSED,
    (SS.AUTHENTICATED, SE.ISSUE): SS.ISSUING,
    (SS.ISSUING, SE.SEAL): SS.DONE,
    # rule 2: a cancel ends every unfinished session; a finished one stays as it is
    (SS.CHALLENGED, SE.CANCEL): SS.CLOSED,
    (SS.VERIFYING, SE.CANCEL): SS.CLOSED,
    (SS.AUTHENTICATED, SE.CANCEL): SS.CLOSED,
    (SS.ISSUING, SE.CANCEL): SS.CLOSED,
    (SS.DONE, SE.CANCEL): SS.DONE,
    (SS.CLOSED, SE.CANCEL): SS.CLOSED,
}
SESSION_FINAL = frozenset({SS.DONE, SS.CLOSED})

ISSUANCE_TRANSITIONS: dict[tuple[IssuanceState, IssuanceEvent], IssuanceState] = {
    (IS.STREAMING, IE.SEAL): IS.SENT,
    (IS.SENT, IE.NOTICE): IS.COMPLETED,
    (IS.SENT, IE.REFUND): IS.REFUNDED,
    # a repeated notice is a duplicate: the first one settled the issuance, as in the ledger
    (IS.COMPLETED, IE.NOTICE): IS.COMPLETED,
    (IS.COMPLETED, IE.REFUND): IS.COMPLETED,
    (IS.REFUNDED, IE.NOTICE): IS.REFUNDED,
    (IS.REFUNDED, IE.REFUND): IS.REFUNDED,
    # rule 2: before delivery a cancel cancels whole; a delivered document cannot be called back
    (IS.STREAMING, IE.CANCEL): IS.CANCELLED,
    (IS.SENT, IE.CANCEL): IS.SENT,
    (IS.COMPLETED, IE.CANCEL): IS.COMPLETED,
    (IS.REFUNDED, IE.CANCEL): IS.REFUNDED,
    (IS.CANCELLED, IE.CANCEL): IS.CANCELLED,
    (IS.SENT, IE.EXPIRE): IS.EXPIRED,
    (IS.EXPIRED, IE.CANCEL): IS.EXPIRED,
}
ISSUANCE_DELIVERED = frozenset({IS.SENT, IS.COMPLETED, IS.REFUNDED, IS.EXPIRED})
ISSUANCE_FINAL = frozenset({IS.COMPLETED, IS.REFUNDED, IS.CANCELLED, IS.EXPIRED})
ISSUANCE_NOTICED = frozenset({IS.COMPLETED, IS.REFUNDED})  # settled by a notice: the ledger keeps that state


class LifecycleError(Exception):
    """An event the center's machines do not allow in this state (a center bug or a replayed
    request, never something to act on): names the role, the state and the event."""

    def __init__(self, role: str, state: Enum, event: Enum) -> None:
        self.role, self.state, self.event = role, state, event
        super().__init__(f"{role}: event {event.name} not allowed in state {state.name}")


StateT = TypeVar("StateT", bound=Enum)
EventT = TypeVar("EventT", bound=Enum)


class _Lifecycle(Generic[StateT, EventT]):
    """What Session and Issuance share: a state, a table, and the one way to move."""

    ROLE: ClassVar[str]
    TABLE: ClassVar[Mapping[tuple[Any, Any], Any]]  # (StateT, EventT) -> StateT; a ClassVar cannot say so
    state: StateT

    def can(self, event: EventT) -> bool:
        return (self.state, event) in self.TABLE

    def require(self, event: EventT) -> None:
        """Raise LifecycleError unless `event` is allowed now (checks before an irreversible step)."""
        if (self.state, event) not in self.TABLE:
            raise LifecycleError(self.ROLE, self.state, event)

    def fire(self, event: EventT) -> StateT:
        self.require(event)
        self.state = self.TABLE[self.state, event]
        return self.state


@dataclass
class Session(_Lifecycle[SessionState, SessionEvent]):
    ROLE: ClassVar[str] = "session"
    TABLE: ClassVar[Mapping[tuple[Any, Any], Any]] = SESSION_TRANSITIONS

    id: str
    kiosk: str
    store: str
    challenge: bytes
    created: float  # monotonic seconds, for the session's time to live
    state: SessionState = SS.CHALLENGED
    card: str | None = None  # certificate fingerprint once authenticated
    card_id: str | None = None  # the card's opaque id (its certificate's subject): whose register entry to print

    @property
    def finished(self) -> bool:
        return self.state in SESSION_FINAL


@dataclass
class Issuance(_Lifecycle[IssuanceState, IssuanceEvent]):
    ROLE: ClassVar[str] = "issuance"
    TABLE: ClassVar[Mapping[tuple[Any, Any], Any]] = ISSUANCE_TRANSITIONS

    id: str
    session: str
    kiosk: str
    store: str
    municipality: str
    cert_type: str
    copies: int
    fee: int
    state: IssuanceState = IS.STREAMING
    notices: int = 0
    card: str = ""  # the card's opaque id, for the municipality's register and the ledger

    @property
    def delivered(self) -> bool:
        return self.state in ISSUANCE_DELIVERED

    @property
    def finished(self) -> bool:
        return self.state in ISSUANCE_FINAL
