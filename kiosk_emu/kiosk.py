"""The Trio kiosk: drives `KioskFlow` over HTTP/2 to its store router, spools, prints and erases.

The request order is `kiosk_emu.driver.FlowDriver`'s (the load generator drives the same one);
this module adds what the kiosk has besides a connection: its spool, printer, outbox and log.

The spool holds certificate data only between receipt and printing; after printing (or any
failure) it is erased and the erase is written to the kiosk's append-only issuance log
(SEC-KI-2, SEC-KI-5). The log holds opaque ids, types, copies and fees; never personal data.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio
from cryptography import x509

from gateway.node.server import NodeContext
from gateway.nodes.heartbeat import deliver
from gateway.protocol.errors import ConnectionClosed, LinkError, StreamReset
from gateway.protocol.h2trio import TrioH2
from gateway.protocol.messages import IssueRequest
from kiosk_emu.card import Card
from kiosk_emu.device.outbox import Outbox
from kiosk_emu.device.printer import Printer, PrintJob
from kiosk_emu.driver import FlowDriver, SpoolWriter, exchange
from kiosk_emu.flow import KioskFlow, State, Status

log = logging.getLogger("konbini.kiosk")

ISSUANCE_TIMEOUT = 15.0  # the request up to payment; past it everything is cancelled
PRINT_TIMEOUT = 60.0  # a paid job the printer has not finished by then is void and refunded (BIZ-4)
NOTICE_TIMEOUT = 5.0  # one attempt to deliver a notice; after printing, the outbox takes over
HEARTBEAT_TIMEOUT = 5.0  # one heartbeat request; past it the connection is dropped and remade
_LINK_ERRORS = (
    StreamReset,
    ConnectionClosed,
    ConnectionError,
    OSError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    trio.TooSlowError,
)


@dataclass
class IssuanceResult:
    status: str
    reason: str | None
    message: str | None
    issuance_id: str | None
    document_bytes: int
    signature_valid: bool
    fee: int  # the document's fee; `charged` is what the resident paid
    tries_left: int | None
    latency_ms: float
    hops: list[dict] = field(default_factory=list)
    kiosk: str = ""
    spool_erased: bool = True
    refunded: bool = False
    notice_pending: bool = False
    charged: int = 0

    def as_json(self) -> dict:
        return dict(self.__dict__)


class Kiosk:
    def __init__(
        self, ctx: NodeContext, state_dir: Path, printer: Printer | None = None, *, print_timeout: float = PRINT_TIMEOUT
    ) -> None:
        self.ctx = ctx
        self.printer = printer or Printer()
        self.print_timeout = print_timeout
        self.outbox = Outbox.of_kiosk(state_dir, ctx.node.id)
        self._outbox_lock = trio.Lock()
        self.node = ctx.node
        self.router = ctx.topo.node(ctx.node.upstream or "")
        self.controller = next(
            (n for n in ctx.topo.of_kind("store-controller") if n.site == ctx.node.site), None
        )  # the store controller it reports to (SEC-KI-7, SEC-KI-8)
        self.spool = state_dir / "spool" / self.node.id
        self.spool.mkdir(parents=True, exist_ok=True)
        self.log_path = state_dir / "kiosk-logs" / f"{self.node.id}.jsonl"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        keys = []
        for center_id in sorted(n.id for n in ctx.topo.of_kind("issuance-center")):  # a standby center signs too
            chain, _ = ctx.pki.node_paths(center_id)
            center = x509.load_pem_x509_certificate(Path(chain).read_bytes())
            center.verify_directly_issued_by(ctx.pki.network_ca)  # the signing key must be a real center's
            keys.append(center.public_key())
        self.center_keys = tuple(keys)

    async def connect(self) -> TrioH2:
        """A connection to this kiosk's store router; the caller runs `conn.run` in a nursery."""
        return await self.ctx.connect(self.router)

    def _log(self, event: str, **fields) -> None:
        entry = {"time": self.ctx.clock.now().isoformat(), "kiosk": self.node.id, "event": event, **fields}
        with open(self.log_path, "a", encoding="utf-8") as f:  # append-only by construction
            f.write(json.dumps(entry, separators=(",", ":")) + "\n")

    async def issue(
        self,
        conn: TrioH2,
        card: Card,
        pin: str,
        request: IssueRequest,
        *,
        timeout: float = ISSUANCE_TIMEOUT,
        cancel: trio.CancelScope | None = None,
    ) -> IssuanceResult:
        flow = KioskFlow(self.node.id, card, pin, request, self.center_keys)
        return await self.drive(conn, flow, timeout=timeout, cancel=cancel)

    async def drive(
        self,
        conn: TrioH2,
        flow: KioskFlow,
        *,
        timeout: float = ISSUANCE_TIMEOUT,
        cancel: trio.CancelScope | None = None,
    ) -> IssuanceResult:
        """One issuance. `timeout` and `cancel` (the resident's cancel button: a fresh scope, cancelled
        from anywhere) end the whole request until payment; from payment on, the job completes or is
        refunded whatever they do (flow rule 3), and the printer's deadline bounds it."""
        button = cancel if cancel is not None else trio.CancelScope()
        driver = FlowDriver(conn, self.router.id, _Devices(self, conn))
        t0 = time.perf_counter()
        try:
            try:
                with button, trio.fail_after(timeout):
                    await driver.run(flow)
                    await trio.lowlevel.checkpoint()  # a cancel up to the payment is honoured: nothing is paid yet
            except (trio.TooSlowError, StreamReset) as exc:
                flow.cancel("timeout" if isinstance(exc, trio.TooSlowError) else "stream-reset")
            if button.cancelled_caught:
                flow.cancel("cancelled")
            if flow.state is State.VERIFIED:
                with trio.CancelScope(shield=True):  # the point of no return: see FlowDriver.settle
                    await driver.settle(flow, self.ctx.clock.now)
        finally:
            if self._spool_file(flow).exists():  # cancelled midway: nothing half-received stays on the kiosk
                self._erase(flow, "spool-erased-after-cancel")
            if flow.outcome.status is Status.REFUSED:
                self._log("refused", reason=flow.outcome.reason)
        o = flow.outcome
        return IssuanceResult(
            status=o.status.value,
            reason=o.reason,
            message=o.message,
            issuance_id=o.issuance_id,
            document_bytes=o.document_bytes,
            signature_valid=o.signature_valid,
            fee=o.fee,
            tries_left=o.tries_left,
            latency_ms=round((time.perf_counter() - t0) * 1000, 3),
            hops=[{"node": k, "ms": round(v, 3)} for k, v in o.hops.items()],
            kiosk=self.node.id,
            spool_erased=not self._spool_file(flow).exists(),
            refunded=o.refunded,
            notice_pending=o.notice_pending,
            charged=o.charged,
        )

    async def _outbox(self, fn, *args):
        """Outbox writes fsync; run them off the event loop, one at a time."""
        async with self._outbox_lock:
            return await trio.to_thread.run_sync(fn, *args)

    async def _deliver(
        self, conn: TrioH2, issuance_id: str, path: str, body: bytes, flow: KioskFlow | None = None
    ) -> bool:
        """One attempt to deliver a notice from the outbox; True once the center acknowledged it."""
        status, reason = 0, "timeout"
        with trio.move_on_after(NOTICE_TIMEOUT):
            try:
                status, answer = await exchange(conn, self.router.id, "POST", path, body, flow)
                reason = f"http-{status}"
            except LinkError as exc:
                reason = type(exc).__name__
        if status == 200:
            await self._outbox(self.outbox.acked, issuance_id)
            return True
        if 400 <= status < 500:  # the center refuses it for good: kept for staff, never dropped silently
            try:
                reason = json.loads(answer).get("reason", reason)
            except (ValueError, AttributeError):
                pass
            await self._outbox(self.outbox.rejected, issuance_id, reason)
            self._log("notice-rejected", issuance=issuance_id, reason=reason)
            return False
        await self._outbox(self.outbox.failed, issuance_id, time.time(), reason)
        return False

    async def flush_outbox(self, conn: TrioH2) -> int:
        """Send every notice that is due; returns how many are still pending."""
        for p in await self._outbox(self.outbox.due, time.time()):
            await self._deliver(conn, p.issuance_id, p.path, p.body)
        return len(await self._outbox(self.outbox.due, float("inf")))

    async def run_outbox(self, conn: TrioH2, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Resend pending notices with backoff until acknowledged; runs until cancelled."""
        task_status.started()
        while True:
            await self.flush_outbox(conn)
            nxt = await self._outbox(self.outbox.next_due)
            # Wall-clock times: the outbox outlives this process, so a restarted kiosk resumes its backoff.
            await trio.sleep(min(max(nxt - time.time(), 0.05), 60.0) if nxt is not None else 1.0)

    async def run_heartbeat(self, interval: float = 10.0, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """`POST /v1/heartbeat` to the store controller every `interval` seconds (SEC-KI-8), over one
        connection, remade after any failure; runs until cancelled. The controller reports a kiosk
        silent for SILENCE_LIMIT (30 s), so the interval must stay well below it."""
        if self.controller is None:
            raise ValueError(f"no store controller in site {self.node.site!r} for {self.node.id}")
        task_status.started()
        while True:
            try:
                with trio.fail_after(HEARTBEAT_TIMEOUT):
                    conn = await self.ctx.connect(self.controller)
            except _LINK_ERRORS as exc:
                log.warning("%s: store controller unreachable (%s)", self.node.id, type(exc).__name__)
            else:
                await self._beat_over(conn, interval)
            await trio.sleep(interval)

    async def _beat_over(self, conn: TrioH2, interval: float) -> None:
        """Heartbeats over one connection until it fails or ends."""
        async with trio.open_nursery() as nursery:

            async def run_conn() -> None:
                try:
                    await conn.run()
                finally:
                    nursery.cancel_scope.cancel()  # the connection ended: stop sending on it

            nursery.start_soon(run_conn)
            try:
                while True:
                    with trio.fail_after(HEARTBEAT_TIMEOUT):
                        status, _ = await exchange(conn, self.controller.id, "POST", "/v1/heartbeat", None)
                    if status != 200:
                        log.warning("%s: heartbeat answered %d", self.node.id, status)
                    await trio.sleep(interval)
            except _LINK_ERRORS as exc:
                log.warning("%s: heartbeat failed (%s); reconnecting", self.node.id, type(exc).__name__)
            finally:
                conn.close()  # GOAWAY; give the peer a second to close, then drop it
                nursery.cancel_scope.deadline = min(nursery.cancel_scope.deadline, trio.current_time() + 1.0)

    async def report_fault(self, fault: str, *, timeout: float = 3 * NOTICE_TIMEOUT) -> int:
        """Tell the store controller about a device fault (SEC-KI-7), which pushes it on to the store
        register and the maintenance center; retried (`deliver`) until acknowledged or `timeout`.
        Returns the attempts it took. `fault` is a code ("printer-jam"), never personal data."""
        if self.controller is None:
            raise ValueError(f"no store controller in site {self.node.site!r} for {self.node.id}")
        body = json.dumps({"fault": fault, "at": self.ctx.clock.now().isoformat()}).encode()

        async def send(data: bytes) -> None:
            conn = await self.ctx.connect(self.controller)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(conn.run)
                try:
                    status, _ = await exchange(conn, self.controller.id, "POST", "/v1/fault", data)
                finally:
                    conn.close()
            if status != 200:
                raise ConnectionError(f"http-{status}")

        with trio.fail_after(timeout):
            attempts = await deliver(send, body, what="fault")
        self._log("fault-reported", fault=fault, attempts=attempts)
        return attempts

    def _spool_file(self, flow: KioskFlow) -> Path:
        return self.spool / f"{flow.outcome.issuance_id or 'none'}.pdf"

    @contextmanager
    def _spool_writer(self, flow: KioskFlow) -> Iterator[SpoolWriter]:
        fd = os.open(self._spool_file(flow), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            yield lambda chunk: os.write(fd, chunk)
        finally:
            os.close(fd)

    def recover(self) -> int:
        """At kiosk start (once per process, not per issuance): release the refund notices of jobs
        a killed predecessor paid for but never confirmed printed, and erase its spool."""
        released = self.outbox.release_held()
        if released:
            self._log("unconfirmed-prints-refunded", count=released)
        return self.erase_leftover_spool()

    def erase_leftover_spool(self) -> int:
        """Erase what a killed predecessor left in the spool (SEC-KI-2); the notice, if the
        document was paid for, is already in the outbox."""
        n = 0
        for leftover in sorted(self.spool.glob("*.pdf")):
            leftover.unlink(missing_ok=True)
            self._log("spool-erased-after-restart", issuance=leftover.stem, erased=not leftover.exists())
            n += 1
        return n

    def _erase(self, flow: KioskFlow, event: str) -> None:
        spool_file = self._spool_file(flow)
        spool_file.unlink(missing_ok=True)
        self._log(event, issuance=flow.outcome.issuance_id, erased=not spool_file.exists())


class _Devices:
    """A kiosk's devices for one issuance (`kiosk_emu.driver.KioskDevices`): its spool file,
    printer, outbox and log."""

    def __init__(self, kiosk: Kiosk, conn: TrioH2) -> None:
        self.kiosk = kiosk
        self.conn = conn
        self.job: PrintJob | None = None

    def spool(self, flow: KioskFlow) -> AbstractContextManager[SpoolWriter]:
        return self.kiosk._spool_writer(flow)

    def erase(self, flow: KioskFlow, event: str) -> None:
        self.kiosk._erase(flow, event)

    async def pay(self, flow: KioskFlow) -> None:
        k, iid = self.kiosk, flow.outcome.issuance_id or ""
        # If this kiosk dies before the print is confirmed, the job counts as refunded:
        # that notice is durable before money is taken or paper printed (see Outbox.hold).
        await k._outbox(k.outbox.hold, iid, *flow.refund_notice(k.ctx.clock.now())[1:])
        k._log("paid", issuance=iid, fee=flow.outcome.fee)

    async def print(self, flow: KioskFlow) -> bool:
        printer, iid = self.kiosk.printer, flow.outcome.issuance_id or ""
        document = self.kiosk._spool_file(flow).read_bytes() if printer.save_to is not None else b""
        with trio.move_on_after(self.kiosk.print_timeout) as waited:
            self.job = await printer.print_job(iid, flow.request.copies, document)
        if waited.cancelled_caught:  # paid but not printed in time: void, and the resident is told so
            self.job = printer.void(iid, flow.request.copies, document)
            self.kiosk._log("print-overrun", issuance=iid, copies_out=len(printer.tray.get(iid, [])))
        return self.job.misprinted

    async def printed(self, flow: KioskFlow, path: str, body: bytes) -> None:
        # Durable before the resident is told it is done (BIZ-5), and before the log says so,
        # so a kiosk killed in between never logs a print (or refund) whose notice is lost.
        k, iid, job, request = self.kiosk, flow.outcome.issuance_id or "", self.job, flow.request
        await k._outbox(k.outbox.confirm, iid, path, body)
        if job is not None and job.misprinted:
            k._log(
                "misprint-refunded",
                issuance=iid,
                fee=flow.outcome.fee,
                copies=[{"no": c.no, "stamp": c.stamp} for c in job.copies],
            )
        else:
            k._log("printed", issuance=iid, cert_type=request.cert_type, copies=request.copies, fee=flow.outcome.fee)

    async def deliver(self, flow: KioskFlow, path: str, body: bytes) -> tuple[int, bytes] | None:
        acked = await self.kiosk._deliver(self.conn, flow.outcome.issuance_id or "", path, body, flow)
        return (200, b"") if acked else None


async def issue_at(
    running, kiosk_id: str, card: Card, pin: str, request: IssueRequest, printer: Printer | None = None, **kw
) -> IssuanceResult:
    """One issuance from a kiosk of a running topology, on a connection of its own."""
    kiosk = Kiosk(running.context(kiosk_id), running.state_dir, printer)
    conn = await kiosk.connect()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.run)
        try:
            return await kiosk.issue(conn, card, pin, request, **kw)
        finally:
            conn.close()
