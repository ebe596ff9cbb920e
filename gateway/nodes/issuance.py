"""The certificate issuance center: card authentication, business checks, streamed signed documents.

Flow per kiosk session (each step one HTTP/2 request relayed from the kiosk's store router):
  POST /v1/session                 -> a fresh challenge, bound to the attested kiosk
  POST /v1/session/{id}/auth       -> card certificate + signature over the challenge; the center
                                      checks signature, chain, validity and revocation (OCSP)
  POST /v1/session/{id}/issue      -> business checks, then the municipality's document streams
                                      through, hashed on the way; the trailers carry the binding
                                      (issuance id, session, kiosk, card, digest) and its signature
  POST /v1/notice                  -> completion notice, deduplicated by issuance id in the ledger
                                      (so across restarts too); acknowledged only once durable
  POST /v1/correction              -> amends a noticed issuance until its month is fixed (BIZ-5/6)
  POST /v1/session/{id}/misdelivery-> a kiosk refused a document; counted, never silent (INT-1)
A challenge is usable once; a session is usable for one issuance; a cancelled or timed-out
issuance is cancelled whole and its session closed. Those rules are the state machines of
gateway/business/session.py; this module does the I/O around them. /bench/* is the relay
benchmarks' origin (gateway/nodes/bench_origin.py), served at this node's address.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import math
import secrets
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import msgspec
import trio
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from gateway.business import ocsp, rules
from gateway.business.ledger import (
    IssuanceRecord,
    Ledger,
    LedgerDB,
    LedgerError,
    MonthFixed,
    ledger_path,
    month_of,
)
from gateway.business.session import (
    DELIVERY_TIMEOUT,
    NOTICE_TTL,
    Issuance,
    IssuanceEvent,
    IssuanceState,
    Session,
    SessionEvent,
    SessionState,
)
from gateway.business.sessions import LocalSessions, SessionMoved, SharedSessions
from gateway.node.server import App, NodeContext, Peer
from gateway.nodes.bench_origin import serve_bench
from gateway.protocol.driver import Stream
from gateway.protocol.errors import LinkError
from gateway.protocol.h2trio import TrioH2
from gateway.protocol.http import (
    BadRequest,
    decode,
    method_path,
    refuse,
    request_headers,
    send_json,
    timing,
)
from gateway.protocol.messages import (
    AuthOk,
    AuthRequest,
    Binding,
    Challenge,
    CompletionNotice,
    CorrectionAck,
    CorrectionNotice,
    DocumentRequest,
    IssueRequest,
    MisdeliveryReport,
    NoticeAck,
)
from gateway.protocol.streams import Headers, header
from gateway.transport.outliers import Outliers
from gateway.transport.upstream import Upstream
from topology.pki import card_id_of, is_smartphone, verify_card_certificate
from topology.spec.model import Hours, Node

log = logging.getLogger("konbini.center")

SESSION_TTL = 120.0  # seconds a kiosk session may stay open
FINISHED_TTL = SESSION_TTL  # seconds a completed or cancelled issuance stays in memory (the ledger keeps it)
# Every issuance ends within its bound (DELIVERY_TIMEOUT, NOTICE_TTL: gateway/business/session.py);
# the ledger's rows left unfinished beyond them (a center that died) are expired at start and
# every SWEEP_INTERVAL seconds.
SWEEP_INTERVAL = 10.0
UPSTREAM_TIMEOUT = 10.0  # OCSP and municipality must answer within this, or the request is cancelled whole
# Shorter than UPSTREAM_TIMEOUT, so that a hung document server is passed over while the issuance
# still has time for the next one.
ATTEMPT_TIMEOUT = 2.0  # seconds a document server has to start answering
PROBE_INTERVAL = 1.0  # seconds between probes of a set-aside document server
# A probe asks for a document as an issuance does (the same path, the same allow-list rule) for no card.
PROBE = msgspec.json.encode(DocumentRequest("probe", "residence-record", 0, "probe"))
DEFAULT_DOCUMENT_SIZE = 64 * 1024
MAX_DOCUMENT_SIZE = 64 * 1024 * 1024
# Any of these while the municipality's document is requested or streamed cancels the issuance whole.
UPSTREAM_FAILURES = (trio.TooSlowError, ConnectionError, LinkError)
# Any of these from one document server passes over it to the next.
DOCUMENT_SERVER_FAILURES = (trio.TooSlowError, ConnectionError, LinkError)

# A smartphone credential (seed 002) refused for its own certificate says so: the resident may still
# hold a good card.
SMARTPHONE_PROBLEMS = {"card-expired": "smartphone-expired", "card-revoked": "smartphone-revoked"}
MESSAGES = {
    "municipality-unknown": "This municipality does not offer convenience-store issuance.",
    "municipality-not-participating": "{municipality} does not take part in convenience-store issuance.",
    "outside-hours": "The service is not available now. Hours: {hours} (Japan time).",
    "certificate-type-not-offered": "{municipality} does not offer this certificate here.",
    "card-expired": "This card has expired. Please ask your municipality.",
    "card-not-yet-valid": "This card is not valid yet. Please check the date, or ask your municipality.",
    "copies-out-of-range": "From 1 to {max_copies} copies can be printed at a time.",
    "card-revoked": "This card's certificate is no longer valid. Please ask your municipality.",
    "smartphone-expired": "This smartphone's credential has expired and your card's certificate is no longer valid. Please ask your municipality.",
    "smartphone-revoked": "This smartphone's credential was revoked with your card's certificate. Please ask your municipality.",
    "smartphone-lost": "This smartphone's credential was reported lost and no longer works. Please use your My Number card.",
    "card-untrusted": "This card cannot be read. Please ask your municipality.",
    "legacy-profile-refused": "This card's certificate profile is no longer accepted.",
    "signature-invalid": "Card authentication failed. Please try again.",
    "session-unknown": "Your session has ended. Please start again.",
    "session-state": "Your session has ended. Please start again.",
    "ocsp-unavailable": "The service is temporarily unavailable.",
    "ocsp-invalid": "The service is temporarily unavailable.",
    "ocsp-unknown": "This card cannot be used. Please ask your municipality.",
    "municipality-unavailable": "The service is temporarily unavailable.",
    "bad-request": "The request could not be understood.",
    "month-fixed": "This month's settlement is fixed; its records cannot change.",
    "notice-mismatch": "The notice does not match the issuance; send a correction instead.",
    "not-noticed": "This issuance has no completion notice yet; nothing to correct.",
    "ledger-unavailable": "The service is temporarily unavailable.",
}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# -- the issue request's two pure steps ---------------------------------------------------------


@dataclass(frozen=True)
class Refuse:
    """The decision: refuse, with this status, reason and message fields."""

    status: int
    reason: str
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
        return Refuse(403 if s.state is SessionState.CHALLENGED else 409, "session-state")
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
    return [(b"konbini-binding", _b64(blob).encode()), (b"konbini-signature", _b64(signature).encode())]


@dataclass
class DocumentServers:
    """A municipality's document servers (the same data on each), and which are set aside."""

    links: list[Upstream]
    outliers: Outliers = field(init=False)

    def __post_init__(self) -> None:
        self.outliers = Outliers([link.target.id for link in self.links])


class IssuanceCenter(App):
    def __init__(self, ctx: NodeContext, nursery: trio.Nursery, state_dir: Path | None = None) -> None:
        self.ctx = ctx
        # The ledger is the center's memory across restarts: issuances, notices, settlement facts.
        self.ledger = Ledger.open(ledger_path(ctx.topo.ledger, state_dir or ctx.topo.state_dir))
        nursery.start_soon(self.ledger.run)
        # One process: its sessions in memory. Workers on one address (SO_REUSEPORT): in a file
        # they share, since a relay that pools connections spreads one kiosk's requests over them.
        if ctx.reuse_port:
            where = Path(state_dir or ctx.topo.state_dir) / f"sessions-{ctx.node.id}.sqlite"
            self.sessions: LocalSessions | SharedSessions = SharedSessions(where, SESSION_TTL)
        else:
            self.sessions = LocalSessions(SESSION_TTL)
        self.issuances: dict[str, Issuance] = {}
        self._awaited: dict[str, float] = {}  # issuance id -> monotonic time it was sent; its notice is awaited
        self._finished: dict[str, float] = {}  # issuance id -> monotonic time it was completed or cancelled
        self.expired = 0  # delivered issuances whose notice never came, in memory or in the ledger
        self.refusals: Counter[str] = Counter()
        self.misdeliveries: list[MisdeliveryReport] = []
        pki = ctx.pki
        key = pki.node_paths(ctx.node.id)[1]
        self._sign_key = serialization.load_pem_private_key(key.read_bytes(), password=None)
        self.jpki_ca: x509.Certificate = pki.jpki_ca
        topo = ctx.topo
        self.munis = topo.municipalities()
        ocsp_nodes = topo.of_kind("ocsp")
        self.ocsp = Upstream(ctx, ocsp_nodes[0], nursery) if ocsp_nodes else None
        # `ocsp_cache: true`: a card's good (or revoked) answer is relied on until its nextUpdate
        self.ocsp_answers = ocsp.OcspCache() if topo.ocsp_cache else None
        # A municipality may run several document servers (the same municipality data): every one,
        # in file order, so that the next is tried when one is down or hung (`_open_document`).
        self._nursery = nursery
        links: dict[str, list[Upstream]] = {}
        for node in topo.of_kind("municipality"):
            if node.municipality is not None:
                links.setdefault(node.municipality.code, []).append(Upstream(ctx, node, nursery))
        self.muni_servers = {code: DocumentServers(ups) for code, ups in links.items()}
        nursery.start_soon(self._sweep)

    def collect(self) -> Iterator[Metric]:
        """Read at scrape time (the NodeServer registers the app as a collector): what the center
        knows of the kiosks' notice outboxes, documents delivered whose completion notice is not in;
        the issuances it holds in memory, by state (each leaves within its bound); the document
        servers it has set aside."""
        states = Counter(iss.state.value for iss in self.issuances.values())
        yield GaugeMetricFamily(
            "konbini_notices_awaited",
            "Delivered documents whose completion notice is not in yet.",
            value=states[IssuanceState.SENT.value],
        )
        held = GaugeMetricFamily(
            "konbini_issuances_in_memory", "Issuances the center holds in memory, by state.", labels=["state"]
        )
        for state in IssuanceState:
            held.add_metric([state.value], states[state.value])
        yield held
        yield CounterMetricFamily(
            "konbini_issuances_expired", "Delivered issuances whose completion notice never came.", value=self.expired
        )
        aside = GaugeMetricFamily(
            "konbini_document_servers_set_aside", "Document servers set aside until a probe finds them answering."
        )
        aside.add_metric([], sum(len(servers.outliers.set_aside_at) for servers in self.muni_servers.values()))
        yield aside

    # -- routing ---------------------------------------------------------------------------

    async def handle(self, stream: Stream, peer: Peer) -> None:
        t0 = time.perf_counter()
        method, path = method_path(stream.headers)
        parts = path.strip("/").split("/")
        try:
            if method == "POST" and parts == ["v1", "session"]:
                await stream.read_body(4096)
                await self._start_session(stream, t0)
            elif method == "POST" and len(parts) == 4 and parts[:2] == ["v1", "session"]:
                session = self._session(parts[2], stream)
                body = await stream.read_body(64 * 1024)
                if session is None:
                    await self._refuse(stream, 404, "session-unknown", t0)
                elif parts[3] == "auth":
                    await self._authenticate(stream, session, decode(body, AuthRequest), t0)
                elif parts[3] == "issue":
                    await self._issue(stream, session, decode(body, IssueRequest), t0)
                elif parts[3] == "misdelivery":
                    await self._misdelivery(stream, session, decode(body, MisdeliveryReport), t0)
                else:
                    await self._refuse(stream, 404, "bad-request", t0)
            elif method == "POST" and parts == ["v1", "notice"]:
                await self._notice(stream, decode(await stream.read_body(4096), CompletionNotice), t0)
            elif method == "POST" and parts == ["v1", "correction"]:
                await self._correction(stream, decode(await stream.read_body(4096), CorrectionNotice), t0)
            elif parts[:1] == ["bench"]:  # the relay benchmarks' origin lives at the center's address
                await serve_bench(stream, method, self.ctx.node.id, t0)
            else:
                await self._refuse(stream, 404, "bad-request", t0)
        except BadRequest as exc:
            log.info("bad request on %s: %s", path, exc)
            await self._refuse(stream, 400, "bad-request", t0)
        except SessionMoved as exc:  # another worker answered this challenge or issued on it first
            log.info("%s", exc)
            await self._refuse(stream, 409, "session-state", t0)

    def _session(self, sid: str, stream: Stream) -> Session | None:
        s = self.sessions.get(sid)
        kiosk = (header(stream.headers, b"konbini-kiosk") or b"").decode()
        if s is None or s.kiosk != kiosk:  # a session belongs to the kiosk that opened it
            return None
        return s

    async def _refuse(self, stream: Stream, status: int, reason: str, t0: float, **fmt: str) -> None:
        self.refusals[reason] += 1
        self.metrics.refusals.labels(reason).inc()
        message = MESSAGES.get(reason, reason).format(**fmt)
        await refuse(stream, status, reason, message, [timing(self.ctx.node.id, t0, stream)])

    # -- session and card authentication ----------------------------------------------------

    async def _start_session(self, stream: Stream, t0: float) -> None:
        kiosk = (header(stream.headers, b"konbini-kiosk") or b"").decode()
        store = (header(stream.headers, b"konbini-store") or b"").decode()
        if not kiosk:
            await self._refuse(stream, 400, "bad-request", t0)
            return
        s = Session(secrets.token_hex(16), kiosk, store, secrets.token_bytes(32), time.monotonic())
        self.sessions.add(s)  # and drops those past their time to live
        await send_json(stream, 200, Challenge(s.id, _b64(s.challenge)), [timing(self.ctx.node.id, t0, stream)])

    async def _authenticate(self, stream: Stream, s: Session, req: AuthRequest, t0: float) -> None:
        if not s.can(SessionEvent.ANSWER):
            await self._refuse(stream, 409, "session-state", t0)  # a challenge is answered once
            return
        self.sessions.fire(s, SessionEvent.ANSWER)  # from here the challenge is spent: a failed answer burns it
        try:
            await self._verify_answer(stream, s, req, t0)
        except BaseException:
            self.sessions.fire(s, SessionEvent.CANCEL)  # the kiosk went away mid-answer: the session closes
            raise

    async def _verify_answer(self, stream: Stream, s: Session, req: AuthRequest, t0: float) -> None:
        try:
            der = base64.b64decode(req.certificate, validate=True)
            signature = base64.b64decode(req.signature, validate=True)
            cert = x509.load_der_x509_certificate(der)
        except ValueError:
            self.sessions.fire(s, SessionEvent.REJECTED)
            await self._refuse(stream, 400, "bad-request", t0)
            return
        now = self.ctx.clock.now()
        problem = verify_card_certificate(cert, self.jpki_ca, now)
        if problem is None:
            problem = self._check_signature(cert, s.challenge, signature)
        timings = []
        if problem is None:
            known = ocsp.MISS if self.ocsp_answers is None else self.ocsp_answers.get(cert.serial_number, now)
            if known is ocsp.MISS:
                t_ocsp = time.perf_counter()
                problem = await self._check_revocation(cert, now)
                timings.append(timing("ocsp", t_ocsp))
            else:
                problem = known  # type: ignore[assignment]  # relied on until its nextUpdate: no OCSP hop
        if problem is not None and is_smartphone(cert):
            problem = SMARTPHONE_PROBLEMS.get(problem, problem)
        if problem is not None:
            self.sessions.fire(s, SessionEvent.REJECTED)
            self.refusals[problem] += 1
            self.metrics.refusals.labels(problem).inc()
            await refuse(
                stream, 403, problem, MESSAGES.get(problem, problem), [timing(self.ctx.node.id, t0, stream), *timings]
            )
            return
        s.card = hashlib.sha256(der).hexdigest()
        s.card_id = card_id_of(cert)
        self.sessions.fire(s, SessionEvent.VERIFIED)
        await send_json(stream, 200, AuthOk("authenticated", s.card), [timing(self.ctx.node.id, t0, stream), *timings])

    @staticmethod
    def _check_signature(cert: x509.Certificate, challenge: bytes, signature: bytes) -> str | None:
        key = cert.public_key()
        if not isinstance(key, rsa.RSAPublicKey):
            return "card-untrusted"
        try:
            key.verify(signature, challenge, padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            return "signature-invalid"
        return None

    async def _check_revocation(self, cert: x509.Certificate, now: datetime) -> str | None:
        if self.ocsp is None:
            return "ocsp-unavailable"
        body = ocsp.build_request(cert, self.jpki_ca)
        try:
            with trio.fail_after(UPSTREAM_TIMEOUT):
                conn, st = await self.ocsp.open(
                    request_headers(
                        "POST", "/ocsp", self.ocsp.target.id, [(b"content-type", b"application/ocsp-request")]
                    ),
                    body,
                )
                try:
                    headers = await st.receive_headers()
                    answer = await st.read_body(64 * 1024)
                finally:
                    conn.release(st)
        except UPSTREAM_FAILURES as exc:
            log.warning("ocsp unavailable: %s", type(exc).__name__)
            return "ocsp-unavailable"
        if header(headers, b":status") != b"200":
            return "ocsp-unavailable"
        problem, until = ocsp.verdict(answer, cert, self.jpki_ca, now)
        if (
            problem == "card-revoked"
            and is_smartphone(cert)
            and ocsp.revocation_reason(answer) == x509.ReasonFlags.key_compromise
        ):
            problem = "smartphone-lost"  # seed 002 §9: the phone is lost, the card stays good
        if self.ocsp_answers is not None:
            self.ocsp_answers.put(cert.serial_number, problem, until)
        return problem

    # -- issuance: decide, record, stream, seal; or cancel whole ----------------------------

    async def _issue(self, stream: Stream, s: Session, req: IssueRequest, t0: float) -> None:
        verdict = decide(s, req, self.ctx.clock.now(), self.ctx.topo.service_hours, self.munis)
        if isinstance(verdict, Refuse):
            await self._refuse(stream, verdict.status, verdict.reason, t0, **verdict.fields)
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
            await self._refuse(stream, 503, "month-fixed" if isinstance(exc, MonthFixed) else "ledger-unavailable", t0)
        except UPSTREAM_FAILURES as exc:
            self._cancel(s, iss)
            log.warning("issuance %s cancelled whole: %s", iss.id, type(exc).__name__)
            if stream.sent_headers:
                stream.reset()
            else:
                await self._refuse(stream, 503, "municipality-unavailable", t0)
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
        self._forget_finished(
            time.monotonic()
        )  # at every issuance too: memory stays bounded under load, between sweeps
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
                self.ledger.submit(LedgerDB.set_state, iid, iss.state.value, self.ctx.clock.now())
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
        self.ledger.submit(LedgerDB.set_state, iss.id, iss.state.value, self.ctx.clock.now())

    def _cancel(self, s: Session, iss: Issuance) -> None:
        """The one way a request ends early: the session closes, an undelivered issuance is cancelled
        (in the ledger too: its row was written, or is queued before this)."""
        self.sessions.fire(s, SessionEvent.CANCEL)
        was = iss.state
        if iss.fire(IssuanceEvent.CANCEL) is not was:  # a delivered document stays delivered
            self.ledger.submit(LedgerDB.set_state, iss.id, iss.state.value, self.ctx.clock.now())
            self._finish(iss)

    # -- after delivery: notices, corrections, misdeliveries --------------------------------

    async def _known_issuance(self, issuance_id: str, session: str, stream: Stream) -> IssuanceRecord | Issuance | None:
        """The issuance a kiosk refers to, from memory or (after a restart) from the ledger, if it is that kiosk's."""
        kiosk = (header(stream.headers, b"konbini-kiosk") or b"").decode()
        iss = self.issuances.get(issuance_id)
        if iss is None:
            iss = await self.ledger.call(LedgerDB.find_issuance, issuance_id)
        # a ledger record's state is the text of an IssuanceState (the center writes .value)
        if iss is None or iss.kiosk != kiosk or iss.session != session or iss.state == IssuanceState.CANCELLED:
            return None
        return iss

    async def _notice(self, stream: Stream, notice: CompletionNotice, t0: float) -> None:
        iss = await self._known_issuance(notice.issuance_id, notice.session, stream)
        if iss is None or (isinstance(iss, Issuance) and not iss.can(IssuanceEvent.NOTICE)):
            await self._refuse(stream, 404, "session-unknown", t0)  # nothing delivered, nothing to notice
            return
        if (notice.copies, notice.fee) != (iss.copies, iss.fee):
            await self._refuse(stream, 409, "notice-mismatch", t0)
            return
        try:  # acknowledged only once durable; a repeat of a known notice is acknowledged as a duplicate
            new = await self.ledger.call(
                LedgerDB.record_notice, iss.id, notice.printed_at, notice.copies, notice.fee, notice.refunded
            )
        except MonthFixed:
            await self._refuse(stream, 409, "month-fixed", t0)
            return
        except LedgerError as exc:
            log.error("notice not recorded: %s", exc)
            await self._refuse(stream, 503, "ledger-unavailable", t0)
            return
        self.metrics.notices.labels("new" if new else "duplicate").inc()
        if isinstance(iss, Issuance):
            iss.notices += 1
            iss.fire(IssuanceEvent.NOTICE)
            self._awaited.pop(iss.id, None)
            self._finish(iss)
        await send_json(stream, 200, NoticeAck("acknowledged", iss.id, not new), [timing(self.ctx.node.id, t0, stream)])

    async def _correction(self, stream: Stream, corr: CorrectionNotice, t0: float) -> None:
        iss = await self._known_issuance(corr.issuance_id, corr.session, stream)
        if iss is None:
            await self._refuse(stream, 404, "session-unknown", t0)
            return
        if corr.copies < 0 or corr.fee < 0:
            await self._refuse(stream, 400, "bad-request", t0)
            return
        try:
            await self.ledger.call(
                LedgerDB.record_correction, iss.id, self.ctx.clock.now(), corr.copies, corr.fee, corr.reason
            )
        except MonthFixed:
            await self._refuse(stream, 409, "month-fixed", t0)
            return
        except LedgerError:
            await self._refuse(stream, 409, "not-noticed", t0)
            return
        await send_json(stream, 200, CorrectionAck("corrected", iss.id), [timing(self.ctx.node.id, t0, stream)])

    async def _misdelivery(self, stream: Stream, s: Session, report: MisdeliveryReport, t0: float) -> None:
        self.misdeliveries.append(report)
        self.metrics.misdeliveries.inc()
        log.error(
            "misdelivery refused by kiosk=%s session=%s issuance=%s problem=%s",
            s.kiosk,
            s.id,
            report.issuance_id,
            report.problem,
        )
        await send_json(stream, 200, {"status": "recorded"}, [timing(self.ctx.node.id, t0, stream)])
