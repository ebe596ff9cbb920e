"""The issuance protocol's messages, declared once and validated on entry (kiosk ↔ center ↔ municipality).

Byte fields travel base64-encoded; ids are opaque; nothing here carries personal data.
"""

from __future__ import annotations

from typing import Literal

import msgspec


class Challenge(msgspec.Struct, frozen=True):
    session: str
    challenge: str  # base64, fresh per session, usable once


class AuthRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    certificate: str  # base64 DER of the card's authentication certificate
    signature: str  # base64 PKCS#1 v1.5 SHA-256 signature over the challenge


class AuthOk(msgspec.Struct, frozen=True):
    status: Literal["authenticated"]
    card: str  # SHA-256 fingerprint of the card certificate


class IssueRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    municipality: str  # municipality code
    cert_type: str
    copies: int = 1
    size: int | None = None  # document size in bytes (benchmarks); None: the municipality's default


class Refusal(msgspec.Struct, frozen=True):
    status: Literal["refused"]
    reason: str
    message: str


class DocumentRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    issuance_id: str
    cert_type: str
    size: int
    card: str  # the authenticated card's opaque id: whose register entry the certificate prints


class Binding(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What the center's signature covers: the document and everything it belongs to (INT-1)."""

    issuance_id: str
    session: str
    kiosk: str
    card: str
    sha256: str
    bytes: int
    cert_type: str
    copies: int
    fee: int


class CompletionNotice(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    issuance_id: str
    session: str
    copies: int
    fee: int
    printed_at: str  # ISO 8601, Asia/Tokyo
    refunded: bool = False  # misprint: fee refunded, every copy stamped 返金済・無効 (BIZ-4)


class NoticeAck(msgspec.Struct, frozen=True):
    status: Literal["acknowledged"]
    issuance_id: str
    duplicate: bool


class MisdeliveryReport(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A kiosk refused a document not bound to its session and says so."""

    session: str
    issuance_id: str
    problem: str


class CorrectionNotice(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Amends a noticed issuance's copies and fee before its month is fixed (001 spec §13.2)."""

    issuance_id: str
    session: str
    copies: int
    fee: int
    reason: str


class CorrectionAck(msgspec.Struct, frozen=True):
    status: Literal["corrected"]
    issuance_id: str
