"""Monthly settlement (BIZ-6, 001 spec §4 and contract §13): pure arithmetic over ledger facts.

Period: the 1st to the last day of a month. Per operator: copies issued, fees collected at the
kiosks, the consignment fee (115 yen per copy, paid to the operator) and the amount due
(fees - consignment). Deadlines fall in the next month:
  reconcile by the 8th  - previous business day of J-LIS if the 8th is a holiday;
  amount fixed by the 9th - the last non-holiday on or before the 9th;
  invoice by the 15th;
  payment by the 20th  - next bank business day if the 20th is a bank holiday.
Holidays come from the `holidays` library (Japan): J-LIS closes on weekends, public holidays
and Dec 29-Jan 3 (the administrative organs' year-end closure); banks on weekends, public
holidays and their own Dec 31-Jan 3 ("bank" category).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import date, datetime, timedelta
from functools import lru_cache
from typing import Any

import holidays

from gateway.business.clock import JST

CONSIGNMENT_FEE = 115  # yen per copy, paid to the operator (001 contract §13)
_MONTH = re.compile(r"(\d{4})-(0[1-9]|1[0-2])")


class SettlementError(Exception):
    """One line for the user: a bad month, a month not closed yet, a month already fixed."""


def parse_month(text: str) -> tuple[int, int]:
    m = _MONTH.fullmatch(text or "")
    if not m:
        raise SettlementError(f"month {text!r}: expected YYYY-MM, e.g. 2026-11")
    return int(m[1]), int(m[2])


def next_month(year: int, month: int) -> tuple[int, int]:
    return (year + 1, 1) if month == 12 else (year, month + 1)


def month_end(text: str) -> datetime:
    """The first instant after the month (Asia/Tokyo): when it closes."""
    y, m = next_month(*parse_month(text))
    return datetime(y, m, 1, tzinfo=JST)


def is_closed(text: str, now: datetime) -> bool:
    return now >= month_end(text)


@lru_cache(maxsize=64)
def _public(year: int) -> holidays.HolidayBase:
    return holidays.country_holidays("JP", years=year)


@lru_cache(maxsize=64)
def _bank(year: int) -> holidays.HolidayBase:
    return holidays.country_holidays("JP", years=year, categories=("public", "bank"))


def year_end_closure(d: date) -> bool:
    """Dec 29 - Jan 3: administrative offices close (also BIZ-1's closure of the general service)."""
    return (d.month == 12 and d.day >= 29) or (d.month == 1 and d.day <= 3)


def jlis_holiday(d: date) -> bool:
    return d.weekday() >= 5 or d in _public(d.year) or year_end_closure(d)


def bank_holiday(d: date) -> bool:
    return d.weekday() >= 5 or d in _bank(d.year)


def _back(d: date, holiday: Callable[[date], bool]) -> date:
    while holiday(d):
        d -= timedelta(days=1)
    return d


def _forward(d: date, holiday: Callable[[date], bool]) -> date:
    while holiday(d):
        d += timedelta(days=1)
    return d


@dataclass(frozen=True)
class Deadlines:
    reconcile: date
    fix: date
    invoice: date
    payment: date

    def as_json(self) -> dict[str, str]:
        return {k: v.isoformat() for k, v in asdict(self).items()}


def deadlines(month: str) -> Deadlines:
    y, m = next_month(*parse_month(month))
    return Deadlines(
        reconcile=_back(date(y, m, 8), jlis_holiday),
        fix=_back(date(y, m, 9), jlis_holiday),
        invoice=date(y, m, 15),
        payment=_forward(date(y, m, 20), bank_holiday),
    )


@dataclass
class OperatorTotals:
    operator: str
    issuances: int = 0
    copies: int = 0
    fees: int = 0
    refunds: int = 0  # yen returned for misprints (already netted out of `fees`)
    refunded_copies: int = 0

    @property
    def consignment(self) -> int:
        return CONSIGNMENT_FEE * self.copies

    @property
    def amount_due(self) -> int:
        return self.fees - self.consignment

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "consignment": self.consignment, "amount_due": self.amount_due}


def _noticed(entries: list[dict[str, Any]], month: str) -> list[dict[str, Any]]:
    """The noticed issuances of `month`, each with the latest correction and its refund applied."""
    noticed: dict[str, dict[str, Any]] = {}
    for e in entries:
        if e["month"] != month or not e["issuance_id"]:
            continue
        iid = e["issuance_id"]
        if e["kind"] == "notice":
            noticed[iid] = {
                "operator": e["operator"] or "-",
                "municipality": e.get("municipality") or "-",
                "copies": e["copies"],
                "fee": e["amount"],
                "refund": 0,
            }
        elif e["kind"] == "correction" and iid in noticed:
            noticed[iid].update(copies=e["copies"], fee=e["amount"])
        elif e["kind"] == "refund" and iid in noticed:
            noticed[iid]["refund"] += -e["amount"]
    return list(noticed.values())


def municipality_totals(entries: list[dict[str, Any]], month: str) -> dict[str, dict[str, int]]:
    """Per municipality code: issuances, copies and fees kept (refunded jobs count no copies and no fee)."""
    out: dict[str, dict[str, int]] = {}
    for rec in _noticed(entries, month):
        t = out.setdefault(rec["municipality"], {"issuances": 0, "copies": 0, "fees": 0})
        t["issuances"] += 1
        if not rec["refund"]:
            t["copies"] += rec["copies"]
        t["fees"] += rec["fee"] - rec["refund"]
    return dict(sorted(out.items()))


def totals(entries: list[dict[str, Any]], month: str) -> dict[str, OperatorTotals]:
    """Per operator, from ledger facts of `month`: the noticed issuances, with the latest
    correction applied; a refunded (misprinted) job counts no copies and no fee."""
    out: dict[str, OperatorTotals] = {}
    for rec in _noticed(entries, month):
        t = out.setdefault(rec["operator"], OperatorTotals(rec["operator"]))
        t.issuances += 1
        if rec["refund"]:
            t.refunds += rec["refund"]
            t.refunded_copies += rec["copies"]
            t.fees += rec["fee"] - rec["refund"]
        else:
            t.copies += rec["copies"]
            t.fees += rec["fee"]
    return dict(sorted(out.items()))


def report(entries: list[dict[str, Any]], month: str, now: datetime) -> dict[str, Any]:
    """The settlement of a closed month; SettlementError for a month not closed yet."""
    parse_month(month)
    if not is_closed(month, now):
        raise SettlementError(
            f"month {month} is not closed yet: it ends {month_end(month):%Y-%m-%d %H:%M} JST "
            f"(now {now.astimezone(JST):%Y-%m-%d %H:%M}); settle it after that"
        )
    per_op = totals(entries, month)
    return {
        "month": month,
        "deadlines": deadlines(month).as_json(),
        "consignment_fee_per_copy": CONSIGNMENT_FEE,
        "operators": {op: t.as_json() for op, t in per_op.items()},
        "municipalities": municipality_totals(entries, month),
        "total": {
            "copies": sum(t.copies for t in per_op.values()),
            "fees": sum(t.fees for t in per_op.values()),
            "consignment": sum(t.consignment for t in per_op.values()),
            "amount_due": sum(t.amount_due for t in per_op.values()),
        },
    }
