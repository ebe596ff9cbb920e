"""The emulated My Number card: an RSA authentication key, its JPKI-like certificate and a PIN counter.

A real card keeps the key and the retry counter inside its chip; here a `CardStore` keeps them in
`<state_dir>/cards/<card id>.json` (mode 0600) and writes the counter through on every change,
so a wrong PIN is never forgotten by reloading the card. Revocations (BIZ-8) live next to the
cards in `<state_dir>/revocations.json`, keyed by certificate serial, for the OCSP responder.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from gateway.business import residents
from gateway.business.clock import JST
from topology.pki import (
    CARD_VALIDITY_DAYS,
    PKI,
    REVOCATION_REASONS,
    card_id_of,
    file_lock,
    load_private_key,
    verify_card_certificate,
    write_atomic,
)

# The retry counter, not the hash cost, is what protects a 4-digit PIN (10^4 guesses); like the
# chip it emulates, the card only has to avoid keeping the PIN in clear. 1000 rounds of
# PBKDF2-SHA256 cost ~0.3 ms, cheap enough to verify on every issuance in a benchmark.
_PBKDF2_ROUNDS = 1000
_CARD_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
_FORMAT = 1


DEFAULT_PIN = "1234"  # the PIN of pool cards, and of a new card unless one is given


class CardProfile(StrEnum):
    """Which secret guards the key and how many wrong tries it takes (BIZ-2)."""

    MYNUMBER_AUTH = "mynumber-auth"  # the 4-digit authentication PIN kiosks ask for
    JPKI_2004_PASSWORD = "jpki-2004-password"  # seed 004's older profile (§10)

    @property
    def max_tries(self) -> int:
        return _PIN_RULES[self][0]

    def check_pin_format(self, pin: str) -> None:
        """Raise ValueError unless `pin` is a secret this profile can be set to."""
        pattern, rule = _PIN_RULES[self][1:]
        if not pattern.fullmatch(pin):
            raise ValueError(f"a {self.value} card needs {rule}")


_PIN_RULES: dict[CardProfile, tuple[int, re.Pattern[str], str]] = {
    CardProfile.MYNUMBER_AUTH: (3, re.compile(r"[0-9]{4}"), "a 4-digit PIN"),
    CardProfile.JPKI_2004_PASSWORD: (5, re.compile(r"[A-Za-z0-9]{6,16}"), "a password of 6-16 letters and digits"),
}


class CardError(Exception):
    """A card refusal the kiosk shows to the user (BIZ-2); never carries the PIN."""


class WrongPin(CardError):
    def __init__(self, tries_left: int) -> None:
        super().__init__(f"wrong PIN: {tries_left} {'try' if tries_left == 1 else 'tries'} left before the card locks")
        self.tries_left = tries_left


class PinLocked(CardError):
    def __init__(self, card_id: str, max_tries: int) -> None:
        super().__init__(
            f"card {card_id}: PIN locked after {max_tries} wrong tries; unlock it at the municipality counter"
        )


class CardNotFound(CardError):
    pass


class CardExists(CardError):
    """A new card would replace one: its key, certificate and PIN counter would be lost."""


@dataclass(frozen=True)
class PinHash:
    """A PIN as the card keeps it: salted PBKDF2, compared in constant time."""

    salt: bytes
    digest: bytes
    rounds: int = _PBKDF2_ROUNDS

    @classmethod
    def of(cls, pin: str) -> PinHash:
        salt = secrets.token_bytes(16)
        return cls(salt, _pbkdf2(pin, salt, _PBKDF2_ROUNDS))

    def matches(self, pin: str) -> bool:
        return hmac.compare_digest(_pbkdf2(pin, self.salt, self.rounds), self.digest)


@dataclass(eq=False)
class Card:
    card_id: str
    profile: CardProfile
    key: rsa.RSAPrivateKey = field(repr=False)
    certificate: x509.Certificate = field(repr=False)
    pin_hash: PinHash = field(repr=False)
    tries_left: int
    # Set by the CardStore: persists the counter the moment it changes, as the chip would.
    on_counter_change: Callable[[Card], None] | None = field(default=None, repr=False, compare=False)

    @property
    def locked(self) -> bool:
        return self.tries_left <= 0

    @property
    def certificate_der(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.DER)

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.certificate_der).hexdigest()

    @property
    def serial(self) -> int:
        return self.certificate.serial_number

    @property
    def holder(self) -> residents.Resident:
        """The card's face (券面事項): whose card, or whose card a smartphone credential stands in for."""
        return residents.holder(card_id_of(self.certificate))

    def sign_challenge(self, pin: str, challenge: bytes) -> bytes:
        """Verify the PIN, then sign `challenge` with the auth key (RSA PKCS#1 v1.5, SHA-256).

        A wrong PIN raises WrongPin with the tries left; the wrong try that uses up the last one,
        and every try after it, raises PinLocked. A right PIN resets the counter.
        """
        if self.locked:
            raise PinLocked(self.card_id, self.profile.max_tries)
        if not self.pin_hash.matches(pin):
            self._set_tries(self.tries_left - 1)
            if self.locked:
                raise PinLocked(self.card_id, self.profile.max_tries)
            raise WrongPin(self.tries_left)
        if self.tries_left != self.profile.max_tries:
            self._set_tries(self.profile.max_tries)
        return self.key.sign(challenge, padding.PKCS1v15(), hashes.SHA256())

    def _set_tries(self, tries: int) -> None:
        self.tries_left = tries
        if self.on_counter_change is not None:
            self.on_counter_change(self)


class CardStore:
    """The cards of one state directory, and the revocation list the OCSP responder serves."""

    def __init__(self, state_dir: Path, pki: PKI, clock: Callable[[], datetime] = lambda: datetime.now(JST)) -> None:
        self.dir = Path(state_dir) / "cards"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.revocations_path = Path(state_dir) / "revocations.json"
        self.pki = pki
        self.clock = clock
        self._revocations_cache: tuple[tuple[int, int, int], dict[int, tuple[datetime, str]]] | None = None

    def new(
        self,
        pin: str = DEFAULT_PIN,
        profile: CardProfile | str = CardProfile.MYNUMBER_AUTH,
        card_id: str | None = None,
        expired: bool = False,
        legacy: bool = False,
        not_before: datetime | None = None,
    ) -> Card:
        """Issue a card: fresh key, certificate from the JPKI CA, PIN set, counter full; saved.

        `expired` gives a certificate whose validity ended yesterday; `legacy` the refused
        SHA-1/RSA-1024 profile of seed 004 (BIZ-8). An id already in the store raises CardExists.
        """
        profile = CardProfile(profile)
        profile.check_pin_format(pin)
        card_id = card_id or f"card-{secrets.token_hex(6)}"
        if self._path(card_id).exists():  # validates the id too, before the slow key generation
            raise CardExists(
                f"card {card_id!r} already exists in {self.dir}; choose another id "
                "(`konbini card list` shows the cards there)"
            )
        key = rsa.generate_private_key(public_exponent=65537, key_size=1024 if legacy else 2048)
        card = Card(
            card_id=card_id,
            profile=profile,
            key=key,
            certificate=self._certificate(key, card_id, expired, legacy, not_before),
            pin_hash=PinHash.of(pin),
            tries_left=profile.max_tries,
            on_counter_change=self.save,
        )
        self.save(card)
        return card

    def load(self, card_id: str) -> Card:
        path = self._path(card_id)
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            raise CardNotFound(
                f"card {card_id!r} not found in {self.dir}; `konbini card list` shows the cards there"
            ) from None
        key = load_private_key(data["key"].encode())
        if not isinstance(key, rsa.RSAPrivateKey):
            raise CardError(f"{path}: the card key is not an RSA key")
        pin = data["pin"]
        return Card(
            card_id=data["card_id"],
            profile=CardProfile(data["profile"]),
            key=key,
            certificate=x509.load_pem_x509_certificate(data["certificate"].encode()),
            pin_hash=PinHash(bytes.fromhex(pin["salt"]), bytes.fromhex(pin["digest"]), pin["rounds"]),
            tries_left=data["tries_left"],
            on_counter_change=self.save,
        )

    def save(self, card: Card) -> None:
        data = {
            "format": _FORMAT,
            "card_id": card.card_id,
            "profile": card.profile.value,
            "tries_left": card.tries_left,
            "pin": {
                "kdf": "pbkdf2-sha256",
                "rounds": card.pin_hash.rounds,
                "salt": card.pin_hash.salt.hex(),
                "digest": card.pin_hash.digest.hex(),
            },
            "certificate": card.certificate.public_bytes(serialization.Encoding.PEM).decode(),
            "key": card.key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ).decode(),
        }
        write_atomic(self._path(card.card_id), json.dumps(data, indent=1).encode(), 0o600)

    def list(self) -> list[str]:
        """Card ids in the store, sorted."""
        return sorted(p.stem for p in self.dir.glob("*.json"))

    def unlock(self, card_id: str) -> Card:
        """The counter procedure (004 §10): reset the retry counter of a locked card."""
        card = self.load(card_id)
        card.tries_left = card.profile.max_tries
        self.save(card)
        return card

    def reset_pin(self, card_id: str, pin: str) -> Card:
        """The counter procedure for a forgotten PIN (004 §10.1): set a new one, counter full."""
        card = self.load(card_id)
        card.profile.check_pin_format(pin)
        card.pin_hash = PinHash.of(pin)
        card.tries_left = card.profile.max_tries
        self.save(card)
        return card

    def ensure_pool(self, n: int, pin: str = DEFAULT_PIN) -> list[Card]:
        """Cards "pool-0000".. ready for issuance: PIN `pin`, counter full, certificate valid now and
        not revoked. Existing cards are repaired without key generation; only missing ones are created."""
        now = self.clock()
        revoked = self.revocations()
        cards = []
        for i in range(n):
            card_id = f"pool-{i:04d}"
            if not self._path(card_id).exists():
                cards.append(self.new(pin=pin, card_id=card_id))
                continue
            card = self.load(card_id)
            changed = False
            if card.profile is not CardProfile.MYNUMBER_AUTH or not card.pin_hash.matches(pin):
                card.profile, card.pin_hash, changed = CardProfile.MYNUMBER_AUTH, PinHash.of(pin), True
            if card.tries_left != card.profile.max_tries:
                card.tries_left, changed = card.profile.max_tries, True
            if card.serial in revoked or verify_card_certificate(card.certificate, self.pki.jpki_ca, now) is not None:
                if card.key.key_size < 2048:
                    card.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
                card.certificate, changed = self._certificate(card.key, card_id, False, False, None), True
            if changed:
                self.save(card)
            cards.append(card)
        return cards

    def revoke(self, card_id: str, reason: str) -> bool:
        """Revoke the card's current certificate (BIZ-8). False when it was revoked already: the
        first date and reason stand (a card revoked with its phones meets a phone revoked before)."""
        if reason not in REVOCATION_REASONS:
            raise ValueError(f"unknown revocation reason {reason!r}; one of: {', '.join(REVOCATION_REASONS)}")
        serial = self.load(card_id).serial
        with file_lock(self.revocations_path.with_name(".revocations.lock")):
            entries = self._read_revocations()
            if str(serial) in entries:
                return False
            entries[str(serial)] = {"at": self.clock().isoformat(), "reason": reason, "card_id": card_id}
            write_atomic(self.revocations_path, json.dumps(entries, indent=1, sort_keys=True).encode(), 0o644)
        return True

    def revocations(self) -> Mapping[int, tuple[datetime, str]]:
        """Revoked serial -> (revocation time, seed-004 reason); re-read only when the file changed.

        The OCSP responder calls this per request, so the parsed list is shared, not copied."""
        try:
            st = self.revocations_path.stat()
        except FileNotFoundError:
            return {}
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if self._revocations_cache is None or self._revocations_cache[0] != stamp:
            entries = self._read_revocations().items()
            parsed = {int(serial): (datetime.fromisoformat(e["at"]), e["reason"]) for serial, e in entries}
            self._revocations_cache = (stamp, parsed)
        return self._revocations_cache[1]

    def _read_revocations(self) -> dict[str, dict[str, str]]:
        try:
            return json.loads(self.revocations_path.read_bytes())
        except FileNotFoundError:
            return {}

    def _certificate(
        self, key: rsa.RSAPrivateKey, card_id: str, expired: bool, legacy: bool, not_before: datetime | None
    ) -> x509.Certificate:
        if not_before is None:
            now = self.clock()
            # A live card was issued a day ago, so an emulated clock set a little earlier still accepts it.
            not_before = now - timedelta(days=CARD_VALIDITY_DAYS + 1) if expired else now - timedelta(days=1)
        return self.pki.issue_card_certificate(key.public_key(), card_id, not_before, legacy=legacy)

    def _path(self, card_id: str) -> Path:
        if not _CARD_ID.match(card_id):
            raise ValueError(f"card id {card_id!r}: use lowercase letters, digits and '-' (e.g. card-1a2b3c4d5e6f)")
        return self.dir / f"{card_id}.json"


def _pbkdf2(pin: str, salt: bytes, rounds: int) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", pin.encode(), salt, rounds)
