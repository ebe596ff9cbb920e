"""After delivery at the center: the kiosk's completion notice, a correction, a misdelivery report.

A notice settles its issuance in the ledger exactly once (a repeat is acknowledged as a
duplicate) and is acknowledged only once durable; a correction amends a noticed issuance until
its month is fixed (BIZ-5/6); a misdelivery is counted, never silent (INT-1). The issuance is
found in memory or, after a restart, in the ledger.
"""

from __future__ import annotations

import logging

from gateway.business.ledger import IssuanceRecord, LedgerDB, LedgerError, MonthFixed
from gateway.business.refusal import Refusal
from gateway.business.session import Issuance, IssuanceEvent, IssuanceState, Session
from gateway.nodes.center.issuing import IssuanceFlow
from gateway.protocol.driver import Stream
from gateway.protocol.http import send_json, timing
from gateway.protocol.messages import CompletionNotice, CorrectionAck, CorrectionNotice, MisdeliveryReport, NoticeAck
from gateway.protocol.streams import header

log = logging.getLogger("konbini.center")


class Notices(IssuanceFlow):
    misdeliveries: list[MisdeliveryReport]

    async def _known_issuance(self, issuance_id: str, session: str, stream: Stream) -> IssuanceRecord | Issuance | None:
        """The issuance a kiosk refers to, from memory or (after a restart) from the ledger, if it is that kiosk's."""
        kiosk = (header(stream.headers, b"konbini-kiosk") or b"").decode()
        iss = self.issuances.get(issuance_id)
        if iss is None:
            iss = await self.ledger.call(LedgerDB.find_issuance, issuance_id)
        if iss is None or iss.kiosk != kiosk or iss.session != session or iss.state == IssuanceState.CANCELLED:
            return None
        return iss

    async def _notice(self, stream: Stream, notice: CompletionNotice, t0: float) -> None:
        iss = await self._known_issuance(notice.issuance_id, notice.session, stream)
        settles = IssuanceEvent.REFUND if notice.refunded else IssuanceEvent.NOTICE
        if iss is None or (isinstance(iss, Issuance) and not iss.can(settles)):
            await self._refuse(stream, 404, Refusal.SESSION_UNKNOWN, t0)  # nothing delivered, nothing to notice
            return
        if (notice.copies, notice.fee) != (iss.copies, iss.fee):
            await self._refuse(stream, 409, Refusal.NOTICE_MISMATCH, t0)
            return
        try:  # acknowledged only once durable; a repeat of a known notice is acknowledged as a duplicate
            new = await self.ledger.call(
                LedgerDB.record_notice, iss.id, notice.printed_at, notice.copies, notice.fee, notice.refunded
            )
        except MonthFixed:
            await self._refuse(stream, 409, Refusal.MONTH_FIXED, t0)
            return
        except LedgerError as exc:
            log.error("notice not recorded: %s", exc)
            await self._refuse(stream, 503, Refusal.LEDGER_UNAVAILABLE, t0)
            return
        self.metrics.notices.labels("new" if new else "duplicate").inc()
        if isinstance(iss, Issuance):
            iss.notices += 1
            iss.fire(settles)
            self._awaited.pop(iss.id, None)
            self._finish(iss)
        await send_json(stream, 200, NoticeAck("acknowledged", iss.id, not new), [timing(self.ctx.node.id, t0, stream)])

    async def _correction(self, stream: Stream, corr: CorrectionNotice, t0: float) -> None:
        iss = await self._known_issuance(corr.issuance_id, corr.session, stream)
        if iss is None:
            await self._refuse(stream, 404, Refusal.SESSION_UNKNOWN, t0)
            return
        if corr.copies < 0 or corr.fee < 0:
            await self._refuse(stream, 400, Refusal.BAD_REQUEST, t0)
            return
        try:
            await self.ledger.call(
                LedgerDB.record_correction, iss.id, self.ctx.clock.now(), corr.copies, corr.fee, corr.reason
            )
        except MonthFixed:
            await self._refuse(stream, 409, Refusal.MONTH_FIXED, t0)
            return
        except LedgerError:
            await self._refuse(stream, 409, Refusal.NOT_NOTICED, t0)
            return
        await send_json(stream, 200, CorrectionAck("corrected", iss.id), [timing(self.ctx.node.id, t0, stream)])

    async def _misdelivery(self, stream: Stream, s: Session, report: MisdeliveryReport, t0: float) -> None:
        self.misdeliveries.append(report)
        self.metrics.misdeliveries.inc()
        log.error(
            "misdelivery refused by kiosk=%s session=%s issuance=%s problem=%s",
            s.kiosk,
            s.id,
            report.issuance_id,
            report.problem,
        )
        await send_json(stream, 200, {"status": "recorded"}, [timing(self.ctx.node.id, t0, stream)])
