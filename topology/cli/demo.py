"""The main job: bring the default topology up, issue certificates, show every kind of refusal.

Runs at an emulated time inside service hours (printed), so the result does not depend on
when it is run; one step moves the clock to the evening to show the outside-hours refusal.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import trio
from rich.console import Console

from gateway.business.clock import JST, Clock
from gateway.business.refusal import Refusal
from gateway.protocol.messages import IssueRequest
from kiosk_emu.card import DEFAULT_PIN
from kiosk_emu.kiosk import IssuanceResult, issue_at
from topology.cli.render import show
from topology.launch.loopback import Running, run_topology
from topology.spec.model import Topology

# Today (Japan time) at 10:00 and 20:30: inside and outside a narrowed municipality's hours.
DEMO_TIME = datetime.now(JST).replace(hour=10, minute=0, second=0, microsecond=0)
EVENING = DEMO_TIME.replace(hour=20, minute=30)
CONCURRENT = 20


@dataclass
class Step:
    title: str
    expect: str  # "issued" or a Refusal
    result: IssuanceResult | None = None

    @property
    def ok(self) -> bool:
        r = self.result
        return r is not None and (r.status == self.expect or r.reason == self.expect)


async def _demo(topo: Topology, state: Path, console: Console) -> tuple[list[Step], list[IssuanceResult], float]:
    clock = Clock(DEMO_TIME)
    async with trio.open_nursery() as nursery:
        running: Running = await nursery.start(
            lambda task_status: run_topology(topo, state, clock=clock, task_status=task_status)
        )
        console.print(
            f"topology [bold]{topo.name}[/]: {len(running.servers)} servers up in {running.ready_s * 1000:.0f} ms; emulated time {clock.now():%Y-%m-%d %H:%M} JST"
        )
        kiosks = [n.id for n in topo.of_kind("kiosk")]
        munis = {n.id: n.municipality.code for n in topo.of_kind("municipality") if n.municipality}
        cards = running.cards
        with console.status("making cards (first run only: RSA-2048 keys)…"):
            pool = cards.ensure_pool(CONCURRENT + 3)
            revoked = cards.new()  # fresh each run: issued at this run's emulated time
            cards.revoke(revoked.card_id, "key-compromise")
            expired = cards.new(expired=True)
        a, b, c = munis.get("muni-a"), munis.get("muni-b"), munis.get("muni-c")
        plan = [
            (
                Step("residence record, 1 copy", "issued"),
                kiosks[0],
                pool[0],
                DEFAULT_PIN,
                IssueRequest(a, "residence-record"),
            ),
            (
                Step("seal registration, 2 copies", "issued"),
                kiosks[-1],
                pool[1],
                DEFAULT_PIN,
                IssueRequest(b, "seal-registration", 2),
            ),
            (Step("wrong PIN", Refusal.PIN_WRONG), kiosks[1], pool[2], "9999", IssueRequest(a, "residence-record")),
            (
                Step("municipality not participating", Refusal.MUNICIPALITY_NOT_PARTICIPATING),
                kiosks[2],
                pool[0],
                DEFAULT_PIN,
                IssueRequest(c, "residence-record"),
            ),
            (
                Step("certificate type not offered", Refusal.CERTIFICATE_TYPE_NOT_OFFERED),
                kiosks[3],
                pool[0],
                DEFAULT_PIN,
                IssueRequest(b, "family-register"),
            ),
            (
                Step("revoked card", Refusal.CARD_REVOKED),
                kiosks[4],
                revoked,
                DEFAULT_PIN,
                IssueRequest(a, "residence-record"),
            ),
            (
                Step("expired card", Refusal.CARD_EXPIRED),
                kiosks[5],
                expired,
                DEFAULT_PIN,
                IssueRequest(a, "residence-record"),
            ),
        ]
        steps = []
        for step, kiosk, card, pin, req in plan:
            step.result = await issue_at(running, kiosk, card, pin, req)
            steps.append(step)
        clock.set(EVENING)
        evening = Step("20:30, municipality open 08:30–19:00", Refusal.OUTSIDE_HOURS)
        evening.result = await issue_at(running, kiosks[0], pool[0], DEFAULT_PIN, IssueRequest(b, "residence-record"))
        steps.append(evening)
        clock.set(DEMO_TIME)

        results: list[IssuanceResult] = []
        t0 = trio.current_time()

        async def one(i: int) -> None:
            results.append(
                await issue_at(
                    running, kiosks[i % len(kiosks)], pool[3 + i], DEFAULT_PIN, IssueRequest(a, "residence-record")
                )
            )

        async with trio.open_nursery() as burst:
            for i in range(CONCURRENT):
                burst.start_soon(one, i)
        elapsed = trio.current_time() - t0
        running.stop()
    return steps, results, elapsed


def run_demo(topo: Topology, state: Path | None) -> int:
    console = Console()
    with tempfile.TemporaryDirectory(prefix="konbini-demo-") as tmp:
        steps, burst, elapsed = trio.run(_demo, topo, state or Path(tmp), console)
    show(
        console,
        "issuances",
        ("step", "expected", "status", "reason", "bytes", "fee", "latency ms", "kiosk screen"),
        [
            (
                s.title,
                s.expect,
                s.result.status if s.ok else f"{s.result.status} (UNEXPECTED)",
                s.result.reason or "-",
                str(s.result.document_bytes),
                str(s.result.fee),
                f"{s.result.latency_ms:.1f}",
                s.result.message if s.result.status != "issued" else "printed; spool erased",
            )
            for s in steps
        ],
    )
    issued = sum(r.status == "issued" for r in burst)
    misdelivered = sum(r.status == "misdelivered" for r in burst)
    lat = sorted(r.latency_ms for r in burst)
    console.print(
        f"{len(burst)} near-simultaneous issuances with distinct cards: {issued} issued, "
        f"{misdelivered} misdelivered, p50 {lat[len(lat) // 2]:.1f} ms, max {lat[-1]:.1f} ms, {elapsed:.2f} s in all"
    )
    ok = all(s.ok for s in steps) and issued == len(burst) and misdelivered == 0
    console.print("[bold green]demo passed[/]" if ok else "[bold red]demo found a problem[/]")
    return 0 if ok else 1
