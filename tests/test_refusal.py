"""One refusal vocabulary (gateway/business/refusal.py): the center, the rules, the OCSP check,
the card checks, the kiosk flow and the CLI speak the same typed reasons, each spelled on the
wire as before and carrying the center's message and the kiosk's screen text."""

from __future__ import annotations

import ast
import inspect
from datetime import datetime

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

import topology.pki
from gateway.business import rules
from gateway.business.clock import JST
from gateway.business.refusal import Refusal
from gateway.protocol.messages import IssueRequest
from kiosk_emu.flow import KioskFlow, Status
from topology.spec.model import Hours, Municipality

NOON = datetime(2026, 11, 24, 12, 0, tzinfo=JST)


CENTER_KEY = ec.generate_private_key(ec.SECP256R1()).public_key()


def flow() -> KioskFlow:
    """A flow at its start; the refusals read here come before the card is used."""
    return KioskFlow("kiosk-a1-1", None, "1234", IssueRequest("131016", "residence-record"), CENTER_KEY)


def test_a_refusal_is_its_wire_spelling_and_carries_the_centers_and_the_kiosks_words():
    assert Refusal.OUTSIDE_HOURS == "outside-hours" and Refusal.read("outside-hours") is Refusal.OUTSIDE_HOURS
    assert msgspec.json.encode({"reason": Refusal.CARD_REVOKED}) == b'{"reason":"card-revoked"}'
    assert f"{Refusal.MONTH_FIXED}" == "month-fixed"
    assert f"{Status.REFUSED}:{Refusal.PIN_WRONG}" == "refused:pin-wrong"  # the load generator's count key
    assert Refusal.OUTSIDE_HOURS.says(hours="08:30–19:00") == (
        "The service is not available now. Hours: 08:30–19:00 (Japan time)."
    )
    assert Refusal.CARD_REVOKED.screen == Refusal.CARD_REVOKED.message  # the kiosk shows what the center says
    assert Refusal.PIN_LOCKED.message is None and "locked" in Refusal.PIN_LOCKED.screen  # the kiosk's own
    assert Refusal.read("a-newer-centers-reason") is None


def test_spellings_are_unique_and_every_center_message_fills_from_its_fields():
    assert len({r.value for r in Refusal}) == len(Refusal)
    fields = {"municipality": "高松市", "hours": "08:30–19:00", "max_copies": "10"}
    for r in Refusal:
        assert "{" not in r.says(**fields), r


@pytest.mark.parametrize(
    "muni, cert, copies, reason",
    [
        (None, "residence-record", 1, Refusal.MUNICIPALITY_UNKNOWN),
        (
            Municipality("131016", certificates={"residence-record": 200}),
            "seal",
            1,
            Refusal.CERTIFICATE_TYPE_NOT_OFFERED,
        ),
        (
            Municipality("131016", certificates={"residence-record": 200}),
            "residence-record",
            11,
            Refusal.COPIES_OUT_OF_RANGE,
        ),
    ],
)
def test_the_business_rules_refuse_with_members(muni, cert, copies, reason):
    refused = rules.refusal(NOON, Hours(), muni, cert, copies)
    assert refused is not None and refused[0] is reason


def test_every_problem_the_card_check_names_is_a_refusal():
    """The center reads `verify_card_certificate`'s answer as a Refusal: a new problem spelled
    there and not here would be caught at the first card that has it, so catch it here."""
    tree = ast.parse(inspect.getsource(topology.pki.verify_card_certificate))
    named = {
        node.value.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Return) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
    }
    assert named and all(Refusal.read(problem) is not None for problem in named), named


def test_the_kiosk_reads_a_centers_refusal_as_its_member_and_shows_the_centers_words():
    f = flow()
    f.on_challenge(403, msgspec.json.encode({"reason": "card-revoked", "message": "as the center said"}))
    assert f.outcome.status is Status.REFUSED and f.outcome.reason is Refusal.CARD_REVOKED
    assert f.outcome.message == "as the center said"
    f = flow()
    f.on_challenge(502, msgspec.json.encode({"reason": "a-newer-centers-reason"}))
    assert (f.outcome.reason, f.outcome.message) == ("a-newer-centers-reason", "a-newer-centers-reason")
    f = flow()
    f.on_challenge(502, b"not json")
    assert (f.outcome.reason, f.outcome.message) == ("http-502", "http-502")


def test_the_kiosks_own_refusals_show_their_screen_text():
    f = flow()
    f.refuse(Refusal.PIN_WRONG, tries_left=1)
    assert f.outcome.reason is Refusal.PIN_WRONG and f.outcome.message == "The PIN is wrong. 1 try left."
    f = flow()
    f.refuse(Refusal.CARD_MISMATCH)
    assert f.outcome.message == Refusal.CARD_MISMATCH.screen != "card-mismatch"
