"""The kiosk's printer, with an injectable fault (BIZ-4).

A job prints its copies in order; if any copy misprints, the whole job is void: the fee is
refunded and every copy of the job, the good ones too, is stamped 返金済・無効 (001 §9).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from gateway.business.ledger import VOID_STAMP


@dataclass(frozen=True)
class PrintedCopy:
    no: int
    stamp: str | None = None


@dataclass(frozen=True)
class PrintJob:
    issuance_id: str
    copies: tuple[PrintedCopy, ...]

    @property
    def misprinted(self) -> bool:
        return any(c.stamp for c in self.copies)


class Printer:
    """`fault(issuance_id, copy_no) -> bool` says which copy misprints; None: a healthy printer."""

    def __init__(self, fault: Callable[[str, int], bool] | None = None) -> None:
        self.fault = fault
        self.jobs = 0

    def print_job(self, issuance_id: str, copies: int) -> PrintJob:
        self.jobs += 1
        bad = self.fault is not None and any(self.fault(issuance_id, no) for no in range(1, copies + 1))
        stamp = VOID_STAMP if bad else None
        return PrintJob(issuance_id, tuple(PrintedCopy(no, stamp) for no in range(1, copies + 1)))
