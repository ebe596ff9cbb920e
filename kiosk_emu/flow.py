"""The kiosk's issuance flow as a sans-IO state machine, shared by the Trio kiosk and the load generator.

Theory of operation: the driver asks the flow what to send, performs the I/O, and hands the
answers back; the flow never touches a socket, a file or a clock of its own. Steps follow the
kiosk flow of seed 000: card read → PIN + challenge signature → request → receive the document
→ pay → print → receipt → completion notice → erase. Three rules:
1. every transition is in TRANSITIONS; anything else raises FlowError naming state and event;
2. a document is accepted only if the center's signature covers exactly this session, this
   kiosk, this card and these bytes (INT-1); otherwise the flow ends MISDELIVERED and the
   driver reports it — a kiosk never prints someone else's certificate;
3. payment is the point of no return: a cancel or refusal is a transition only before PAID
   (nothing printed, nothing charged); from PAID the job ends printed and noticed, or refunded
   with every copy stamped 返金済・無効 (BIZ-4) — so the driver runs it where no cancel reaches.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum, StrEnum

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.business.certificate import resident_named
from gateway.business.refusal import Refusal
from gateway.protocol.messages import (
    AuthOk,
    AuthRequest,
    Binding,
    Challenge,
    CompletionNotice,
    IssueRequest,
    MisdeliveryReport,
)
from gateway.protocol.streams import Headers, header
from kiosk_emu import latency
from kiosk_emu.card import Card, PinLocked, WrongPin
from kiosk_emu.latency import add_server_timing


class State(Enum):
    START = "start"
    CHALLENGED = "challenged"
    AUTHENTICATED = "authenticated"
    RECEIVING = "receiving"
    VERIFIED = "verified"
    PAID = "paid"
    PRINTED = "printed"
    NOTIFIED = "notified"
    DONE = "done"  # spool erased
    REFUSED = "refused"
    MISDELIVERED = "misdelivered"
    CANCELLED = "cancelled"


S = State
TRANSITIONS: dict[tuple[State, str], State] = {
    (S.START, "challenge"): S.CHALLENGED,
    (S.CHALLENGED, "authenticated"): S.AUTHENTICATED,
    (S.AUTHENTICATED, "document-start"): S.RECEIVING,
    (S.RECEIVING, "document-verified"): S.VERIFIED,
    (S.RECEIVING, "document-rejected"): S.MISDELIVERED,
    (S.VERIFIED, "paid"): S.PAID,
    (S.PAID, "printed"): S.PRINTED,
    (S.PAID, "misprinted"): S.PRINTED,  # refunded; every copy stamped 返金済・無効 (BIZ-4)
    (S.PRINTED, "notice-acknowledged"): S.NOTIFIED,
    (S.PRINTED, "notice-queued"): S.NOTIFIED,  # durable in the kiosk's outbox, resent until acknowledged
    (S.NOTIFIED, "erased"): S.DONE,
}
# Before payment: a refusal, or a cancel/timeout that ends the whole request (rule 3).
BEFORE_PAYMENT = (S.START, S.CHALLENGED, S.AUTHENTICATED, S.RECEIVING, S.VERIFIED)
TRANSITIONS |= {(state, "refused"): S.REFUSED for state in BEFORE_PAYMENT}
TRANSITIONS |= {(state, "cancelled"): S.CANCELLED for state in BEFORE_PAYMENT}
FINAL = frozenset({S.DONE, S.REFUSED, S.MISDELIVERED, S.CANCELLED})


class Status(StrEnum):
    """How the request ended, as the resident (and the issuance log) sees it."""

    PENDING = "pending"
    ISSUED = "issued"
    REFUNDED = "refunded"  # printed, but the printer failed: the fee went back (BIZ-4)
    REFUSED = "refused"
    MISDELIVERED = "misdelivered"
    CANCELLED = "cancelled"


HEAD = 4096  # bytes of a document kept to read whose certificate it is (its metadata comes first)

# What the screen says when a request ends other than issued or refused (a refusal's words are
# its Refusal's).
SCREENS = {
    Status.MISDELIVERED: "This document could not be printed. Please ask staff; nothing was charged.",
    Status.CANCELLED: "The request was cancelled. Nothing was charged.",
    Status.REFUNDED: "The printer failed. Your fee has been refunded; every copy is stamped 返金済・無効 (void).",
}


class FlowError(Exception):
    """A transition the flow does not allow (a driver bug, never user input)."""

    def __init__(self, state: State, event: str) -> None:
        super().__init__(f"kiosk flow: event {event!r} not allowed in state {state.value!r}")


@dataclass
class Outcome:
    status: Status = Status.PENDING
    reason: str | None = None  # a Refusal when refused; a cancel's or a misdelivery's own word otherwise
    message: str | None = None
    tries_left: int | None = None
    issuance_id: str | None = None
    document_bytes: int = 0
    signature_valid: bool = False
    fee: int = 0
    charged: int = 0  # what the kiosk took: the fee once paid, 0 while a cancel is still honoured
    refunded: bool = False  # misprint: the fee went back to the resident
    notice_pending: bool = False  # the notice waits in the outbox for the center's acknowledgement
    hops: dict[str, float] = field(default_factory=dict)  # node id -> ms, summed over the steps
    split: dict[str, float] = field(default_factory=dict)  # latency part -> ms, summed over the requests
    requests_ms: float = 0.0  # time inside requests (open to end); the rest of the flow is the kiosk's own


class KioskFlow:
    def __init__(
        self,
        kiosk_id: str,
        card: Card,
        pin: str,
        request: IssueRequest,
        center_key: ec.EllipticCurvePublicKey | tuple[ec.EllipticCurvePublicKey, ...],
    ):
        """`center_key`: the issuance center's key, or every center's where a second one stands by
        (a DMZ relay that fails over sends the whole session to it, and it signs the binding)."""
        self.kiosk_id = kiosk_id
        self.card = card
        self.pin = pin
        self.request = request
        self.center_keys = center_key if isinstance(center_key, tuple) else (center_key,)
        self.state = S.START
        self.session: str | None = None
        self.outcome = Outcome()
        self.hop_kinds: dict[str, str] = {}
        self._digest = hashlib.sha256()
        self._head = b""

    def _go(self, event: str) -> None:
        nxt = TRANSITIONS.get((self.state, event))
        if nxt is None:
            raise FlowError(self.state, event)
        self.state = nxt

    @property
    def finished(self) -> bool:
        return self.state in FINAL

    def record_timing(self, headers: Headers | None) -> None:
        """Sum each hop's own time from the server-timing entries every hop adds."""
        add_server_timing(headers, self.outcome.hops)

    def record_request(self, headers: Headers | None, ttfb_ms: float, total_ms: float) -> None:
        """One request's latency split (kiosk_emu.latency) into the flow's running sum, its hops
        labelled by `hop_kinds` (server-timing name -> label; the load generator uses node kinds)."""
        latency.split(ttfb_ms, total_ms, headers, self.hop_kinds, self.outcome.split)
        self.outcome.requests_ms += total_ms

    def refuse(self, reason: Refusal | str, message: str | None = None, tries_left: int | None = None) -> None:
        """Refused, for a reason this konbini knows (a Refusal) or one it does not (an HTTP status, a
        newer center's reason). The screen shows the center's message; for the kiosk's own refusals
        their screen text; else the reason itself."""
        self._go("refused")
        o = self.outcome
        o.status, o.reason, o.tries_left = Status.REFUSED, Refusal.read(reason) or reason, tries_left
        if message is None and isinstance(o.reason, Refusal) and o.reason.message is None:
            message = o.reason.screen.format(tries=f"{tries_left} {'try' if tries_left == 1 else 'tries'}")
        o.message = message or reason

    def cancel(self, why: str = "cancelled") -> None:
        """A timeout or cancel before payment ends the whole request: nothing is printed or charged.
        After payment it is a FlowError (rule 3): the driver must not let one reach the flow there."""
        if not self.finished:
            self._go("cancelled")
            self.outcome.status, self.outcome.reason = Status.CANCELLED, why
            self.outcome.message = SCREENS[Status.CANCELLED]

    def _refusal_from(self, status: int, body: bytes) -> None:
        try:
            obj = msgspec.json.decode(body)
            self.refuse(obj.get("reason", f"http-{status}"), obj.get("message"))
        except (msgspec.DecodeError, AttributeError):
            self.refuse(f"http-{status}")

    # -- steps (each returns the next request as (method, path, body) or None) --------------

    def start(self) -> tuple[str, str, bytes]:
        return "POST", "/v1/session", b"{}"

    def on_challenge(self, status: int, body: bytes) -> tuple[str, str, bytes] | None:
        if status != 200:
            self._refusal_from(status, body)
            return None
        ch = msgspec.json.decode(body, type=Challenge)
        self._go("challenge")
        self.session = ch.session
        try:
            signature = self.card.sign_challenge(self.pin, base64.b64decode(ch.challenge))
        except WrongPin as exc:
            self.refuse(Refusal.PIN_WRONG, tries_left=exc.tries_left)
            return None
        except PinLocked:
            self.refuse(Refusal.PIN_LOCKED, tries_left=0)
            return None
        auth = AuthRequest(base64.b64encode(self.card.certificate_der).decode(), base64.b64encode(signature).decode())
        return "POST", f"/v1/session/{ch.session}/auth", msgspec.json.encode(auth)

    def on_auth(self, status: int, body: bytes) -> tuple[str, str, bytes] | None:
        if status != 200:
            self._refusal_from(status, body)
            return None
        ok = msgspec.json.decode(body, type=AuthOk)
        if ok.card != self.card.fingerprint:
            self.refuse(Refusal.CARD_MISMATCH)
            return None
        self._go("authenticated")
        return "POST", f"/v1/session/{self.session}/issue", msgspec.json.encode(self.request)

    def on_document_headers(self, status: int, headers: Headers) -> bool:
        """True when a document follows; False when it is a refusal (read it with on_refusal_body)."""
        if status != 200:
            return False
        self._go("document-start")
        self.outcome.issuance_id = (header(headers, b"konbini-issuance-id") or b"").decode()
        return True

    def on_refusal_body(self, status: int, body: bytes) -> None:
        self._refusal_from(status, body)

    def on_document_chunk(self, chunk: bytes) -> None:
        self._digest.update(chunk)
        if self.outcome.document_bytes < HEAD:  # the certificate says whose it is in its head
            self._head += chunk[: HEAD - self.outcome.document_bytes]
        self.outcome.document_bytes += len(chunk)

    def on_document_end(self, trailers: Headers | None) -> str | None:
        """Check the binding; returns None when the document is ours, else the problem (and reports)."""
        problem = self._check_binding(trailers)
        if problem is None:
            self._go("document-verified")
            self.outcome.signature_valid = True
        else:
            self._go("document-rejected")
            o = self.outcome
            o.status, o.reason, o.message = Status.MISDELIVERED, problem, SCREENS[Status.MISDELIVERED]
        return problem

    def _check_binding(self, trailers: Headers | None) -> str | None:
        blob_b64 = header(trailers, b"konbini-binding")
        sig_b64 = header(trailers, b"konbini-signature")
        if not blob_b64 or not sig_b64:
            return "binding-missing"
        try:
            blob = base64.b64decode(blob_b64, validate=True)
            sig = base64.b64decode(sig_b64, validate=True)
            b = msgspec.json.decode(blob, type=Binding)
        except (ValueError, msgspec.DecodeError):
            return "signature-invalid"
        if not any(_signed_by(key, sig, blob) for key in self.center_keys):
            return "signature-invalid"
        if b.session != self.session or b.kiosk != self.kiosk_id or b.card != self.card.fingerprint:
            return "bound-to-another-session"
        if b.issuance_id != self.outcome.issuance_id:
            return "issuance-id-mismatch"
        if b.sha256 != self._digest.hexdigest() or b.bytes != self.outcome.document_bytes:
            return "document-altered"
        # what the paper says, read as the resident would: a center that swapped cards and sessions
        # signs its mistake, but the name on the certificate is still somebody else's
        if resident_named(self._head) != self.card.holder.name:
            return "resident-mismatch"
        self.outcome.fee = b.fee
        return None

    def misdelivery_report(self) -> tuple[str, str, bytes]:
        report = MisdeliveryReport(self.session or "", self.outcome.issuance_id or "", self.outcome.reason or "")
        return "POST", f"/v1/session/{self.session}/misdelivery", msgspec.json.encode(report)

    def paid(self) -> None:
        """Payment is confirmed before printing (BIZ-4); emulated cash in the exact fee."""
        self._go("paid")
        self.outcome.charged = self.outcome.fee

    def printed(self, now: datetime) -> tuple[str, str, bytes]:
        """The spool is printed; the completion notice follows (BIZ-5). `now` comes from the clock."""
        self._go("printed")
        notice = CompletionNotice(
            self.outcome.issuance_id or "", self.session or "", self.request.copies, self.outcome.fee, now.isoformat()
        )
        return "POST", "/v1/notice", msgspec.json.encode(notice)

    def refund_notice(self, now: datetime) -> tuple[str, str, bytes]:
        """The notice for this job refunded, without a transition: held in the outbox while printing."""
        o = self.outcome
        notice = CompletionNotice(
            o.issuance_id or "", self.session or "", self.request.copies, o.fee, now.isoformat(), refunded=True
        )
        return "POST", "/v1/notice", msgspec.json.encode(notice)

    def misprinted(self, now: datetime) -> tuple[str, str, bytes]:
        """The printer failed: the fee is refunded and the notice says so (BIZ-4)."""
        self._go("misprinted")
        o = self.outcome
        o.refunded, o.reason, o.message = True, "misprint", SCREENS[Status.REFUNDED]
        return self.refund_notice(now)

    def notice_queued(self) -> None:
        """Not acknowledged yet, but durable in the outbox: the resident need not wait for it."""
        self._go("notice-queued")
        self.outcome.notice_pending = True

    def on_notice(self, status: int, body: bytes) -> None:
        if status != 200:
            raise FlowError(self.state, f"notice-http-{status}")
        self._go("notice-acknowledged")

    def erased(self) -> None:
        self._go("erased")
        self.outcome.status = Status.REFUNDED if self.outcome.refunded else Status.ISSUED


def _signed_by(key: ec.EllipticCurvePublicKey, sig: bytes, blob: bytes) -> bool:
    try:
        key.verify(sig, blob, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True
