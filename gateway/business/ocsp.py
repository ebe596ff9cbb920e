"""JPKI validity checks over OCSP (RFC 6960), sans-IO: DER bytes in, DER bytes or a verdict out.

The issuance center asks whether a card certificate is still good before it issues (BIZ-2,
BIZ-8). `OcspResponder` answers for one issuer, signing with a delegated responder certificate
(EKU OCSPSigning) so the CA key stays offline; `check_response` is the relying party's side.
All ASN.1 is cryptography's `x509.ocsp`; this module only decides.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from enum import Enum
from functools import lru_cache
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    PublicKeyTypes,
)
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID

from gateway.business.refusal import Refusal
from topology.pki import REVOCATION_REASONS

Revocations = Callable[[], Mapping[int, tuple[datetime, str]]]

DEFAULT_VALIDITY = timedelta(minutes=10)  # how long a response may be relied on (nextUpdate)
DEFAULT_SKEW = timedelta(minutes=5)  # tolerated clock difference between responder and checker
CRL_VALIDITY = timedelta(days=1)  # a CRL's nextUpdate


def build_request(cert: x509.Certificate, issuer: x509.Certificate) -> bytes:
    """A DER OCSPRequest for one certificate, CertID hashed with SHA-256."""
    request = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA256()).build()
    return request.public_bytes(serialization.Encoding.DER)


class OcspResponder:
    """Answers good / revoked / unknown for certificates of `issuer_cert`; never raises on input."""

    def __init__(
        self,
        issuer_cert: x509.Certificate,
        signer_cert: x509.Certificate,
        signer_key: CertificateIssuerPrivateKeyTypes,
        revocations: Revocations,
        clock: Callable[[], datetime],
        validity: timedelta = DEFAULT_VALIDITY,
    ) -> None:
        self.issuer_cert = issuer_cert
        self.signer_cert = signer_cert
        self.signer_key = signer_key
        self.revocations = revocations
        self.clock = clock
        self.validity = validity

    def respond(self, request_der: bytes) -> bytes:
        try:
            request = ocsp.load_der_ocsp_request(request_der)
            algorithm = request.hash_algorithm
            cert_id = (request.issuer_name_hash, request.issuer_key_hash)
            serial = request.serial_number
        except (ValueError, TypeError, NotImplementedError, UnsupportedAlgorithm):
            # NotImplementedError: cryptography parses one CertID per request; several read as malformed.
            return _unsuccessful(ocsp.OCSPResponseStatus.MALFORMED_REQUEST)
        revoked_at: datetime | None = None
        reason: x509.ReasonFlags | None = None
        if cert_id != issuer_hashes(self.issuer_cert, algorithm):
            status = ocsp.OCSPCertStatus.UNKNOWN  # not a certificate of the CA we answer for
        elif (entry := self.revocations().get(serial)) is not None:
            status, revoked_at, reason = ocsp.OCSPCertStatus.REVOKED, entry[0], REVOCATION_REASONS.get(entry[1])
        else:
            status = ocsp.OCSPCertStatus.GOOD
        now = self.clock()
        response = (
            ocsp.OCSPResponseBuilder()
            .add_response_by_hash(*cert_id, serial, algorithm, status, now, now + self.validity, revoked_at, reason)
            .responder_id(ocsp.OCSPResponderEncoding.HASH, self.signer_cert)
            .certificates([self.signer_cert])
            .sign(self.signer_key, hashes.SHA256())
        )
        return response.public_bytes(serialization.Encoding.DER)


def build_crl(
    issuer_cert: x509.Certificate,
    issuer_key: CertificateIssuerPrivateKeyTypes,
    revocations: Mapping[int, tuple[datetime, str]],
    now: datetime,
    validity: timedelta = CRL_VALIDITY,
) -> bytes:
    """A DER CRL (RFC 5280) of every revoked serial, signed by the CA itself (BIZ-8).

    Each entry carries its revocation date and CRLReason (the seed-004 cause mapped as in OCSP);
    the CRL number is the issue time in seconds, so later CRLs have larger numbers."""
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer_cert.subject)
        .last_update(now)
        .next_update(now + validity)
        .add_extension(x509.CRLNumber(int(now.timestamp())), critical=False)
    )
    try:
        ski = issuer_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
    except x509.ExtensionNotFound:
        pass
    for serial, (revoked_at, cause) in sorted(revocations.items()):
        entry = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(revoked_at)
        reason = REVOCATION_REASONS.get(cause)
        if reason is not None:
            entry = entry.add_extension(x509.CRLReason(reason), critical=False)
        builder = builder.add_revoked_certificate(entry.build())
    return builder.sign(issuer_key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def check_response(
    response_der: bytes,
    cert: x509.Certificate,
    issuer: x509.Certificate,
    now: datetime,
    skew: timedelta = DEFAULT_SKEW,
) -> Refusal | None:
    """None if the response proves `cert` good at `now`; else "card-revoked", "ocsp-unknown" or "ocsp-invalid".

    "ocsp-invalid" covers everything that makes the response unusable as proof: unparsable, not
    successful, bad signature, a signer the issuer did not delegate, another certificate's
    answer, issued in the future or past its nextUpdate.
    """
    return verdict(response_der, cert, issuer, now, skew)[0]


def verdict(
    response_der: bytes,
    cert: x509.Certificate,
    issuer: x509.Certificate,
    now: datetime,
    skew: timedelta = DEFAULT_SKEW,
) -> tuple[Refusal | None, datetime | None]:
    """`check_response`'s answer and, for a good or revoked certificate, the response's nextUpdate:
    until then the answer may be relied on (RFC 6960 §2.4, §4.2.2.1)."""
    try:
        response = ocsp.load_der_ocsp_response(response_der)
        if response.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
            return Refusal.OCSP_INVALID, None
        signer = _authorised_signer(response, issuer, now)
        if signer is None or not _signature_valid(signer.public_key(), response):
            return Refusal.OCSP_INVALID, None
        single = next((s for s in response.responses if _answers_for(s, cert, issuer)), None)
        if single is None:
            return Refusal.OCSP_INVALID, None
        next_update = single.next_update_utc
        if single.this_update_utc > now + skew or next_update is None or now > next_update:
            return Refusal.OCSP_INVALID, None
        status = single.certificate_status
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return Refusal.OCSP_INVALID, None
    if status == ocsp.OCSPCertStatus.GOOD:
        return None, next_update
    if status == ocsp.OCSPCertStatus.REVOKED:
        return Refusal.CARD_REVOKED, next_update
    return Refusal.OCSP_UNKNOWN, None


def revocation_reason(response_der: bytes) -> x509.ReasonFlags | None:
    """The reason a response that `verdict` found revoked gives (a lost phone: key compromise)."""
    single = next(iter(ocsp.load_der_ocsp_response(response_der).responses), None)
    return single.revocation_reason if single is not None else None


class Miss(Enum):
    MISS = "miss"  # OcspCache.get: nothing to rely on, ask the responder


MISS = Miss.MISS


class OcspCache:
    """The relying party's memory of definitive answers (good, revoked) per certificate serial,
    each until its response's nextUpdate. A card revoked after a good answer is refused at the
    latest when that answer expires: the responder's validity (10 minutes by default), as with
    any OCSP client that caches. Bounded: past `limit` entries the oldest goes."""

    def __init__(self, limit: int = 100_000) -> None:
        self.limit = limit
        self._answers: dict[int, tuple[Refusal | None, datetime]] = {}
        self.hits = 0

    def get(self, serial: int, now: datetime) -> Refusal | None | Literal[Miss.MISS]:
        answer = self._answers.get(serial)
        if answer is None:
            return MISS
        if now > answer[1]:
            del self._answers[serial]
            return MISS
        self.hits += 1
        return answer[0]

    def put(self, serial: int, problem: Refusal | None, until: datetime | None) -> None:
        if until is None:  # nothing definitive (invalid, unknown): ask again next time
            return
        self._answers.pop(serial, None)
        self._answers[serial] = (problem, until)
        if len(self._answers) > self.limit:
            del self._answers[next(iter(self._answers))]


def issuer_hashes(issuer: x509.Certificate, algorithm: hashes.HashAlgorithm) -> tuple[bytes, bytes]:
    """The CertID's (issuerNameHash, issuerKeyHash) of certificates issued by `issuer`."""
    return _issuer_hashes(issuer, type(algorithm))


# Facts of a certificate alone, or of two, computed once: every request and every answer for a
# card names the same CA and carries the same responder certificate. A certificate is equal to
# (and hashes as) its DER bytes, so a cache entry is about exactly those bytes; what depends on
# the time (validity) is still checked at every use. What it saves: docs/performance.md.
@lru_cache(maxsize=256)
def _issuer_hashes(issuer: x509.Certificate, algorithm: type[hashes.HashAlgorithm]) -> tuple[bytes, bytes]:
    alg = algorithm()
    return _digest(alg, issuer.subject.public_bytes()), _digest(alg, _key_bits(issuer.public_key()))


@lru_cache(maxsize=256)
def _key_hash(cert: x509.Certificate) -> bytes:
    """SHA-1 of the certificate's key bits: what a ResponderID byKey names."""
    return _digest(hashes.SHA1(), _key_bits(cert.public_key()))


@lru_cache(maxsize=256)
def _signs_ocsp_for(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """`issuer` signed `cert` and gave it the OCSPSigning key usage (validity aside)."""
    try:
        cert.verify_directly_issued_by(issuer)
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
        return False
    return ExtendedKeyUsageOID.OCSP_SIGNING in eku


def _authorised_signer(response: ocsp.OCSPResponse, issuer: x509.Certificate, now: datetime) -> x509.Certificate | None:
    """The certificate whose key must have signed the response: the issuer itself, or a
    responder certificate it issued for OCSP signing (RFC 6960 §4.2.2.2)."""
    for candidate in (issuer, *response.certificates):
        if not _is_responder(response, candidate):
            continue
        if candidate == issuer:
            return issuer
        if _delegated_by(candidate, issuer, now):
            return candidate
    return None


def _is_responder(response: ocsp.OCSPResponse, cert: x509.Certificate) -> bool:
    if response.responder_key_hash is not None:
        return response.responder_key_hash == _key_hash(cert)
    return response.responder_name == cert.subject


def _delegated_by(cert: x509.Certificate, issuer: x509.Certificate, now: datetime) -> bool:
    return _signs_ocsp_for(cert, issuer) and cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


def _signature_valid(key: PublicKeyTypes, response: ocsp.OCSPResponse) -> bool:
    algorithm = response.signature_hash_algorithm
    try:
        if isinstance(key, ec.EllipticCurvePublicKey) and algorithm is not None:
            key.verify(response.signature, response.tbs_response_bytes, ec.ECDSA(algorithm))
        elif isinstance(key, rsa.RSAPublicKey) and algorithm is not None:
            key.verify(response.signature, response.tbs_response_bytes, padding.PKCS1v15(), algorithm)
        elif isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(response.signature, response.tbs_response_bytes)
        else:
            return False
    except InvalidSignature:
        return False
    return True


def _answers_for(single: ocsp.OCSPSingleResponse, cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    return single.serial_number == cert.serial_number and (
        single.issuer_name_hash,
        single.issuer_key_hash,
    ) == issuer_hashes(issuer, single.hash_algorithm)


def _key_bits(key: PublicKeyTypes) -> bytes:
    # The contents of SubjectPublicKeyInfo's BIT STRING, which is what CertID and ResponderID hash.
    if isinstance(key, rsa.RSAPublicKey):
        return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
    if isinstance(key, ec.EllipticCurvePublicKey):
        return key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    raise TypeError(f"no OCSP key hash for {type(key).__name__}")


def _digest(algorithm: hashes.HashAlgorithm, data: bytes) -> bytes:
    h = hashes.Hash(algorithm)
    h.update(data)
    return h.finalize()


def _unsuccessful(status: ocsp.OCSPResponseStatus) -> bytes:
    return ocsp.OCSPResponseBuilder.build_unsuccessful(status).public_bytes(serialization.Encoding.DER)
