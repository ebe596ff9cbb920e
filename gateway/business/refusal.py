"""Why a certificate request is refused: one vocabulary for the center, the kiosk and the reports.

A member's value is its wire spelling: the `reason` of a refusal's JSON body and its
`konbini-reason` header, the metrics' label, the load generator's count key. Being a StrEnum, a
member equals its spelling, so a count or a comparison keyed by the text still finds it. Each
member carries the center's message (a template its fields fill; None where only the kiosk
refuses) and the kiosk's screen text (the center's message unless the kiosk words it itself).
"""

from __future__ import annotations

from enum import StrEnum

UNAVAILABLE = "The service is temporarily unavailable."
SESSION_ENDED = "Your session has ended. Please start again."


class Refusal(StrEnum):
    message: str | None
    screen: str

    def __new__(cls, wire: str, message: str | None, screen: str | None = None) -> Refusal:
        member = str.__new__(cls, wire)
        member._value_ = wire
        member.message = message
        member.screen = screen if screen is not None else message or wire
        return member

    # business rules (BIZ-1..3): gateway/business/rules.py
    MUNICIPALITY_UNKNOWN = "municipality-unknown", "This municipality does not offer convenience-store issuance."
    MUNICIPALITY_NOT_PARTICIPATING = (
        "municipality-not-participating",
        "{municipality} does not take part in convenience-store issuance.",
    )
    OUTSIDE_HOURS = "outside-hours", "The service is not available now. Hours: {hours} (Japan time)."
    CERTIFICATE_TYPE_NOT_OFFERED = (
        "certificate-type-not-offered",
        "{municipality} does not offer this certificate here.",
    )
    COPIES_OUT_OF_RANGE = "copies-out-of-range", "From 1 to {max_copies} copies can be printed at a time."
    # the card: its certificate, its signature, its revocation (topology/pki.py, gateway/business/ocsp.py)
    CARD_EXPIRED = "card-expired", "This card has expired. Please ask your municipality."
    CARD_NOT_YET_VALID = (
        "card-not-yet-valid",
        "This card is not valid yet. Please check the date, or ask your municipality.",
    )
    CARD_REVOKED = "card-revoked", "This card's certificate is no longer valid. Please ask your municipality."
    CARD_UNTRUSTED = "card-untrusted", "This card cannot be read. Please ask your municipality."
    LEGACY_PROFILE_REFUSED = "legacy-profile-refused", "This card's certificate profile is no longer accepted."
    SIGNATURE_INVALID = "signature-invalid", "Card authentication failed. Please try again."
    # a smartphone credential (seed 002) refused for its own certificate says so: the resident may
    # still hold a good card
    SMARTPHONE_EXPIRED = (
        "smartphone-expired",
        "This smartphone's credential has expired and your card's certificate is no longer valid. "
        "Please ask your municipality.",
    )
    SMARTPHONE_REVOKED = (
        "smartphone-revoked",
        "This smartphone's credential was revoked with your card's certificate. Please ask your municipality.",
    )
    SMARTPHONE_LOST = (
        "smartphone-lost",
        "This smartphone's credential was reported lost and no longer works. Please use your My Number card.",
    )
    OCSP_UNAVAILABLE = "ocsp-unavailable", UNAVAILABLE
    OCSP_INVALID = "ocsp-invalid", UNAVAILABLE
    OCSP_UNKNOWN = "ocsp-unknown", "This card cannot be used. Please ask your municipality."
    # the session and the request
    SESSION_UNKNOWN = "session-unknown", SESSION_ENDED
    SESSION_STATE = "session-state", SESSION_ENDED
    BAD_REQUEST = "bad-request", "The request could not be understood."
    MUNICIPALITY_UNAVAILABLE = "municipality-unavailable", UNAVAILABLE
    # the ledger: notices and corrections (BIZ-5/6)
    MONTH_FIXED = "month-fixed", "This month's settlement is fixed; its records cannot change."
    NOTICE_MISMATCH = "notice-mismatch", "The notice does not match the issuance; send a correction instead."
    NOT_NOTICED = "not-noticed", "This issuance has no completion notice yet; nothing to correct."
    LEDGER_UNAVAILABLE = "ledger-unavailable", UNAVAILABLE
    # the kiosk's own: its card, or a center that authenticated another card
    PIN_WRONG = "pin-wrong", None, "The PIN is wrong. {tries} left."
    PIN_LOCKED = "pin-locked", None, "The PIN is locked. Please ask your municipality to unlock it."
    CARD_MISMATCH = "card-mismatch", None, "This card could not be authenticated. Please ask staff."

    def says(self, **fields: str) -> str:
        """The center's message with its fields filled (the spelling where it has none)."""
        return (self.message or self.value).format(**fields)

    @classmethod
    def read(cls, wire: str) -> Refusal | None:
        """The member a wire spelling names; None for one this konbini does not know."""
        return _BY_WIRE.get(wire)


_BY_WIRE = {refusal.value: refusal for refusal in Refusal}
