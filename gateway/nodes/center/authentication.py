"""Card authentication at the issuance center: a fresh challenge per kiosk session, answered once
with the card's signature, then the card's certificate checked: chain, validity, profile, and
revocation over OCSP (or a good answer still within its nextUpdate). The session's rules are the
state machine of gateway/business/session.py; this part does the I/O around them."""

from __future__ import annotations

import base64
import hashlib
import logging
import secrets
import time
from datetime import datetime

import trio
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from gateway.business import ocsp
from gateway.business.refusal import Refusal
from gateway.business.session import Session, SessionEvent
from gateway.business.sessions import LocalSessions, SharedSessions
from gateway.nodes.center.answering import UPSTREAM_FAILURES, UPSTREAM_TIMEOUT, Answering, b64
from gateway.protocol.driver import Stream
from gateway.protocol.http import request_headers, send_json, timing
from gateway.protocol.messages import AuthOk, AuthRequest, Challenge
from gateway.protocol.streams import header
from gateway.transport.upstream import Upstream
from topology.pki import card_id_of, is_smartphone, verify_card_certificate

log = logging.getLogger("konbini.center")

SESSION_TTL = 120.0  # seconds a kiosk session may stay open
# A smartphone credential (seed 002) refused for its own certificate says so: the resident may still
# hold a good card.
SMARTPHONE_PROBLEMS = {
    Refusal.CARD_EXPIRED: Refusal.SMARTPHONE_EXPIRED,
    Refusal.CARD_REVOKED: Refusal.SMARTPHONE_REVOKED,
}


class CardAuthentication(Answering):
    sessions: LocalSessions | SharedSessions
    jpki_ca: x509.Certificate
    ocsp: Upstream | None
    ocsp_answers: ocsp.OcspCache | None

    async def _start_session(self, stream: Stream, t0: float) -> None:
        kiosk = (header(stream.headers, b"konbini-kiosk") or b"").decode()
        store = (header(stream.headers, b"konbini-store") or b"").decode()
        if not kiosk:
            await self._refuse(stream, 400, Refusal.BAD_REQUEST, t0)
            return
        s = Session(secrets.token_hex(16), kiosk, store, secrets.token_bytes(32), time.monotonic())
        self.sessions.add(s)  # and drops those past their time to live
        await send_json(stream, 200, Challenge(s.id, b64(s.challenge)), [timing(self.ctx.node.id, t0, stream)])

    async def _authenticate(self, stream: Stream, s: Session, req: AuthRequest, t0: float) -> None:
        if not s.can(SessionEvent.ANSWER):
            await self._refuse(stream, 409, Refusal.SESSION_STATE, t0)  # a challenge is answered once
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
            await self._refuse(stream, 400, Refusal.BAD_REQUEST, t0)
            return
        now = self.ctx.clock.now()
        invalid = verify_card_certificate(cert, self.jpki_ca, now)
        problem = Refusal(invalid) if invalid is not None else self._check_signature(cert, s.challenge, signature)
        timings = []
        if problem is None:
            known = ocsp.MISS if self.ocsp_answers is None else self.ocsp_answers.get(cert.serial_number, now)
            if known is ocsp.MISS:
                t_ocsp = time.perf_counter()
                problem = await self._check_revocation(cert, now)
                timings.append(timing("ocsp", t_ocsp))
            else:
                problem = known  # relied on until its nextUpdate: no OCSP hop
        if problem is not None and is_smartphone(cert):
            problem = SMARTPHONE_PROBLEMS.get(problem, problem)
        if problem is not None:
            self.sessions.fire(s, SessionEvent.REJECTED)
            await self._refuse(stream, 403, problem, t0, timings=timings)
            return
        s.card = hashlib.sha256(der).hexdigest()
        s.card_id = card_id_of(cert)
        self.sessions.fire(s, SessionEvent.VERIFIED)
        await send_json(stream, 200, AuthOk("authenticated", s.card), [timing(self.ctx.node.id, t0, stream), *timings])

    @staticmethod
    def _check_signature(cert: x509.Certificate, challenge: bytes, signature: bytes) -> Refusal | None:
        key = cert.public_key()
        if not isinstance(key, rsa.RSAPublicKey):
            return Refusal.CARD_UNTRUSTED
        try:
            key.verify(signature, challenge, padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            return Refusal.SIGNATURE_INVALID
        return None

    async def _check_revocation(self, cert: x509.Certificate, now: datetime) -> Refusal | None:
        if self.ocsp is None:
            return Refusal.OCSP_UNAVAILABLE
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
            return Refusal.OCSP_UNAVAILABLE
        if header(headers, b":status") != b"200":
            return Refusal.OCSP_UNAVAILABLE
        problem, until = ocsp.verdict(answer, cert, self.jpki_ca, now)
        if (
            problem is Refusal.CARD_REVOKED
            and is_smartphone(cert)
            and ocsp.revocation_reason(answer) == x509.ReasonFlags.key_compromise
        ):
            problem = Refusal.SMARTPHONE_LOST  # seed 002 §9: the phone is lost, the card stays good
        if self.ocsp_answers is not None:
            self.ocsp_answers.put(cert.serial_number, problem, until)
        return problem
