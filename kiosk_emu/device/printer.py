"""The kiosk's printer, with an injectable fault and pace (BIZ-4).

A job prints its copies in order into the tray, where the resident picks them up; if any copy
misprints, or the kiosk stops waiting for the job, the whole job is void: the fee is refunded
and every copy of the job, the good ones too, is stamped 返金済・無効 (001 §9).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from gateway.business.certificate import stamp_void
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
    """`fault(issuance_id, copy_no) -> bool` says which copy misprints, `jam` which one sticks (the
    printer stops there until the kiosk gives up on the job); None: a healthy printer.
    `seconds_per_copy`: how long a copy takes to come out (0: at once). `save_to`: a file that keeps
    the last job's certificate as it came out, stamped 返金済・無効 when the job is void
    (`konbini issue --save`)."""

    def __init__(
        self,
        fault: Callable[[str, int], bool] | None = None,
        seconds_per_copy: float = 0.0,
        jam: Callable[[str, int], bool] | None = None,
        save_to: Path | None = None,
    ) -> None:
        self.fault = fault
        self.save_to = save_to
        self.jam = jam
        self.seconds_per_copy = seconds_per_copy
        self.jobs = 0
        self.tray: dict[str, list[PrintedCopy]] = {}  # issuance id -> the paper that came out for it

    async def print_job(self, issuance_id: str, copies: int, document: bytes = b"") -> PrintJob:
        """`document`: the certificate's bytes, needed only where they are kept (`save_to`)."""
        self.jobs += 1
        bad = self.fault is not None and any(self.fault(issuance_id, no) for no in range(1, copies + 1))
        stamp = VOID_STAMP if bad else None
        out = self.tray.setdefault(issuance_id, [])
        for no in range(1, copies + 1):
            if self.jam is not None and self.jam(issuance_id, no):
                await trio.sleep_forever()
            await trio.sleep(self.seconds_per_copy)
            out.append(PrintedCopy(no, stamp))
        self._keep(document, void=bad)
        return PrintJob(issuance_id, tuple(out))

    def void(self, issuance_id: str, copies: int, document: bytes = b"") -> PrintJob:
        """The job is abandoned midway: every copy already in the tray is stamped, and so is
        every copy of the job on record, printed or not."""
        self.tray[issuance_id] = [PrintedCopy(c.no, VOID_STAMP) for c in self.tray.get(issuance_id, [])]
        self._keep(document, void=True)
        return PrintJob(issuance_id, tuple(PrintedCopy(no, VOID_STAMP) for no in range(1, copies + 1)))

    def _keep(self, document: bytes, void: bool) -> None:
        if self.save_to is not None and document:
            self.save_to.write_bytes(stamp_void(document) if void else document)
