"""The emulated My Number card: PIN counter per profile, card certificate checks (SEC-KI-1, BIZ-2, BIZ-8)."""

from __future__ import annotations

import json
import re
import stat
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from gateway.business.clock import JST
from gateway.protocol.messages import IssueRequest
from kiosk_emu.card import (
    Card,
    CardNotFound,
    CardProfile,
    CardStore,
    PinLocked,
    WrongPin,
)
from kiosk_emu.flow import KioskFlow
from topology.pki import PKI, verify_card_certificate
from topology.spec.model import Node, Topology

NOW = datetime(2026, 11, 24, 10, 0, tzinfo=JST)
CHALLENGE = b"issuance-challenge-0001"


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    kiosk = Node(id="kiosk-1", kind="kiosk", site="store-1", address="127.10.1.2")
    return PKI.ensure(tmp_path_factory.mktemp("state"), Topology(name="t", nodes={kiosk.id: kiosk}))


@pytest.fixture(scope="session")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    """A second test PKI: same CA names, different keys."""
    return PKI.ensure(tmp_path_factory.mktemp("other"), Topology(name="t", nodes={}))


@pytest.fixture
def store(pki: PKI, tmp_path: Path) -> CardStore:
    return CardStore(tmp_path, pki, clock=lambda: NOW)


@pytest.fixture(scope="session")
def shared_card(pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> tuple[CardStore, Card]:
    """One card for tests that do not change it (RSA keygen is slow)."""
    store = CardStore(tmp_path_factory.mktemp("cards"), pki, clock=lambda: NOW)
    return store, store.new(pin="8642")


def fresh(store: CardStore, shared: Card, profile: CardProfile = CardProfile.MYNUMBER_AUTH, pin: str = "8642") -> Card:
    """A card with its own counter but the shared key, saved in `store` (no key generation)."""
    card = Card(shared.card_id, profile, shared.key, shared.certificate, shared.pin_hash, profile.max_tries)
    store.save(card)
    store.reset_pin(card.card_id, pin)
    return store.load(card.card_id)


def test_right_pin_signs_the_challenge_with_the_certified_key(shared_card: tuple[CardStore, Card]) -> None:
    _, card = shared_card
    signature = card.sign_challenge("8642", CHALLENGE)
    public = card.certificate.public_key()
    assert isinstance(public, rsa.RSAPublicKey) and public.key_size == 2048
    public.verify(signature, CHALLENGE, padding.PKCS1v15(), hashes.SHA256())


def test_card_id_is_opaque_and_fingerprint_is_sha256_of_the_certificate(shared_card: tuple[CardStore, Card]) -> None:
    _, card = shared_card
    assert re.fullmatch(r"card-[0-9a-f]{12}", card.card_id)
    cert = card.certificate
    assert cert.subject.rfc4514_string() == f"CN={card.card_id}"
    fingerprint = cert.fingerprint(hashes.SHA256()).hex()
    assert card.fingerprint == fingerprint and len(card.certificate_der) > 0


def test_wrong_pin_reports_tries_left(store: CardStore, shared_card: tuple[CardStore, Card]) -> None:
    card = fresh(store, shared_card[1])
    with pytest.raises(WrongPin) as first:
        card.sign_challenge("0000", CHALLENGE)
    assert first.value.tries_left == 2
    with pytest.raises(WrongPin) as second:
        card.sign_challenge("0000", CHALLENGE)
    assert second.value.tries_left == 1
    assert "0000" not in str(second.value)


def test_third_wrong_pin_locks_the_auth_pin_and_the_right_one_is_refused_after(
    store: CardStore, shared_card: tuple[CardStore, Card]
) -> None:
    card = fresh(store, shared_card[1])
    for _ in range(2):
        with pytest.raises(WrongPin):
            card.sign_challenge("0000", CHALLENGE)
    with pytest.raises(PinLocked):
        card.sign_challenge("0000", CHALLENGE)
    assert card.locked
    with pytest.raises(PinLocked):
        card.sign_challenge("8642", CHALLENGE)


def test_jpki_2004_password_locks_after_five_wrong_tries(store: CardStore, shared_card: tuple[CardStore, Card]) -> None:
    card = fresh(store, shared_card[1], CardProfile.JPKI_2004_PASSWORD, pin="PASS2004")
    for left in (4, 3, 2, 1):
        with pytest.raises(WrongPin) as wrong:
            card.sign_challenge("WRONG2004", CHALLENGE)
        assert wrong.value.tries_left == left
    with pytest.raises(PinLocked):
        card.sign_challenge("WRONG2004", CHALLENGE)
    with pytest.raises(PinLocked):
        card.sign_challenge("PASS2004", CHALLENGE)


def test_right_pin_resets_the_counter(store: CardStore, shared_card: tuple[CardStore, Card]) -> None:
    card = fresh(store, shared_card[1])
    with pytest.raises(WrongPin):
        card.sign_challenge("0000", CHALLENGE)
    card.sign_challenge("8642", CHALLENGE)
    assert card.tries_left == 3
    assert store.load(card.card_id).tries_left == 3


def test_counter_survives_reloading_the_card(store: CardStore, shared_card: tuple[CardStore, Card]) -> None:
    card = fresh(store, shared_card[1])
    with pytest.raises(WrongPin):
        card.sign_challenge("0000", CHALLENGE)
    assert store.load(card.card_id).tries_left == 2  # written through, no save() needed
    card.tries_left = 1
    store.save(card)
    reloaded = store.load(card.card_id)
    assert reloaded.tries_left == 1
    with pytest.raises(PinLocked):
        reloaded.sign_challenge("0000", CHALLENGE)
    assert store.load(card.card_id).locked


def test_unlock_at_the_counter_resets_a_locked_card(store: CardStore, shared_card: tuple[CardStore, Card]) -> None:
    card = fresh(store, shared_card[1])
    for _ in range(3):
        with pytest.raises((WrongPin, PinLocked)):
            card.sign_challenge("0000", CHALLENGE)
    unlocked = store.unlock(card.card_id)
    assert unlocked.tries_left == 3 and not unlocked.locked
    assert len(store.load(card.card_id).sign_challenge("8642", CHALLENGE)) == 256


def test_pin_is_stored_only_as_a_salted_hash_in_an_owner_only_file(shared_card: tuple[CardStore, Card]) -> None:
    store, card = shared_card
    path = store.dir / f"{card.card_id}.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    data = json.loads(path.read_text())
    assert set(data["pin"]) == {"kdf", "rounds", "salt", "digest"}
    assert "8642" not in json.dumps(data["pin"])


def test_pin_format_follows_the_profile(store: CardStore) -> None:
    with pytest.raises(ValueError, match="4-digit"):
        store.new(pin="12345")
    with pytest.raises(ValueError, match="6-16"):
        store.new(pin="1234", profile=CardProfile.JPKI_2004_PASSWORD)


def test_missing_card_is_reported_clearly(store: CardStore) -> None:
    with pytest.raises(CardNotFound, match=r"card 'card-000000000000' not found in .*cards"):
        store.load("card-000000000000")


def test_list_shows_saved_cards(store: CardStore, shared_card: tuple[CardStore, Card]) -> None:
    card = fresh(store, shared_card[1])
    assert store.list() == [card.card_id]


def test_valid_card_certificate_is_accepted(pki: PKI, shared_card: tuple[CardStore, Card]) -> None:
    assert verify_card_certificate(shared_card[1].certificate, pki.jpki_ca, NOW) is None


def test_expired_card_is_refused(pki: PKI, store: CardStore) -> None:
    card = store.new(expired=True)
    assert card.certificate.not_valid_after_utc < NOW
    assert verify_card_certificate(card.certificate, pki.jpki_ca, NOW) == "card-expired"


def test_card_not_yet_valid_is_refused_with_its_own_reason(pki: PKI, shared_card: tuple[CardStore, Card]) -> None:
    # issued NOW - 1 day; 'card-expired' would send the resident to the municipality for nothing
    assert (
        verify_card_certificate(shared_card[1].certificate, pki.jpki_ca, NOW - timedelta(days=2))
        == "card-not-yet-valid"
    )


def test_card_is_valid_three_years(pki: PKI, shared_card: tuple[CardStore, Card]) -> None:
    cert = shared_card[1].certificate
    assert verify_card_certificate(cert, pki.jpki_ca, NOW + timedelta(days=3 * 365 - 1)) is None
    assert verify_card_certificate(cert, pki.jpki_ca, NOW + timedelta(days=3 * 365 + 1)) == "card-expired"


def test_legacy_sha1_rsa1024_card_is_refused_by_default(pki: PKI, store: CardStore) -> None:
    card = store.new(legacy=True)
    assert card.key.key_size == 1024
    assert verify_card_certificate(card.certificate, pki.jpki_ca, NOW) == "legacy-profile-refused"
    assert verify_card_certificate(card.certificate, pki.jpki_ca, NOW, allow_legacy=True) is None


def test_card_from_another_ca_is_untrusted(pki: PKI, other_pki: PKI, shared_card: tuple[CardStore, Card]) -> None:
    foreign = other_pki.issue_card_certificate(shared_card[1].key.public_key(), "card-foreign00000", NOW)
    assert foreign.issuer == pki.jpki_ca.subject  # same name, different key: only the signature tells
    assert verify_card_certificate(foreign, pki.jpki_ca, NOW) == "card-untrusted"


def test_revocations_persist_with_time_and_reason(
    pki: PKI, store: CardStore, shared_card: tuple[CardStore, Card]
) -> None:
    card = fresh(store, shared_card[1])
    store.revoke(card.card_id, "key-compromise")
    store.revoke(card.card_id, "voluntary")  # already revoked: the first entry stands
    assert CardStore(store.dir.parent, pki).revocations() == {card.serial: (NOW, "key-compromise")}
    with pytest.raises(ValueError, match="unknown revocation reason"):
        store.revoke(card.card_id, "lost-wallet")


def test_pool_is_created_once_and_reused_without_key_generation(
    pki: PKI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = CardStore(tmp_path, pki, clock=lambda: NOW)
    first = store.ensure_pool(3)
    assert [c.card_id for c in first] == ["pool-0000", "pool-0001", "pool-0002"]
    first[1].tries_left = 0  # a previous run locked it
    store.save(first[1])

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("pool cards were regenerated")

    monkeypatch.setattr(rsa, "generate_private_key", refuse)
    again = CardStore(tmp_path, pki, clock=lambda: NOW).ensure_pool(3)
    assert [c.fingerprint for c in again] == [c.fingerprint for c in first]
    assert all(c.tries_left == 3 for c in again)
    again[1].sign_challenge("1234", CHALLENGE)


def test_pool_replaces_revoked_or_expired_certificates_but_keeps_keys(pki: PKI, tmp_path: Path) -> None:
    store = CardStore(tmp_path, pki, clock=lambda: NOW)
    before = store.ensure_pool(1)[0]
    store.revoke(before.card_id, "key-compromise")
    after = store.ensure_pool(1)[0]
    assert after.serial != before.serial and after.key.private_numbers() == before.key.private_numbers()
    later = CardStore(tmp_path, pki, clock=lambda: NOW + timedelta(days=4 * 365)).ensure_pool(1)[0]
    assert verify_card_certificate(later.certificate, pki.jpki_ca, NOW + timedelta(days=4 * 365)) is None


@pytest.mark.parametrize("left, screen", [(2, "The PIN is wrong. 2 tries left."), (1, "The PIN is wrong. 1 try left.")])
def test_the_kiosk_screen_counts_tries_left_in_english(left, screen) -> None:
    flow = KioskFlow("kiosk-a1-1", None, "0000", IssueRequest("131016", "residence-record"), None)
    flow.refuse("pin-wrong", tries_left=left)
    assert flow.outcome.message == screen
