"""The smartphone credential (BIZ-7, seed 002): a card substitute kept on a phone.

It is a card-like credential of its own (own RSA key, own certificate from the JPKI CA), so a
kiosk uses it exactly like a card. Rules from seed 002: issued only while the card's
certificate is valid (§4); valid one month from the day of issue (§5.1); reissued automatically
when that month is over, as long as the card's certificate is still valid (§5.2, §6); revoked
when the card's certificate is revoked (§8.1) or when the phone is lost (§9).
"""

from __future__ import annotations

import calendar
import json
import secrets
from datetime import datetime, timedelta

from cryptography.hazmat.primitives.asymmetric import rsa

from kiosk_emu.card import DEFAULT_PIN, Card, CardError, CardStore, PinHash
from topology.pki import file_lock, verify_card_certificate, write_atomic


def add_month(t: datetime) -> datetime:
    """Same day next month, clamped to its last day (Jan 31 -> Feb 28/29)."""
    y, m = (t.year + 1, 1) if t.month == 12 else (t.year, t.month + 1)
    return t.replace(year=y, month=m, day=min(t.day, calendar.monthrange(y, m)[1]))


class SmartphoneStore:
    def __init__(self, cards: CardStore) -> None:
        self.cards = cards
        self.path = cards.dir.parent / "phones.json"

    def _links(self) -> dict[str, dict]:
        try:
            return json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return {}

    def _save_links(self, links: dict[str, dict]) -> None:
        write_atomic(self.path, json.dumps(links, indent=1, sort_keys=True).encode(), 0o600)

    def _usable(self, card: Card, now: datetime) -> str | None:
        if card.serial in self.cards.revocations():
            return "card-revoked"
        return verify_card_certificate(card.certificate, self.cards.pki.jpki_ca, now)

    def issue(self, card_id: str, pin: str = DEFAULT_PIN, phone_id: str | None = None) -> Card:
        """A new phone credential for a card whose certificate is valid now (`phone_id`: a fixed
        id instead of a random one, as the benchmarks' resident keeps)."""
        now = self.cards.clock()
        parent = self.cards.load(card_id)
        problem = self._usable(parent, now)
        if problem is not None:
            raise CardError(f"card {card_id}: no smartphone credential ({problem})")
        phone_id = phone_id or f"phone-{secrets.token_hex(6)}"
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        phone = Card(
            phone_id,
            parent.profile,
            key,
            self._certificate(key, phone_id, card_id, now),
            PinHash.of(pin),
            parent.profile.max_tries,
            on_counter_change=self.cards.save,
        )
        self.cards.save(phone)
        with file_lock(self.path.with_name(".phones.lock")):
            links = self._links()
            links[phone_id] = {"card": card_id, "issued": now.isoformat()}
            self._save_links(links)
        return phone

    def _certificate(self, key: rsa.RSAPrivateKey, phone_id: str, card_id: str, now: datetime):
        # valid until the same day next month (§5.1); dated from a day before, as the cards are, so a
        # clock a little behind the issuer's (a topology restarted at its start time) still takes it
        start = now - timedelta(days=1)
        return self.cards.pki.issue_card_certificate(
            key.public_key(), phone_id, start, days=(add_month(now) - start).days, stands_in_for=card_id
        )

    def current(self, phone_id: str) -> Card:
        """The phone's credential, reissued if its month is over and the card is still good (§5.2)."""
        now = self.cards.clock()
        phone = self.cards.load(phone_id)
        link = self._links().get(phone_id)
        if link is None:
            raise CardError(f"{phone_id} is not a smartphone credential")
        if phone.serial in self.cards.revocations():
            raise CardError(f"{phone_id}: revoked; issue a new one from the card")
        if now > phone.certificate.not_valid_after_utc:
            problem = self._usable(self.cards.load(link["card"]), now)
            if problem is not None:
                raise CardError(f"{phone_id}: expired and not reissued ({problem} on the card)")
            phone.certificate = self._certificate(phone.key, phone_id, link["card"], now)
            self.cards.save(phone)
        return phone

    def phones_of(self, card_id: str) -> list[str]:
        return sorted(p for p, link in self._links().items() if link["card"] == card_id)

    def revoke_card(self, card_id: str, reason: str) -> list[str]:
        """Revoke the card and, with it, every phone credential made from it (§8.1)."""
        self.cards.revoke(card_id, reason)
        phones = self.phones_of(card_id)
        for phone_id in phones:
            self.cards.revoke(phone_id, reason)
        return phones

    def report_lost(self, phone_id: str) -> None:
        """The phone is lost (§9): its credential is revoked; the card stays valid."""
        if phone_id not in self._links():
            raise CardError(f"{phone_id} is not a smartphone credential")
        self.cards.revoke(phone_id, "key-compromise")
