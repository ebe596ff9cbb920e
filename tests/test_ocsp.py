"""JPKI validity over OCSP: the responder's answers and the relying party's checks (BIZ-2, BIZ-8)."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509 import ocsp

from gateway.business.clock import JST
from gateway.business.ocsp import MISS, OcspCache, OcspResponder, build_request, check_response, verdict
from kiosk_emu.card import Card, CardStore
from topology.pki import PKI, load_private_key
from topology.spec.model import Node, Topology

NOW = datetime(2026, 11, 24, 10, 0, tzinfo=JST)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    ocsp_node = Node(id="ocsp-1", kind="ocsp", site="jlis", address="127.30.0.2", port=8443)
    return PKI.ensure(tmp_path_factory.mktemp("state"), Topology(name="t", nodes={ocsp_node.id: ocsp_node}))


@pytest.fixture(scope="session")
def store(pki: PKI) -> CardStore:
    return CardStore(pki.state_dir, pki, clock=lambda: NOW)


@pytest.fixture(scope="session")
def good_card(store: CardStore) -> Card:
    return store.new()


@pytest.fixture(scope="session")
def revoked_card(store: CardStore) -> Card:
    card = store.new()
    store.revoke(card.card_id, "key-compromise")
    return card


@pytest.fixture(scope="session")
def responder(pki: PKI, store: CardStore) -> OcspResponder:
    signer_cert, signer_key = pki.ocsp_signer()
    return OcspResponder(pki.jpki_ca, signer_cert, signer_key, store.revocations, clock=lambda: NOW)


def ask(responder: OcspResponder, pki: PKI, card: Card) -> bytes:
    return responder.respond(build_request(card.certificate, pki.jpki_ca))


def test_good_card_is_good(responder: OcspResponder, pki: PKI, good_card: Card) -> None:
    assert check_response(ask(responder, pki, good_card), good_card.certificate, pki.jpki_ca, NOW) is None


def test_revoked_card_is_reported_with_time_and_reason(responder: OcspResponder, pki: PKI, revoked_card: Card) -> None:
    der = ask(responder, pki, revoked_card)
    assert check_response(der, revoked_card.certificate, pki.jpki_ca, NOW) == "card-revoked"
    response = ocsp.load_der_ocsp_response(der)
    assert response.certificate_status == ocsp.OCSPCertStatus.REVOKED
    assert response.revocation_time_utc == NOW
    assert response.revocation_reason == x509.ReasonFlags.key_compromise


def test_revocation_after_startup_is_seen(responder: OcspResponder, pki: PKI, store: CardStore) -> None:
    card = store.new()
    assert check_response(ask(responder, pki, card), card.certificate, pki.jpki_ca, NOW) is None
    store.revoke(card.card_id, "moved-or-died")
    assert check_response(ask(responder, pki, card), card.certificate, pki.jpki_ca, NOW) == "card-revoked"


def test_response_is_signed_by_the_delegated_signer_which_it_carries(
    responder: OcspResponder, pki: PKI, good_card: Card
) -> None:
    response = ocsp.load_der_ocsp_response(ask(responder, pki, good_card))
    assert response.certificates == [pki.ocsp_signer()[0]]
    assert response.this_update_utc == NOW and response.next_update_utc is not None


def test_a_responder_delegation_checked_once_still_expires_with_the_responder_certificate(
    responder: OcspResponder, pki: PKI, store: CardStore, good_card: Card
) -> None:
    # the delegation (signature by the CA, the OCSPSigning usage) is cached; its validity is not
    assert check_response(ask(responder, pki, good_card), good_card.certificate, pki.jpki_ca, NOW) is None
    signer_cert, signer_key = pki.ocsp_signer()
    later = signer_cert.not_valid_after_utc + timedelta(days=1)
    late = OcspResponder(pki.jpki_ca, signer_cert, signer_key, store.revocations, clock=lambda: later)
    assert check_response(ask(late, pki, good_card), good_card.certificate, pki.jpki_ca, later) == "ocsp-invalid"


def test_tampered_response_is_invalid(responder: OcspResponder, pki: PKI, revoked_card: Card) -> None:
    der = ask(responder, pki, revoked_card)
    # Still well-formed DER, only the signature can tell: the revocation time moved an hour back...
    revoked_at = b"20261124010000Z"  # NOW in UTC; revocationTime comes before thisUpdate
    moved = der.replace(revoked_at, b"20261124000000Z", 1)
    assert ocsp.load_der_ocsp_response(moved).revocation_time_utc == NOW - timedelta(hours=1)
    # ...or one bit of the signature flipped.
    signature = ocsp.load_der_ocsp_response(der).signature
    at = der.index(signature)
    flipped = der[:at] + bytes([der[at] ^ 0x01]) + der[at + 1 :]
    for bad in (moved, flipped):
        assert ocsp.load_der_ocsp_response(bad).response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
        assert check_response(bad, revoked_card.certificate, pki.jpki_ca, NOW) == "ocsp-invalid"
    for garbage in (der[:-10], b"", b"\x30\x03\x0a\x01\x00"):
        assert check_response(garbage, revoked_card.certificate, pki.jpki_ca, NOW) == "ocsp-invalid"


def test_response_signed_by_a_key_the_jpki_ca_did_not_delegate_is_invalid(
    pki: PKI, store: CardStore, good_card: Card
) -> None:
    # A node identity from the network CA, and a card certificate from the JPKI CA (no OCSPSigning EKU).
    node_cert_path, node_key_path = pki.node_paths("ocsp-1")
    impostors = [
        (x509.load_pem_x509_certificate(node_cert_path.read_bytes()), load_private_key(node_key_path.read_bytes())),
        (good_card.certificate, good_card.key),
    ]
    for cert, key in impostors:
        forged = OcspResponder(pki.jpki_ca, cert, key, store.revocations, clock=lambda: NOW)
        assert check_response(ask(forged, pki, good_card), good_card.certificate, pki.jpki_ca, NOW) == "ocsp-invalid"


def test_answer_about_another_card_is_invalid(
    responder: OcspResponder, pki: PKI, good_card: Card, revoked_card: Card
) -> None:
    assert check_response(ask(responder, pki, good_card), revoked_card.certificate, pki.jpki_ca, NOW) == "ocsp-invalid"


def test_stale_or_future_response_is_invalid(responder: OcspResponder, pki: PKI, good_card: Card) -> None:
    der = ask(responder, pki, good_card)
    assert check_response(der, good_card.certificate, pki.jpki_ca, NOW + timedelta(hours=1)) == "ocsp-invalid"
    assert check_response(der, good_card.certificate, pki.jpki_ca, NOW - timedelta(hours=1)) == "ocsp-invalid"
    assert check_response(der, good_card.certificate, pki.jpki_ca, NOW - timedelta(minutes=2)) is None  # skew


def test_certificate_of_another_issuer_is_unknown(responder: OcspResponder, pki: PKI, good_card: Card) -> None:
    request = build_request(good_card.certificate, pki.network_ca)
    response = ocsp.load_der_ocsp_response(responder.respond(request))
    assert response.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
    assert response.certificate_status == ocsp.OCSPCertStatus.UNKNOWN


@pytest.mark.parametrize("request_der", [b"", b"not der", b"\x30\x00", b"\x30\x82\xff\xff"])
def test_malformed_request_gets_a_malformed_request_response(
    responder: OcspResponder, pki: PKI, good_card: Card, request_der: bytes
) -> None:
    der = responder.respond(request_der)
    assert ocsp.load_der_ocsp_response(der).response_status == ocsp.OCSPResponseStatus.MALFORMED_REQUEST
    assert check_response(der, good_card.certificate, pki.jpki_ca, NOW) == "ocsp-invalid"


def test_request_carries_a_sha256_cert_id(good_card: Card, pki: PKI) -> None:
    request = ocsp.load_der_ocsp_request(build_request(good_card.certificate, pki.jpki_ca))
    assert request.serial_number == good_card.certificate.serial_number and request.hash_algorithm.name == "sha256"


def test_responder_reads_revocations_from_a_store_in_another_process(pki: PKI, tmp_path: Path) -> None:
    writer = CardStore(tmp_path, pki, clock=lambda: NOW)
    card = writer.new()
    reader = CardStore(tmp_path, pki, clock=lambda: NOW)
    signer_cert, signer_key = pki.ocsp_signer()
    responder = OcspResponder(pki.jpki_ca, signer_cert, signer_key, reader.revocations, clock=lambda: NOW)
    assert check_response(ask(responder, pki, card), card.certificate, pki.jpki_ca, NOW) is None
    writer.revoke(card.card_id, "voluntary")
    assert check_response(ask(responder, pki, card), card.certificate, pki.jpki_ca, NOW) == "card-revoked"


def test_the_cache_relies_on_a_definitive_answer_until_its_next_update_only(
    responder: OcspResponder, pki: PKI, good_card: Card
) -> None:
    cache = OcspCache()
    problem, until = verdict(ask(responder, pki, good_card), good_card.certificate, pki.jpki_ca, NOW)
    assert problem is None and until is not None
    cache.put(good_card.certificate.serial_number, problem, until)
    assert (
        cache.get(good_card.certificate.serial_number, until) is None and cache.hits == 1
    )  # good, up to nextUpdate itself
    assert cache.get(good_card.certificate.serial_number, until + timedelta(seconds=1)) is MISS  # then asked again
    assert cache.get(good_card.certificate.serial_number, NOW) is MISS  # and forgotten


def test_the_cache_keeps_no_answer_that_proves_nothing_and_stays_bounded() -> None:
    cache = OcspCache(limit=2)
    cache.put(1, "ocsp-invalid", None)
    assert cache.get(1, NOW) is MISS
    for serial in (1, 2, 3):
        cache.put(serial, None, NOW + timedelta(minutes=10))
    assert cache.get(1, NOW) is MISS and cache.get(2, NOW) is None and cache.get(3, NOW) is None


def test_the_ocsp_cost_bench_runs_both_steps_cold_and_warm(capsys) -> None:
    from bench import ocsp_cost

    assert ocsp_cost.main(["--repeat", "1", "--number", "2"]) == 0
    out = capsys.readouterr().out
    assert "responder: answer a request" in out and "center: check an answer" in out
