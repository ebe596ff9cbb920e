"""The Trio kiosk: drives `KioskFlow` over HTTP/2 to its store router, spools, prints and erases.

The spool holds certificate data only between receipt and printing; after printing (or any
failure) it is erased and the erase is written to the kiosk's append-only issuance log
(SEC-KI-2, SEC-KI-5). The log holds opaque ids, types, copies and fees; never personal data.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio
from cryptography import x509

from gateway.h2core import header
from gateway.h2trio import StreamReset, TrioH2
from gateway.http import request_headers
from gateway.messages import IssueRequest
from gateway.server import NodeContext
from kiosk_emu.card import Card
from kiosk_emu.flow import KioskFlow

ISSUANCE_TIMEOUT = 15.0  # the whole request, end to end; past it everything is cancelled


@dataclass
class IssuanceResult:
    status: str
    reason: str | None
    message: str | None
    issuance_id: str | None
    document_bytes: int
    signature_valid: bool
    fee: int
    tries_left: int | None
    latency_ms: float
    hops: list[dict] = field(default_factory=list)
    kiosk: str = ""
    spool_erased: bool = True

    def as_json(self) -> dict:
        return dict(self.__dict__)


class Kiosk:
    def __init__(self, ctx: NodeContext, state_dir: Path) -> None:
        self.ctx = ctx
        self.node = ctx.node
        self.router = ctx.topo.node(ctx.node.upstream or "")
        self.spool = state_dir / "spool" / self.node.id
        self.spool.mkdir(parents=True, exist_ok=True)
        self.log_path = state_dir / "kiosk-logs" / f"{self.node.id}.jsonl"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        chain, _ = ctx.pki.node_paths("issuance-center")
        center = x509.load_pem_x509_certificate(Path(chain).read_bytes())
        center.verify_directly_issued_by(ctx.pki.network_ca)  # the signing key must be the real center's
        self.center_key = center.public_key()

    async def connect(self) -> TrioH2:
        """A connection to this kiosk's store router; the caller runs `conn.run` in a nursery."""
        return await self.ctx.connect(self.router)

    def _log(self, event: str, **fields) -> None:
        entry = {"time": self.ctx.clock.now().isoformat(), "kiosk": self.node.id, "event": event, **fields}
        with open(self.log_path, "a", encoding="utf-8") as f:  # append-only by construction
            f.write(json.dumps(entry, separators=(",", ":")) + "\n")

    async def _call(self, conn: TrioH2, flow: KioskFlow, method: str, path: str, body: bytes) -> tuple[int, bytes]:
        stream = await conn.open_stream(request_headers(method, path, self.router.id), end_stream=False)
        try:
            await stream.send_data(body, end_stream=True)
            headers = await stream.receive_headers()
            flow.record_timing(headers)
            return int(header(headers, b":status") or 0), await stream.read_body()
        finally:
            conn.release(stream)

    async def issue(
        self, conn: TrioH2, card: Card, pin: str, request: IssueRequest, *, timeout: float = ISSUANCE_TIMEOUT
    ) -> IssuanceResult:
        flow = KioskFlow(self.node.id, card, pin, request, self.center_key)
        t0 = time.perf_counter()
        try:
            with trio.fail_after(timeout):
                status, body = await self._call(conn, flow, *flow.start())
                step = flow.on_challenge(status, body)
                if step:
                    status, body = await self._call(conn, flow, *step)
                    step = flow.on_auth(status, body)
                if step:
                    await self._receive_document(conn, flow, step)
                if flow.state.value == "misdelivered":
                    self._erase(flow, "misdelivery-refused")
                    await self._call(conn, flow, *flow.misdelivery_report())
                elif flow.state.value == "verified":
                    flow.paid()
                    self._log("paid", issuance=flow.outcome.issuance_id, fee=flow.outcome.fee)
                    notice = flow.printed(self.ctx.clock.now())
                    self._log(
                        "printed", issuance=flow.outcome.issuance_id, cert_type=request.cert_type,
                        copies=request.copies, fee=flow.outcome.fee,
                    )
                    status, body = await self._call(conn, flow, *notice)
                    flow.on_notice(status, body)
                    self._erase(flow, "spool-erased")
                    flow.erased()
        except (trio.TooSlowError, StreamReset) as exc:
            flow.cancel("timeout" if isinstance(exc, trio.TooSlowError) else "stream-reset")
        finally:
            if self._spool_file(flow).exists():  # cancelled midway: nothing half-received stays on the kiosk
                self._erase(flow, "spool-erased-after-cancel")
            if flow.outcome.status == "refused":
                self._log("refused", reason=flow.outcome.reason)
        o = flow.outcome
        return IssuanceResult(
            status=o.status, reason=o.reason, message=o.message, issuance_id=o.issuance_id,
            document_bytes=o.document_bytes, signature_valid=o.signature_valid, fee=o.fee,
            tries_left=o.tries_left, latency_ms=round((time.perf_counter() - t0) * 1000, 3),
            hops=[{"node": k, "ms": round(v, 3)} for k, v in o.hops.items()], kiosk=self.node.id,
            spool_erased=not self._spool_file(flow).exists(),
        )

    def _spool_file(self, flow: KioskFlow) -> Path:
        return self.spool / f"{flow.outcome.issuance_id or 'none'}.pdf"

    async def _receive_document(self, conn: TrioH2, flow: KioskFlow, step: tuple[str, str, bytes]) -> None:
        method, path, body = step
        stream = await conn.open_stream(request_headers(method, path, self.router.id), end_stream=False)
        try:
            await stream.send_data(body, end_stream=True)
            headers = await stream.receive_headers()
            flow.record_timing(headers)
            status = int(header(headers, b":status") or 0)
            if not flow.on_document_headers(status, headers):
                flow.on_refusal_body(status, await stream.read_body())
                return
            fd = os.open(self._spool_file(flow), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                while (chunk := await stream.receive_chunk()) is not None:
                    flow.on_document_chunk(chunk)
                    os.write(fd, chunk)
            finally:
                os.close(fd)
            flow.on_document_end(stream.trailers)
            flow.record_timing(stream.trailers)
        finally:
            conn.release(stream)

    def _erase(self, flow: KioskFlow, event: str) -> None:
        spool_file = self._spool_file(flow)
        spool_file.unlink(missing_ok=True)
        self._log(event, issuance=flow.outcome.issuance_id, erased=not spool_file.exists())


async def issue_at(running, kiosk_id: str, card: Card, pin: str, request: IssueRequest, **kw) -> IssuanceResult:
    """One issuance from a kiosk of a running topology, on a connection of its own."""
    kiosk = Kiosk(running.context(kiosk_id), running.state_dir)
    conn = await kiosk.connect()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.run)
        try:
            return await kiosk.issue(conn, card, pin, request, **kw)
        finally:
            conn.close()
