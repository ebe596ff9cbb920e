"""A cancel at every step of the kiosk flow (INT-1, BIZ-4): honoured before payment, never after.

Each issuance is checked four ways at once: the paper in the printer's tray, the money the kiosk
took (and its log), the screen (the result's status and message) and the center's ledger. Before
payment a cancel leaves no paper, no money and no ledger entry; once paid the job is printed and
noticed, or refunded with every copy stamped 返金済・無効 and the refund noticed at once.
"""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
import trio

from gateway.business.ledger import VOID_STAMP
from gateway.protocol.messages import IssueRequest
from kiosk_emu.device.printer import Printer
from kiosk_emu.flow import BEFORE_PAYMENT, FINAL, FlowError, KioskFlow, State
from kiosk_emu.kiosk import IssuanceResult, Kiosk

MUNI_A = "131016"
STEPS = [s for s in State if s not in FINAL]  # start … notified: every step a cancel can land in


def test_a_cancel_is_a_transition_only_before_payment():
    for step in State:  # the flow only holds the card and keys: a cancel touches neither
        flow = KioskFlow("kiosk-a1-1", None, "1234", IssueRequest(MUNI_A, "residence-record"), ())
        flow.state = step
        if step in BEFORE_PAYMENT:
            flow.cancel("timeout")
            assert (flow.state, flow.outcome.status, flow.outcome.charged) == (State.CANCELLED, "cancelled", 0)
            assert flow.outcome.message == "The request was cancelled. Nothing was charged."
        elif step in FINAL:
            flow.cancel("timeout")  # too late to matter: the request already ended
            assert flow.state is step
        else:
            with pytest.raises(FlowError, match=f"'cancelled' not allowed in state '{step.value}'"):
                flow.cancel("timeout")


class CancelAt(KioskFlow):
    """A resident who presses the cancel button the moment the flow reaches `step`."""

    def __init__(self, *args, step: State, button: trio.CancelScope) -> None:
        super().__init__(*args)
        self.step, self.button = step, button
        if step is State.START:
            button.cancel()

    def _go(self, event: str) -> None:
        super()._go(event)
        if self.state is self.step:
            self.button.cancel()


def ledger_rows(net, iid: str | None) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    for r in net.app("issuance-center").ledger.db.entries("2026-11"):
        if iid and r["issuance_id"] == iid:
            rows.setdefault(r["kind"], []).append(r)
    return rows


def kiosk_log(net, kiosk: Kiosk, iid: str | None, event: str) -> list[dict]:
    lines = (net.state_dir / "kiosk-logs" / f"{kiosk.node.id}.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if iid and e.get("issuance") == iid and e["event"] == event]


def story(net, kiosk: Kiosk, iid: str | None) -> dict:
    """What the paper, the kiosk's till and the center's ledger say about one issuance."""
    ledger = ledger_rows(net, iid)
    return {
        "paper": [c.stamp for c in kiosk.printer.tray.get(iid or "", [])],
        "paid": len(kiosk_log(net, kiosk, iid, "paid")),
        "payment": [x["amount"] for x in ledger.get("payment", [])],
        "refund": [x["amount"] for x in ledger.get("refund", [])],
        "copies": [json.loads(x["detail"])["stamp"] for x in ledger.get("copy", [])],
        "notice": kiosk.outbox.states().get(iid or ""),
    }


NOTHING = {"paper": [], "paid": 0, "payment": [], "refund": [], "copies": [], "notice": None}


def issued(fee: int, copies: int) -> dict:
    return {
        "paper": [None] * copies,
        "paid": 1,
        "payment": [fee],
        "refund": [],
        "copies": [None] * copies,
        "notice": "acked",
    }


def assert_one_story(net, kiosk: Kiosk, r: IssuanceResult, copies: int) -> None:
    """Paper, money, screen and ledger tell the same story of one issuance."""
    s = story(net, kiosk, r.issuance_id)
    assert r.spool_erased
    if r.status == "cancelled":
        assert r.message == "The request was cancelled. Nothing was charged."
        assert (s, r.charged) == (NOTHING, 0)
    elif r.status == "issued":
        assert r.message is None and not r.refunded and r.fee > 0
        assert (s, r.charged) == (issued(r.fee, copies), r.fee)
    else:
        assert r.status == "refunded" and r.refunded and "返金済・無効" in r.message
        paper = s.pop("paper")
        assert paper == [VOID_STAMP] * len(paper) and len(paper) <= copies  # whatever came out is void
        assert r.charged == r.fee  # and the refund reached the center already:
        assert s == {
            "paid": 1,
            "payment": [r.fee],
            "refund": [-r.fee],
            "copies": [VOID_STAMP] * copies,
            "notice": "acked",
        }


@pytest.mark.parametrize("step", STEPS, ids=[s.value for s in STEPS])
async def test_a_cancel_at_each_step_is_honoured_before_payment_and_never_after(net, step):
    """The resident presses cancel as the flow reaches `step`; the next resident follows on the same
    connection and finds only their own paper in the tray."""
    cards = net.cards.ensure_pool(40)[20 + 2 * STEPS.index(step) :][:2]
    kiosk = Kiosk(net.context("kiosk-a1-1"), net.state_dir, Printer())
    request = IssueRequest(MUNI_A, "residence-record", 2)
    conn = await kiosk.connect()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.run)
        button = trio.CancelScope()
        flow = CancelAt(kiosk.node.id, cards[0], "1234", request, kiosk.center_keys, step=step, button=button)
        first = await kiosk.drive(conn, flow, cancel=button)
        second = await kiosk.issue(conn, cards[1], "1234", request)
        conn.close()
    assert first.status == ("cancelled" if step in BEFORE_PAYMENT else "issued")
    assert second.status == "issued"
    assert_one_story(net, kiosk, first, 2)
    assert_one_story(net, kiosk, second, 2)
    assert set(kiosk.printer.tray) == {r.issuance_id for r in (first, second) if r.status != "cancelled"}


@pytest.mark.parametrize("step", STEPS, ids=[s.value for s in STEPS])
async def test_a_cancel_from_outside_at_each_step_never_leaves_paper_without_its_payment(net, step):
    """The kiosk's caller (a shutdown, a supervisor) cancels the issuance as the flow reaches `step`:
    no result comes back, but paper, till and ledger still agree, and the connection serves the next."""
    cards = net.cards.ensure_pool(60)[42 + STEPS.index(step) :][:1]
    kiosk = Kiosk(net.context("kiosk-a1-2"), net.state_dir, Printer())
    request = IssueRequest(MUNI_A, "residence-record", 2)
    conn = await kiosk.connect()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.run)
        with trio.CancelScope() as outside:
            flow = CancelAt(kiosk.node.id, cards[0], "1234", request, kiosk.center_keys, step=step, button=outside)
            await kiosk.drive(conn, flow)
        second = await kiosk.issue(conn, net.cards.ensure_pool(61)[60], "1234", request)
        conn.close()
    if step in BEFORE_PAYMENT:
        assert outside.cancelled_caught and story(net, kiosk, flow.outcome.issuance_id) == NOTHING
    else:  # the job completed under the cancel
        assert flow.state is State.DONE
        assert story(net, kiosk, flow.outcome.issuance_id) == issued(flow.outcome.fee, 2)
    assert not list(kiosk.spool.glob("*.pdf"))
    assert_one_story(net, kiosk, second, 2)


async def test_a_paid_job_the_printer_does_not_finish_is_refunded_void_and_noticed_at_once(net):
    card = net.cards.ensure_pool(41)[40]
    printer = Printer(jam=lambda iid, no: no == 2)  # the first copy comes out, the second sticks
    kiosk = Kiosk(net.context("kiosk-a2-1"), net.state_dir, printer, print_timeout=0.2)
    conn = await kiosk.connect()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.run)
        r = await kiosk.issue(conn, card, "1234", IssueRequest(MUNI_A, "residence-record", 3))
        conn.close()
    assert (r.status, r.reason, r.notice_pending) == ("refunded", "misprint", False)
    assert [c.stamp for c in printer.tray[r.issuance_id]] == [VOID_STAMP]  # the copy that came out is void
    assert_one_story(net, kiosk, r, 3)  # its notice acknowledged: nothing waits for a restart


async def test_cancels_at_random_times_under_load_never_split_paper_money_screen_and_ledger(net):
    """Four kiosks at once, each issuing one after another on its connection, with a slow printer
    and a print deadline that some jobs miss; each request is cancelled at a random moment of its
    flow, by the kiosk's own timeout or the resident's button, or left alone. The moments are drawn
    over the time a whole issuance took on that kiosk, so they land on every step however fast the machine."""
    rng = random.Random(29)
    kiosk_ids, per_kiosk = ("kiosk-a1-2", "kiosk-a2-2", "kiosk-a3-1", "kiosk-b1-1"), 10
    cards = iter(net.cards.ensure_pool(90)[44:])
    results: list[tuple[Kiosk, IssuanceResult, int]] = []
    too_late = 0  # cancels that came after the payment, before the flow ended: they change nothing

    async def one_kiosk(kiosk_id: str) -> None:
        nonlocal too_late
        # 100 ms a copy against a 250 ms deadline: one or two copies print, three overrun and are refunded
        kiosk = Kiosk(net.context(kiosk_id), net.state_dir, Printer(seconds_per_copy=0.1), print_timeout=0.25)
        conn = await kiosk.connect()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.run)
            first = await kiosk.issue(conn, next(cards), "1234", IssueRequest(MUNI_A, "residence-record", 1))
            results.append((kiosk, first, 1))
            span = first.latency_ms / 1000
            for _ in range(per_kiosk):
                copies, how, at = rng.randint(1, 3), rng.choice(("timeout", "button", "none")), rng.uniform(0, span)
                request = IssueRequest(MUNI_A, "residence-record", copies)
                button = trio.CancelScope()
                async with trio.open_nursery() as resident:
                    if how == "button":

                        async def press(at: float = at, button: trio.CancelScope = button) -> None:
                            await trio.sleep(at)  # the resident's moment, not a wait for the system
                            button.cancel()

                        resident.start_soon(press)
                    r = await kiosk.issue(
                        conn, next(cards), "1234", request, timeout=at if how == "timeout" else 60, cancel=button
                    )
                    resident.cancel_scope.cancel()
                results.append((kiosk, r, copies))
                too_late += how != "none" and r.status != "cancelled" and at < r.latency_ms / 1000
                if r.status != "cancelled":  # the connection warms up: the span follows the quickest flow
                    span = min(span, r.latency_ms / 1000)
            conn.close()

    async with trio.open_nursery() as nursery:
        for kiosk_id in kiosk_ids:
            nursery.start_soon(one_kiosk, kiosk_id)
    print("outcomes:", dict(Counter(r.status for _, r, _ in results)), "cancels too late to matter:", too_late)
    assert len(results) == len(kiosk_ids) * (1 + per_kiosk)
    for kiosk, r, copies in results:
        assert_one_story(net, kiosk, r, copies)
    for kiosk in {k.node.id: k for k, _, _ in results}.values():
        assert set(kiosk.printer.tray) == {
            r.issuance_id for k, r, _ in results if k is kiosk and r.status != "cancelled"
        }
