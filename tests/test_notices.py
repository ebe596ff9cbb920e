"""Completion notices exactly once (BIZ-5) through the running topology: outbox, retry, restart,
misprint refund (BIZ-4) and the correction path."""

from __future__ import annotations

import json

import msgspec
import trio

from gateway.business.clock import Clock
from gateway.business.ledger import VOID_STAMP, LedgerDB
from gateway.business.session import IssuanceState
from gateway.protocol.http import request_headers
from gateway.protocol.messages import CorrectionNotice, IssueRequest
from gateway.protocol.streams import header
from kiosk_emu.device.outbox import Outbox
from kiosk_emu.device.printer import Printer
from kiosk_emu.kiosk import Kiosk, issue_at
from tests.conftest import TEST_TIME
from topology.launch.loopback import run_topology

MUNI_A = "131016"


async def post(kiosk: Kiosk, path: str, body: bytes) -> tuple[int, dict]:
    conn = await kiosk.connect()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.run)
        stream = await conn.open_stream(request_headers("POST", path, kiosk.router.id), end_stream=False)
        await stream.send_data(body, end_stream=True)
        headers = await stream.receive_headers()
        answer = await stream.read_body()
        conn.release(stream)
        conn.close()
    return int(header(headers, b":status") or 0), json.loads(answer)


def ledger_of(net) -> LedgerDB:
    return net.app("issuance-center").ledger.db


def rows(net, iid: str, kind: str) -> list[dict]:
    return [r for r in ledger_of(net).entries("2026-11") if r["issuance_id"] == iid and r["kind"] == kind]


async def test_a_repeated_notice_is_acknowledged_as_duplicate_and_recorded_once(net):
    card = net.cards.ensure_pool(1)[0]
    r = await issue_at(net, "kiosk-a1-1", card, "1234", IssueRequest(MUNI_A, "residence-record", 2))
    assert r.status == "issued" and not r.notice_pending
    kiosk = Kiosk(net.context("kiosk-a1-1"), net.state_dir)
    body = kiosk.outbox.conn.execute("SELECT body FROM notices WHERE issuance_id = ?", (r.issuance_id,)).fetchone()[0]
    assert kiosk.outbox.states()[r.issuance_id] == "acked"
    status, ack = await post(kiosk, "/v1/notice", body)
    assert (status, ack["duplicate"]) == (200, True)
    assert len(rows(net, r.issuance_id, "notice")) == 1 and len(rows(net, r.issuance_id, "copy")) == 2
    assert [x["amount"] for x in rows(net, r.issuance_id, "payment")] == [400]


async def test_notice_dedupe_survives_a_center_restart(topo, state):
    async with trio.open_nursery() as nursery:
        first = await nursery.start(
            lambda task_status: run_topology(topo, state, clock=Clock(TEST_TIME), task_status=task_status)
        )
        card = first.cards.ensure_pool(2)[1]
        r = await issue_at(first, "kiosk-b1-1", card, "1234", IssueRequest(MUNI_A, "residence-record"))
        first.stop()
    async with trio.open_nursery() as nursery:
        second = await nursery.start(
            lambda task_status: run_topology(topo, state, clock=Clock(TEST_TIME), task_status=task_status)
        )
        assert r.issuance_id not in second.app("issuance-center").issuances  # memory is gone, the ledger is not
        kiosk = Kiosk(second.context("kiosk-b1-1"), state)
        body = kiosk.outbox.conn.execute("SELECT body FROM notices WHERE issuance_id = ?", (r.issuance_id,)).fetchone()[
            0
        ]
        status, ack = await post(kiosk, "/v1/notice", body)
        assert (status, ack["duplicate"]) == (200, True)
        assert len(rows(second, r.issuance_id, "notice")) == 1
        second.stop()


async def test_unacknowledged_notice_stays_in_the_outbox_and_is_resent_until_acknowledged(net):
    center = net.app("issuance-center")
    real = center._notice
    calls = []

    async def flaky(stream, notice, t0):
        calls.append(notice.issuance_id)
        if len(calls) == 1:
            await center._refuse(stream, 503, "ledger-unavailable", t0)
        else:
            await real(stream, notice, t0)

    center._notice = flaky
    card = net.cards.ensure_pool(3)[2]
    r = await issue_at(net, "kiosk-a2-1", card, "1234", IssueRequest(MUNI_A, "residence-record"))
    assert (r.status, r.notice_pending) == ("issued", True)  # the resident is done; the notice waits
    assert rows(net, r.issuance_id, "notice") == []
    kiosk = Kiosk(net.context("kiosk-a2-1"), net.state_dir)
    kiosk.outbox.conn.execute(
        "UPDATE notices SET next_at = 0 WHERE issuance_id = ?", (r.issuance_id,)
    )  # skip the backoff wait
    conn = await kiosk.connect()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.run)
        await kiosk.flush_outbox(conn)
        conn.close()
    assert kiosk.outbox.states()[r.issuance_id] == "acked"
    assert len(rows(net, r.issuance_id, "notice")) == 1 and calls == [r.issuance_id] * 2


async def test_misprint_refunds_and_voids_every_copy_of_the_job(net):
    card = net.cards.ensure_pool(4)[3]
    printer = Printer(fault=lambda iid, copy_no: copy_no == 2)  # the second of three copies jams
    r = await issue_at(net, "kiosk-a3-1", card, "1234", IssueRequest(MUNI_A, "residence-record", 3), printer=printer)
    assert (r.status, r.refunded, r.reason) == ("refunded", True, "misprint") and "返金済・無効" in r.message
    copies = rows(net, r.issuance_id, "copy")
    assert len(copies) == 3 and all(json.loads(c["detail"])["stamp"] == VOID_STAMP for c in copies)
    assert [x["amount"] for x in rows(net, r.issuance_id, "refund")] == [-600]
    log = [json.loads(x) for x in (net.state_dir / "kiosk-logs" / "kiosk-a3-1.jsonl").read_text().splitlines()]
    job = [e for e in log if e.get("issuance") == r.issuance_id and e["event"] == "misprint-refunded"]
    assert [c["stamp"] for c in job[0]["copies"]] == [VOID_STAMP] * 3
    assert r.spool_erased


async def test_correction_amends_a_noticed_issuance_until_the_month_is_fixed(net):
    card = net.cards.ensure_pool(5)[4]
    r = await issue_at(net, "kiosk-a1-2", card, "1234", IssueRequest(MUNI_A, "residence-record", 2))
    kiosk = Kiosk(net.context("kiosk-a1-2"), net.state_dir)
    session = json.loads(
        kiosk.outbox.conn.execute("SELECT body FROM notices WHERE issuance_id = ?", (r.issuance_id,)).fetchone()[0]
    )["session"]
    corr = msgspec.json.encode(CorrectionNotice(r.issuance_id, session, 1, 200, "one copy was not printed"))
    status, ack = await post(kiosk, "/v1/correction", corr)
    assert (status, ack["status"]) == (200, "corrected")
    assert [(x["copies"], x["amount"]) for x in rows(net, r.issuance_id, "correction")] == [(1, 200)]
    # another kiosk cannot amend it
    status, _ = await post(Kiosk(net.context("kiosk-a1-1"), net.state_dir), "/v1/correction", corr)
    assert status == 404


def test_a_held_refund_notice_waits_for_the_print_and_goes_out_if_the_kiosk_died(tmp_path):
    box = Outbox(tmp_path / "k.sqlite")
    box.hold("iss-1", "/v1/notice", b"refund")
    assert box.due(float("inf")) == []  # not sent while the printer runs
    box.confirm("iss-1", "/v1/notice", b"printed")
    assert [(p.issuance_id, p.body) for p in box.due(float("inf"))] == [("iss-1", b"printed")]
    box.hold("iss-2", "/v1/notice", b"refund")  # ... and the kiosk is killed before confirming
    restarted = Outbox(tmp_path / "k.sqlite")
    assert restarted.release_held() == 1
    assert sorted((p.issuance_id, p.body) for p in restarted.due(float("inf"))) == [
        ("iss-1", b"printed"),
        ("iss-2", b"refund"),
    ]
    box.confirm("iss-2", "/v1/notice", b"printed")  # too late: a released refund is not overwritten
    assert dict((p.issuance_id, p.body) for p in restarted.due(float("inf")))["iss-2"] == b"refund"


async def test_a_misprinted_issuance_is_refunded_in_the_centers_memory_as_in_the_ledger(net):
    card = net.cards.ensure_pool(7)[6]
    printer = Printer(fault=lambda iid, copy_no: copy_no == 1)
    r = await issue_at(net, "kiosk-a1-1", card, "1234", IssueRequest(MUNI_A, "residence-record"), printer=printer)
    assert (r.status, r.refunded) == ("refunded", True)
    in_memory = net.app("issuance-center").issuances[r.issuance_id].state
    assert in_memory is ledger_of(net).issuance(r.issuance_id).state is IssuanceState.REFUNDED
