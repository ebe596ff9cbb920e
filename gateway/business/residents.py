"""The fictitious residents behind the emulated cards: a seeded fake registry, no real person in it.

A card's holder is drawn from its card id (the opaque id its certificate carries), so the card's
face (券面事項, what the kiosk reads after the PIN) and a municipality's resident register agree
without sharing a file, as the real card and register agree because both were made from one person.
Names are combinations of common surnames and given names; the addresses are made up.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import date

SURNAMES = (
    "佐藤",
    "鈴木",
    "高橋",
    "田中",
    "伊藤",
    "渡辺",
    "山本",
    "中村",
    "小林",
    "加藤",
    "吉田",
    "山田",
    "佐々木",
    "山口",
    "松本",
    "井上",
    "木村",
    "林",
    "斎藤",
    "清水",
)
GIVEN_NAMES = (
    "太郎",
    "花子",
    "一郎",
    "健太",
    "翔太",
    "直樹",
    "大輔",
    "拓也",
    "陽菜",
    "結衣",
    "美咲",
    "葵",
    "さくら",
    "恵子",
    "由美",
    "明美",
    "蓮",
    "湊",
    "悠真",
    "凛",
)
TOWNS = ("本町", "栄町", "緑町", "旭町", "中央", "幸町", "昭和町", "若葉", "桜台", "東町")


@dataclass(frozen=True)
class Resident:
    name: str  # 氏名, surname and given name with an ideographic space
    born: date
    address: str  # within the municipality, without its name


def _draw(card_id: str, purpose: str) -> int:
    return int.from_bytes(hashlib.sha256(f"konbini-residents/{purpose}/{card_id}".encode()).digest()[:8], "big")


def holder(card_id: str) -> Resident:
    """The person a card was issued to: the same for every municipality's register and the card's face."""
    name = f"{SURNAMES[_draw(card_id, 'surname') % len(SURNAMES)]}\u3000{GIVEN_NAMES[_draw(card_id, 'given') % len(GIVEN_NAMES)]}"
    born = date(1940, 1, 1).toordinal() + _draw(card_id, "born") % (
        date(2008, 12, 31).toordinal() - date(1940, 1, 1).toordinal()
    )
    n = _draw(card_id, "address")
    address = f"{TOWNS[n % len(TOWNS)]}{n // 10 % 5 + 1}丁目{n // 50 % 30 + 1}番{n // 1500 % 20 + 1}号"
    return Resident(name, date.fromordinal(born), address)


# Every character a register entry can hold, for the documents' embedded font.
CHARACTERS = "".join(SURNAMES + GIVEN_NAMES + TOWNS) + "\u3000丁目番号年月日0123456789"
