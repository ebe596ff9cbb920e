"""Issuing at the center: the business decision, the ledger's record, the municipality's document
streamed through and hashed, the signed binding that delivers it; or the request cancelled whole.

An issuance is decided (`decide`, pure), recorded in the ledger before any byte leaves, streamed
from the first of the municipality's document servers that answers, and sealed (`seal`, pure)
with the document's last bytes. Any failure or timeout on the way cancels it whole (INT-1). The
center then holds it in memory until its notice settles it (gateway/nodes/center/notices.py) or
it expires; finished ones are forgotten after FINISHED_TTL, the ledger keeps them.
"""

from __future__ import annotations

import hashlib
import logging
import math
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import msgspec
import trio
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.business import rules
from gateway.business.ledger import IssuanceRecord, Ledger, LedgerDB, LedgerError, MonthFixed, month_of
from gateway.business.refusal import Refusal
from gateway.business.session import (
    DELIVERY_TIMEOUT,
    NOTICE_TTL,
    Issuance,
    IssuanceEvent,
    Session,
    SessionEvent,
    SessionState,
)
from gateway.business.sessions import LocalSessions, SharedSessions
from gateway.nodes.center.answering import UPSTREAM_FAILURES, UPSTREAM_TIMEOUT, Answering, b64
from gateway.protocol.driver import Stream
from gateway.protocol.errors import LinkError
from gateway.protocol.h2trio import TrioH2
from gateway.protocol.http import request_headers, timing
from gateway.protocol.messages import Binding, DocumentRequest, IssueRequest
from gateway.protocol.streams import Headers, header
from gateway.transport.outliers import Outliers
from gateway.transport.upstream import Upstream
from topology.spec.model import Hours, Node

log = logging.getLogger("konbini.center")

FINISHED_TTL = 120.0  # seconds a completed or cancelled issuance stays in memory (the ledger keeps it)
# Every issuance ends within its bound (DELIVERY_TIMEOUT, NOTICE_TTL: gateway/business/session.py);
# the ledger's rows left unfinished beyond them (a center that died) are expired at start and
# every SWEEP_INTERVAL seconds.
SWEEP_INTERVAL = 10.0
# Shorter than UPSTREAM_TIMEOUT, so that a hung document server is passed over while the issuance
# still has time for the next one.
ATTEMPT_TIMEOUT = 2.0  # seconds a document server has to start answering
PROBE_INTERVAL = 1.0  # seconds between probes of a set-aside document server
# A probe asks for a document as an issuance does (the same path, the same allow-list rule) for no card.
PROBE = msgspec.json.encode(DocumentRequest("probe", "residence-record", 0, "probe"))
DEFAULT_DOCUMENT_SIZE = 64 * 1024
MAX_DOCUMENT_SIZE = 64 * 1024 * 1024
# Any of these from one document server passes over it to the next.
DOCUMENT_SERVER_FAILURES = (trio.TooSlowError, ConnectionError, LinkError)


@dataclass(frozen=True)
class Refuse:
    """The decision: refuse, with this status, reason and message fields."""

    status: int
    reason: Refusal
    fields: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Go:
    """The decision: issue, for this fee, a document of this size."""

    fee: int
    size: int


def decide(s: Session, req: IssueRequest, now: datetime, service_hours: Hours, munis: dict[str, Node]) -> Refuse | Go:
    """Whether an issue request may go: the session must be authenticated and unused, then the
    business rules (BIZ-1..3) must allow it at `now`. Pure; a refusal leaves the session as it was."""
    if not s.can(SessionEvent.ISSUE):
        return Refuse(403 if s.state is SessionState.CHALLENGED else 409, Refusal.SESSION_STATE)
    node = munis.get(req.municipality)
    muni = node.municipality if node is not None else None
    refusal = rules.refusal(now, service_hours, muni, req.cert_type, req.copies)
    if refusal is not None:
        return Refuse(403, *refusal)  # among them an unknown municipality: `muni` is known below
    return Go(rules.fee(muni, req.cert_type, req.copies), min(req.size or DEFAULT_DOCUMENT_SIZE, MAX_DOCUMENT_SIZE))


def seal(sign_key: ec.EllipticCurvePrivateKey, s: Session, iss: Issuance, sha256: str, nbytes: int) -> Headers:
    """The trailers that deliver a document: the binding of these bytes to this issuance, this
    session, this kiosk and this card, and the center's signature over it (INT-1). Pure; raises
    LifecycleError unless the session is issuing and the issuance streaming, so nothing cancelled
    or already delivered is ever sealed."""
    s.require(SessionEvent.SEAL)
    iss.require(IssuanceEvent.SEAL)
    binding = Binding(iss.id, s.id, s.kiosk, s.card or "", sha256, nbytes, iss.cert_type, iss.copies, iss.fee)
    blob = msgspec.json.encode(binding)
    signature = sign_key.sign(blob, ec.ECDSA(hashes.SHA256()))
    return [(b"konbini-binding", b64(blob).encode()), (b"konbini-signature", b64(signature).encode())]


@dataclass
class DocumentServers:
    """A municipality's document servers (the same data on each), and which are set aside."""

    links: list[Upstream]
    outliers: Outliers = field(init=False)

    def __post_init__(self) -> None:
        self.outliers = Outliers([link.target.id for link in self.links])


class IssuanceFlow(Answering):
    """The center's issuances: from the decision to delivery or a cancel, and their time in memory."""

    sessions: LocalSessions | SharedSessions
    ledger: Ledger
    munis: dict[str, Node]
    muni_servers: dict[str, DocumentServers]
    issuances: dict[str, Issuance]
    expired: int
    _sign_key: ec.EllipticCurvePrivateKey
    _nursery: trio.Nursery
    _awaited: dict[str, float]  # issuance id -> monotonic time it was sent; its notice is awaited
    _finished: dict[str, float]  # issuance id -> monotonic time it was completed or cancelled

    async def _issue(self, stream: Stream, s: Session, req: IssueRequest, t0: float) -> None:
        verdict = decide(s, req, self.ctx.clock.now(), self.ctx.topo.service_hours, self.munis)
        if isinstance(verdict, Refuse):
            await self._refuse(stream, verdict.status, verdict.reason, t0, verdict.fields)
            return
        self.sessions.fire(s, SessionEvent.ISSUE)
        iss = Issuance(
            "iss-" + secrets.token_hex(12),
            s.id,
            s.kiosk,
            s.store,
            req.municipality,
            req.cert_type,
            req.copies,
            verdict.fee,
            card=s.card_id or "",
        )
        # One cancellation path (INT-1): whatever fails or times out, wherever, cancels the request
        # whole; from here that includes the ledger write, which commits even if we are cancelled
        # while awaiting it, so that the cancel's own write must follow it.
        try:
            with trio.fail_after(DELIVERY_TIMEOUT):
                await self._record_issuance(s, iss)
                sha256, nbytes = await self._stream_document(stream, iss, verdict.size, t0)
            self._deliver(stream, s, iss, seal(self._sign_key, s, iss, sha256, nbytes))
        except LedgerError as exc:
            self._cancel(s, iss)
            log.error("issuance refused, ledger: %s", exc)
            reason = Refusal.MONTH_FIXED if isinstance(exc, MonthFixed) else Refusal.LEDGER_UNAVAILABLE
            await self._refuse(stream, 503, reason, t0)
        except UPSTREAM_FAILURES as exc:
            self._cancel(s, iss)
            log.warning("issuance %s cancelled whole: %s", iss.id, type(exc).__name__)
            if stream.sent_headers:
                stream.reset()
            else:
                await self._refuse(stream, 503, Refusal.MUNICIPALITY_UNAVAILABLE, t0)
        except BaseException:
            self._cancel(s, iss)  # the kiosk went away (our scope was cancelled): nothing half-done
            raise

    async def _record_issuance(self, s: Session, iss: Issuance) -> None:
        """No document leaves the center before the ledger knows of its issuance."""
        now = self.ctx.clock.now()
        kiosk_node = self.ctx.topo.nodes.get(s.kiosk)
        record = IssuanceRecord(
            iss.id,
            s.id,
            s.kiosk,
            kiosk_node.operator if kiosk_node else None,
            iss.municipality,
            iss.cert_type,
            iss.copies,
            iss.fee,
            month_of(now),
            card=s.card_id,
        )
        # at every issuance too: memory stays bounded under load, between sweeps
        self._forget_finished(time.monotonic())
        self.issuances[iss.id] = iss
        await self.ledger.call(LedgerDB.create_issuance, record, now)

    def _finish(self, iss: Issuance) -> None:
        """Mark a completed or cancelled issuance for forgetting after FINISHED_TTL."""
        self._finished.pop(iss.id, None)  # a repeated notice moves it to the back
        self._finished[iss.id] = time.monotonic()

    def _forget_finished(self, now: float) -> None:
        """Drop from memory the issuances finished more than FINISHED_TTL ago; a later notice or
        correction finds them in the ledger (`_known_issuance`). Keeping every issuance grew the
        center's RSS for as long as it ran (docs/soak.md). `_finished` is in finishing order, so
        each call costs what it drops."""
        cutoff = now - FINISHED_TTL
        while self._finished:
            iid, at = next(iter(self._finished.items()))
            if at >= cutoff:
                return
            del self._finished[iid]
            self.issuances.pop(iid, None)

    def expire_awaited(self, now: float) -> int:
        """Expire the delivered issuances whose notice has not come in NOTICE_TTL (their kiosk
        cancelled after the document left, or lost the notice): out of memory, "expired" in the
        ledger, where a late notice still completes them. In sending order, so each call costs
        what it expires; the number expired."""
        cutoff, n = now - NOTICE_TTL, 0
        while self._awaited:
            iid, at = next(iter(self._awaited.items()))
            if at >= cutoff:
                break
            del self._awaited[iid]
            iss = self.issuances.pop(iid, None)
            if iss is not None and iss.can(IssuanceEvent.EXPIRE):
                iss.fire(IssuanceEvent.EXPIRE)
                self.ledger.submit(LedgerDB.set_state, iid, iss.state, self.ctx.clock.now())
                n += 1
        self.expired += n
        return n

    async def reconcile(self) -> list[str]:
        """The ledger's rows left unfinished past their bound, expired: at start, the rows a center
        that died left behind; while running, those of a worker or standby center that died. The
        ids expired."""
        now = self.ctx.clock.now()
        stale = await self.ledger.call(
            LedgerDB.expire_stale, now, now - timedelta(seconds=DELIVERY_TIMEOUT), now - timedelta(seconds=NOTICE_TTL)
        )
        if stale:
            log.warning("expired %d issuances left unfinished in the ledger", len(stale))
        self.expired += len(stale)
        return stale

    async def _sweep(self) -> None:
        """Every SWEEP_INTERVAL: forget finished issuances, expire those whose notice never came,
        reconcile the ledger. The memory sweeps also run when no issuance comes (a quiet night)."""
        while True:
            try:
                await self.reconcile()
            except LedgerError as exc:
                log.error("ledger reconciliation failed: %s", exc)
            now = time.monotonic()
            self._forget_finished(now)
            self.expire_awaited(now)
            await trio.sleep(SWEEP_INTERVAL)  # a period, not a wait for an event

    async def _stream_document(self, stream: Stream, iss: Issuance, size: int, t0: float) -> tuple[str, int]:
        """The municipality's document streamed through to the kiosk, hashed on the way: (sha256, bytes).
        Everything but the trailers goes out here; the municipality must answer within UPSTREAM_TIMEOUT."""
        doc_req = msgspec.json.encode(DocumentRequest(iss.id, iss.cert_type, size, iss.card))
        conn = st = None
        try:
            with trio.fail_after(UPSTREAM_TIMEOUT):
                conn, st, muni_ms = await self._open_document(self.muni_servers[iss.municipality], doc_req)
                stream.send_headers(
                    [
                        (b":status", b"200"),
                        (b"content-type", b"application/pdf"),
                        (b"konbini-issuance-id", iss.id.encode()),
                        (b"konbini-fee", str(iss.fee).encode()),
                        timing(self.ctx.node.id, t0, stream),
                        muni_ms,
                    ]
                )
            digest = hashlib.sha256()
            sizes: list[int] = []

            def observe(chunk: bytes) -> None:
                digest.update(chunk)
                sizes.append(len(chunk))

            await st.forward_body(stream, observe)
            return digest.hexdigest(), sum(sizes)
        finally:
            if conn is not None and st is not None:
                conn.release(st)

    async def _open_document(
        self, servers: DocumentServers, doc_req: bytes
    ) -> tuple[TrioH2, Stream, tuple[bytes, bytes]]:
        """The first of the municipality's document servers that answers 200 to the document
        request: (connection, stream, its server-timing entry). They are asked in the order
        `servers.outliers` gives (file order, those set aside last). One that cannot be reached,
        resets, refuses or does not answer within ATTEMPT_TIMEOUT (a hung process: its socket
        accepts, nothing answers) is passed over for the next, and set aside until a probe finds it
        answering: nothing has reached the kiosk yet, so the issuance stays whole, and every server
        holds the same municipality data. The last one asked has the rest of the issuance's time:
        there is no next to save it for, and a slow server is not a hung one. None answering:
        ConnectionError, which cancels the issuance."""
        last: BaseException | None = None
        order = servers.outliers.order()
        for n, i in enumerate(order):
            link = servers.links[i]
            t_muni = time.perf_counter()
            try:
                conn, st = await self._ask(link, doc_req, ATTEMPT_TIMEOUT if n < len(order) - 1 else math.inf)
            except DOCUMENT_SERVER_FAILURES as exc:
                hung = isinstance(exc, trio.TooSlowError)
                log.warning(
                    "document server %s %s; trying the next",
                    link.target.id,
                    "hung" if hung else f"unavailable ({type(exc).__name__})",
                )
                self.metrics.upstream_failures.labels("document-server-hung" if hung else "document-server-down").inc()
                if servers.outliers.failed(i, time.monotonic()):
                    self._nursery.start_soon(self._probe, servers, i)
                last = exc
                continue
            servers.outliers.answered(i)
            return conn, st, timing(link.target.id, t_muni)
        raise ConnectionError(f"no document server answered: {type(last).__name__}") from last

    @staticmethod
    async def _ask(link: Upstream, doc_req: bytes, timeout: float) -> tuple[TrioH2, Stream]:
        """One document server asked once: its stream, once it has answered 200 within `timeout`."""
        conn = st = None
        try:
            with trio.fail_after(timeout):
                conn, st = await link.open(request_headers("POST", "/v1/document", link.target.id), doc_req)
                mh = await st.receive_headers()
            if header(mh, b":status") != b"200":
                raise ConnectionError(f"{link.target.id} refused the document request")
            return conn, st
        except BaseException:
            if conn is not None and st is not None:
                conn.release(st)
            raise

    async def _probe(self, servers: DocumentServers, i: int) -> None:
        """Ask a set-aside document server for a document (PROBE) every PROBE_INTERVAL until it
        answers (HAProxy's `inter`), then put it back in service. A request that tried it as a last
        resort and got an answer ends the probing too."""
        link = servers.links[i]
        while servers.outliers.is_set_aside(i):
            await trio.sleep(PROBE_INTERVAL)  # a health check's period, not a wait for an event
            try:
                conn, st = await self._ask(link, PROBE, ATTEMPT_TIMEOUT)
            except DOCUMENT_SERVER_FAILURES:
                continue
            conn.release(st)
            servers.outliers.answered(i)
            log.info("document server %s answers again; back in service", link.target.id)

    def _deliver(self, stream: Stream, s: Session, iss: Issuance, trailers: Headers) -> None:
        stream.end(trailers)  # the document is delivered here, with its signed binding
        # no await between the trailers and SENT: a completion notice cannot overtake the delivery
        self.sessions.fire(s, SessionEvent.SEAL)
        iss.fire(IssuanceEvent.SEAL)
        self._awaited[iss.id] = time.monotonic()
        self.metrics.issuances.labels(iss.cert_type).inc()
        self.ledger.submit(LedgerDB.set_state, iss.id, iss.state, self.ctx.clock.now())

    def _cancel(self, s: Session, iss: Issuance) -> None:
        """The one way a request ends early: the session closes, an undelivered issuance is cancelled
        (in the ledger too: its row was written, or is queued before this)."""
        self.sessions.fire(s, SessionEvent.CANCEL)
        was = iss.state
        if iss.fire(IssuanceEvent.CANCEL) is not was:  # a delivered document stays delivered
            self.ledger.submit(LedgerDB.set_state, iss.id, iss.state, self.ctx.clock.now())
            self._finish(iss)
