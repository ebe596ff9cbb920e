"""What the printed certificate says: whose it is, which municipality issued it, for which issuance.

The municipality renders it (gateway/nodes/municipality.py) from its register entry for the card
that authenticated; the kiosk reads the holder back from the document's metadata and prints only
when that is the card's holder (kiosk_emu), and an auditor joins the paper's issuance id to the
ledger's row and the row's card id to the card. Everything on it is fictitious (residents.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

from gateway.business import residents
from gateway.business.pdf import A4, Font, Page, Text, charset, font, overlay, text_width

TITLES = {
    "residence-record": "住民票の写し",
    "seal-registration": "印鑑登録証明書",
    "tax-certificate": "所得・課税証明書",
    "family-register": "戸籍全部事項証明書",
    "vaccination": "予防接種済証明書",
}
VOID_STAMP = "返金済・無効"  # a misprinted job's copies (BIZ-4)
_STATIC = (
    "".join(TITLES.values())
    + VOID_STAMP
    + "氏名生年月日住所発行番号交付日証明書種別上記のとおり相違ないことを証明する。市区町村長印"
    + "この証明書はコンビニ交付により発行されたものです。偽造防止のため地紋と透かしが印刷されています。"
    + "複写すると「複製」の文字が浮き出ます。発行元番号カード"
    + "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-:./()+ "
)
INFO_RESIDENT = "KonbiniResident"  # the metadata key the kiosk checks before it prints
_INFO = re.compile(rb"/" + INFO_RESIDENT.encode() + rb" <FEFF([0-9A-F]*)>")


def certificate_font(municipality_names: tuple[str, ...] = (), cache_dir: Path | None = None) -> Font:
    """The font cut for any certificate of these municipalities (one cut for all their documents)."""
    return font(charset(_STATIC, residents.CHARACTERS, *municipality_names), cache_dir)


def certificate(
    *,
    issuance_id: str,
    cert_type: str,
    card_id: str,
    municipality_code: str,
    municipality_name: str,
    issued_at: datetime,
    cut: Font,
) -> Page:
    """The page of one certificate for the holder of `card_id` (the register's entry for that card)."""
    person = residents.holder(card_id)
    title = TITLES.get(cert_type, cert_type)
    width, height = A4
    runs = [
        Text((width - text_width(cut, title, 22)) / 2, height - 90, 22, title),
        Text(70, height - 150, 12, f"氏名　　　　{person.name}"),
        Text(70, height - 175, 12, f"生年月日　　{person.born.year}年{person.born.month}月{person.born.day}日"),
        Text(70, height - 200, 12, f"住所　　　　{municipality_name}{person.address}"),
        Text(70, height - 240, 10, f"証明書種別　{cert_type}"),
        Text(70, height - 260, 10, f"発行番号　　{issuance_id}"),
        Text(70, height - 280, 10, f"交付日　　　{issued_at.year}年{issued_at.month}月{issued_at.day}日"),
        Text(70, height - 300, 10, f"番号カード　{card_id}"),
        Text(70, height - 360, 12, "上記のとおり相違ないことを証明する。"),
        Text(300, height - 400, 14, f"{municipality_name}長印"),
        Text(
            70,
            90,
            8,
            "この証明書はコンビニ交付により発行されたものです。偽造防止のため地紋と透かしが印刷されています。",
        ),
        Text(70, 76, 8, f"複写すると「複製」の文字が浮き出ます。発行元 {municipality_name} ({municipality_code})"),
    ]
    info = {
        "Title": f"{title} {issuance_id}",
        INFO_RESIDENT: person.name,
        "KonbiniIssuance": issuance_id,
        "KonbiniCard": card_id,
        "Creator": f"{municipality_name} ({municipality_code})",
    }
    return Page(runs, cut, info)


def document_chunks(page: Page, issuance_id: str, size: int) -> Iterator[bytes]:
    """The certificate as a PDF of `size` bytes (or the page's own length where that is more)."""
    return page.chunks(size, issuance_id.encode())


def resident_named(head: bytes) -> str | None:
    """The resident a certificate names, read from its metadata (the first chunk carries it)."""
    found = _INFO.search(head)
    return bytes.fromhex(found.group(1).decode()).decode("utf-16-be") if found else None


def stamp_void(document: bytes) -> bytes:
    """A misprinted job's copy: 返金済・無効 stamped across the page in red (BIZ-4)."""
    width, height = A4
    size = 56
    cut = font(charset(VOID_STAMP))
    run = Text((width - text_width(cut, VOID_STAMP, size)) / 2, height / 2 - 80, size, VOID_STAMP)
    return overlay(document, [run], cut, rgb=(0.85, 0, 0))
