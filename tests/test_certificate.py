"""The printed certificate: a PDF that an independent reader (pypdf) parses, naming the card's
holder, the municipality and the issuance, of the size asked for, streamed in bounded pieces."""

from __future__ import annotations

import io
from datetime import datetime

import pytest
from pypdf import PdfReader

from gateway.business import residents
from gateway.business.certificate import (
    TITLES,
    VOID_STAMP,
    certificate,
    certificate_font,
    document_chunks,
    resident_named,
    stamp_void,
)
from gateway.business.clock import JST

AT = datetime(2026, 11, 25, 10, 0, tzinfo=JST)


@pytest.fixture(scope="module")
def cut(tmp_path_factory):
    return certificate_font(("高松市",), tmp_path_factory.mktemp("fonts"))


def _page(cut, card_id="card-0a1b2c3d4e5f", cert_type="residence-record", iid="iss-0123456789abcdef01234567"):
    return certificate(
        issuance_id=iid,
        cert_type=cert_type,
        card_id=card_id,
        municipality_code="372013",
        municipality_name="高松市",
        issued_at=AT,
        cut=cut,
    )


def _text(pdf: bytes) -> str:
    return PdfReader(io.BytesIO(pdf)).pages[0].extract_text()


@pytest.mark.parametrize("cert_type", sorted(TITLES))
def test_certificate_names_the_cards_holder_and_the_issuance(cut, cert_type):
    holder = residents.holder("card-0a1b2c3d4e5f")
    pdf = b"".join(document_chunks(_page(cut, cert_type=cert_type), "iss-0123456789abcdef01234567", 64 * 1024))
    text = _text(pdf)
    for expected in (
        TITLES[cert_type],
        holder.name,
        "高松市" + holder.address,
        "iss-0123456789abcdef01234567",
        "2026年11月25日",
        "card-0a1b2c3d4e5f",
        f"{holder.born.year}年{holder.born.month}月{holder.born.day}日",
    ):
        assert expected in text
    assert PdfReader(io.BytesIO(pdf)).metadata["/KonbiniResident"] == holder.name


def test_two_cards_print_two_different_residents(cut):
    names = {residents.holder(f"pool-{i:04d}").name for i in range(40)}
    assert len(names) > 20  # drawn from 400 combinations: a swap of cards shows on the paper
    a, b = (b"".join(document_chunks(_page(cut, card_id=c), "iss-x", 0)) for c in ("pool-0001", "pool-0002"))
    assert resident_named(a) == residents.holder("pool-0001").name != resident_named(b)


@pytest.mark.parametrize("size", [0, 50_000, 64 * 1024, 99_999, 100_000, 100_001, 1_000_000, 3 * 1024 * 1024 + 7])
def test_a_certificate_is_exactly_the_size_asked_for_and_still_reads(cut, size):
    chunks = list(document_chunks(_page(cut), "iss-x", size))
    pdf = b"".join(chunks)
    natural = len(b"".join(document_chunks(_page(cut), "iss-x", 0)))
    assert len(pdf) == max(size, natural)
    assert max(map(len, chunks)) <= 64 * 1024
    assert residents.holder("card-0a1b2c3d4e5f").name in _text(pdf)


def test_the_first_chunk_says_whose_certificate_it_is(cut):
    first = next(iter(document_chunks(_page(cut), "iss-x", 4 << 20)))
    assert resident_named(first) == residents.holder("card-0a1b2c3d4e5f").name


def test_a_void_copy_is_stamped_and_keeps_what_it_said(cut):
    pdf = b"".join(document_chunks(_page(cut), "iss-x", 0))
    void = stamp_void(pdf)
    assert void.startswith(pdf)  # stamped over, like paper: the original bytes stay
    text = _text(void)
    assert VOID_STAMP in text and residents.holder("card-0a1b2c3d4e5f").name in text
    assert VOID_STAMP not in _text(pdf)


def test_a_character_outside_the_cut_is_refused_not_dropped(cut):
    with pytest.raises(ValueError, match="outside the font"):
        certificate(
            issuance_id="iss-x",
            cert_type="residence-record",
            card_id="c",
            municipality_code="1",
            municipality_name="札幌市",
            issued_at=AT,
            cut=cut,
        )


async def test_the_printed_certificate_names_the_card_holder_read_by_pypdf_alone(net, tmp_path):
    """End to end, judged on the paper itself (not on konbini's binding check): the PDF the kiosk
    printed names the holder written on the card's face, and the ledger row names the card."""
    from gateway.business.ledger import LedgerDB
    from gateway.protocol.messages import IssueRequest
    from kiosk_emu.device.printer import Printer
    from kiosk_emu.kiosk import issue_at

    card = net.cards.ensure_pool(1)[0]
    saved = tmp_path / "printed.pdf"
    r = await issue_at(
        net, "kiosk-a1-1", card, "1234", IssueRequest("131016", "seal-registration"), Printer(save_to=saved)
    )
    assert r.status == "issued"
    text = _text(saved.read_bytes())
    face = card.holder
    assert face.name in text and f"{face.born.year}年{face.born.month}月{face.born.day}日" in text
    assert TITLES["seal-registration"] in text and r.issuance_id in text and card.card_id in text
    ledger = LedgerDB(net.state_dir / "ledger.sqlite")
    try:
        assert ledger.issuance(r.issuance_id).card == card.card_id
    finally:
        ledger.close()


async def test_a_center_that_fetches_another_residents_certificate_is_caught_by_the_kiosk(net, monkeypatch, tmp_path):
    """A center that mixes up cards signs its mistake (the binding is valid): the kiosk reads the
    name on the paper, refuses it before payment, prints nothing and reports the misdelivery."""
    import gateway.nodes.center.issuing
    from gateway.protocol.messages import DocumentRequest, IssueRequest
    from kiosk_emu.device.printer import Printer
    from kiosk_emu.kiosk import issue_at

    monkeypatch.setattr(
        gateway.nodes.center.issuing,
        "DocumentRequest",
        lambda iid, cert_type, size, card: DocumentRequest(iid, cert_type, size, "someone-else"),
    )
    card = net.cards.ensure_pool(2)[1]
    assert card.holder != residents.holder("someone-else")
    printer = Printer(save_to=tmp_path / "printed.pdf")
    r = await issue_at(net, "kiosk-a2-1", card, "1234", IssueRequest("131016", "residence-record"), printer)
    assert (r.status, r.reason, r.charged) == ("misdelivered", "resident-mismatch", 0)
    assert printer.tray == {} and not (tmp_path / "printed.pdf").exists() and r.spool_erased
    assert [m.problem for m in net.app("issuance-center").misdeliveries] == ["resident-mismatch"]
