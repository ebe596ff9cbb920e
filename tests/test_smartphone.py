"""The smartphone credential (BIZ-7): one month, reissued at expiry, revoked with the card or on loss."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from gateway.business.clock import JST
from gateway.business.ledger import LedgerDB
from gateway.protocol.messages import IssueRequest
from kiosk_emu.card import CardError, CardStore
from kiosk_emu.kiosk import issue_at
from kiosk_emu.smartphone import SmartphoneStore, add_month
from tests.conftest import TEST_TIME
from topology.pki import PKI, card_id_of, is_smartphone, verify_card_certificate


class Now:
    def __init__(self, t: datetime) -> None:
        self.t = t

    def __call__(self) -> datetime:
        return self.t


def test_add_month_clamps_to_the_end_of_a_short_month():
    assert add_month(datetime(2026, 1, 31, 9, tzinfo=JST)) == datetime(2026, 2, 28, 9, tzinfo=JST)
    assert add_month(datetime(2026, 12, 15, tzinfo=JST)) == datetime(2027, 1, 15, tzinfo=JST)


@pytest.fixture
def phones(state):
    now = Now(TEST_TIME)
    cards = CardStore(state, _pki(state), now)
    return cards, SmartphoneStore(cards), now


def _pki(state):
    from topology.spec.load import DEFAULT_TOPOLOGY, load_topology

    return PKI.ensure(state, load_topology(DEFAULT_TOPOLOGY))


def test_valid_one_month_then_reissued_automatically(phones):
    cards, store, now = phones
    card = cards.new()
    phone = store.issue(card.card_id)
    ca = cards.pki.jpki_ca
    assert phone.certificate.not_valid_after_utc == add_month(TEST_TIME)
    assert verify_card_certificate(phone.certificate, ca, TEST_TIME + timedelta(days=29)) is None
    now.t = TEST_TIME + timedelta(days=31)  # 24 Dec: the month is over
    assert verify_card_certificate(phone.certificate, ca, now.t) == "card-expired"
    again = store.current(phone.card_id)
    assert again.serial != phone.serial and verify_card_certificate(again.certificate, ca, now.t) is None


def test_revoked_with_the_card_and_on_loss(phones):
    cards, store, _ = phones
    card = cards.new()
    p1, p2 = store.issue(card.card_id), store.issue(card.card_id)
    store.report_lost(p1.card_id)
    assert p1.serial in cards.revocations() and card.serial not in cards.revocations()
    assert store.revoke_card(card.card_id, "moved-or-died") == sorted([p1.card_id, p2.card_id])
    assert p2.serial in cards.revocations()
    with pytest.raises(CardError, match="revoked"):
        store.current(p2.card_id)
    with pytest.raises(CardError, match="card-revoked"):
        store.issue(card.card_id)


async def test_a_kiosk_accepts_the_phone_like_a_card_and_refuses_it_once_revoked(net):
    store = SmartphoneStore(net.cards)
    phone = store.issue(net.cards.new().card_id)
    r = await issue_at(net, "kiosk-b2-1", phone, "1234", IssueRequest("131016", "residence-record"))
    assert r.status == "issued"
    store.report_lost(phone.card_id)
    r = await issue_at(net, "kiosk-b2-1", phone, "1234", IssueRequest("131016", "residence-record"))
    assert (r.status, r.reason) == ("refused", "smartphone-lost")


def test_a_phone_credential_stands_in_for_its_cards_holder(phones):
    cards, store, _ = phones
    card = cards.new()
    phone = store.issue(card.card_id)
    assert phone.card_id != card.card_id and phone.holder == card.holder
    assert card_id_of(phone.certificate) == card.card_id and is_smartphone(phone.certificate)
    assert not is_smartphone(card.certificate)


async def test_a_phone_issues_in_the_same_flow_and_the_ledger_names_the_card(net):
    store = SmartphoneStore(net.cards)
    card = net.cards.new()
    phone = store.issue(card.card_id)
    r = await issue_at(net, "kiosk-a1-1", phone, "1234", IssueRequest("131016", "residence-record"))
    assert (r.status, r.signature_valid) == ("issued", True)
    ledger = LedgerDB(net.state_dir / "ledger.sqlite")
    try:
        assert ledger.issuance(r.issuance_id).card == card.card_id  # whose paper it is, not the phone's id
    finally:
        ledger.close()


async def test_a_phone_revoked_with_its_card_is_refused_as_such(net):
    store = SmartphoneStore(net.cards)
    card = net.cards.new()
    phone = store.issue(card.card_id)
    store.revoke_card(card.card_id, "moved-or-died")
    r = await issue_at(net, "kiosk-a1-1", phone, "1234", IssueRequest("131016", "residence-record"))
    assert (r.status, r.reason) == ("refused", "smartphone-revoked")
    assert "smartphone" in r.message


async def test_a_phone_whose_month_is_over_and_not_reissued_is_refused_expired(net):
    earlier = CardStore(net.state_dir, net.pki, lambda: TEST_TIME - timedelta(days=40))
    card = earlier.new()
    phone = SmartphoneStore(earlier).issue(card.card_id)  # valid until TEST_TIME - 10 days
    r = await issue_at(net, "kiosk-a1-1", phone, "1234", IssueRequest("131016", "residence-record"))
    assert (r.status, r.reason) == ("refused", "smartphone-expired")
    r = await issue_at(net, "kiosk-a1-1", card, "1234", IssueRequest("131016", "residence-record"))
    assert r.status == "issued"  # the card itself is still good


def test_the_command_line_holds_up_a_phone_reports_it_lost_and_saves_the_paper(tmp_path):
    """`card phone`, `issue --smartphone [ID] --save`, `card lost`, `card revoke` (and its phones)."""
    from pypdf import PdfReader

    from tests.test_cli import assert_one_clear_line, konbini

    state, clock = tmp_path / "s", ["--up", "--clock", "2026-11-25T10:00:00+09:00"]
    made = konbini("issue", *clock, "--smartphone", "--save", str(tmp_path / "p.pdf"), state=state)
    assert made.returncode == 0 and "printed certificate saved" in made.stdout, made.stderr
    cards = CardStore(state, PKI.load(state, _default()), lambda: TEST_TIME)
    phone_id = next(c for c in cards.list() if c.startswith("phone-"))
    phone = cards.load(phone_id)
    assert phone.holder.name in PdfReader(tmp_path / "p.pdf").pages[0].extract_text()
    assert konbini("card", "lost", phone_id, state=state).returncode == 0
    lost = konbini("issue", *clock, "--smartphone", phone_id, state=state)
    assert_one_clear_line(lost, "smartphone-lost", "use your My Number card")
    second = konbini("card", "phone", card_id_of(phone.certificate), state=state)
    assert second.returncode == 0 and "phone-" in second.stdout
    revoked = konbini("card", "revoke", card_id_of(phone.certificate), "--reason", "moved-or-died", state=state)
    assert revoked.returncode == 0 and "smartphone credentials phone-" in revoked.stdout
    assert_one_clear_line(konbini("card", "phone", card_id_of(phone.certificate), state=state), "card-revoked")


def _default():
    from topology.spec.load import DEFAULT_TOPOLOGY, load_topology

    return load_topology(DEFAULT_TOPOLOGY)
