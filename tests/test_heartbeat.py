"""Store controller monitoring (SEC-KI-8) and fault fan-out with retry (SEC-KI-7), on trio's MockClock."""

from __future__ import annotations

import pytest
import trio

from gateway.nodes.heartbeat import SILENCE_LIMIT, HeartbeatMonitor, notify_fault, watch


def test_monitor_reports_a_silent_kiosk_once_and_records_its_outage():
    m = HeartbeatMonitor()
    m.seen("k1", 0.0)
    m.seen("k2", 10.0)
    assert m.due(29.9) == [] and m.next_deadline() == 30.0
    assert m.due(30.0) == ["k1"]
    assert m.due(100.0) == ["k2"] and m.due(200.0) == []
    assert m.seen("k1", 250.0) is True
    assert m.outages == [("k1", 0.0, 250.0)]


async def test_silent_kiosk_is_reported_within_30_seconds(autojump_clock):
    m = HeartbeatMonitor()
    reports: list[tuple[str, float]] = []

    async def report(kiosk: str) -> None:
        reports.append((kiosk, trio.current_time()))

    async def kiosk(name: str, beats: int) -> None:
        for _ in range(beats):
            m.seen(name, trio.current_time())
            await trio.sleep(5)

    async with trio.open_nursery() as nursery:
        t0 = trio.current_time()
        nursery.start_soon(watch, m, report)
        nursery.start_soon(kiosk, "kiosk-a1-1", 4)  # last heartbeat at t0+15, then silent
        nursery.start_soon(kiosk, "kiosk-a1-2", 100)  # keeps beating
        await trio.sleep(120)
        nursery.cancel_scope.cancel()
    assert [k for k, _ in reports] == ["kiosk-a1-1"]
    assert reports[0][1] - (t0 + 15) <= SILENCE_LIMIT


class _CountingMonitor(HeartbeatMonitor):
    wakeups = 0

    def next_deadline(self):
        self.wakeups += 1
        return super().next_deadline()


async def test_a_watcher_with_nothing_to_watch_sleeps_until_a_kiosk_is_seen(autojump_clock):
    # no polling: a national topology has 55,000 store controllers, most with no kiosk running
    m = _CountingMonitor()
    reports: list[tuple[str, float]] = []

    async def report(kiosk: str) -> None:
        reports.append((kiosk, trio.current_time()))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch, m, report)
        await trio.sleep(3600)
        assert m.wakeups == 1  # an hour with no kiosk: it looked once
        seen_at = trio.current_time()
        m.seen("kiosk-a1-1", seen_at)
        await trio.sleep(SILENCE_LIMIT + 1)
        assert reports == [("kiosk-a1-1", seen_at + SILENCE_LIMIT)]  # at the limit, not a poll later
        await trio.sleep(3600)
        assert m.wakeups <= 4  # reported: asleep again until it speaks
        back = trio.current_time()
        m.seen("kiosk-a1-1", back)
        await trio.sleep(SILENCE_LIMIT + 1)
        nursery.cancel_scope.cancel()
    assert reports[1] == ("kiosk-a1-1", back + SILENCE_LIMIT) and m.outages == [("kiosk-a1-1", seen_at, back)]


async def test_fault_reaches_register_and_maintenance_center_despite_failures(autojump_clock):
    got: dict[str, list[float]] = {"register": [], "maintenance": []}
    failures = {"register": 3, "maintenance": 0}

    def target(name: str):
        async def send(fault: dict) -> None:
            if failures[name] > 0:
                failures[name] -= 1
                raise ConnectionError("unreachable")
            got[name].append(trio.current_time())

        return send

    t0 = trio.current_time()
    attempts = await notify_fault({"kiosk": "kiosk-a1-1", "fault": "printer-jam"}, {n: target(n) for n in got})
    assert attempts == {"register": 4, "maintenance": 1}
    assert len(got["register"]) == 1 and got["register"][0] - t0 == pytest.approx(0.5 + 1 + 2)
