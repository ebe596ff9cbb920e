"""Kiosk heartbeats to the store controller through the running topology (SEC-KI-8)."""

from __future__ import annotations

import trio

from gateway.nodes.heartbeat import SILENCE_LIMIT
from kiosk_emu.kiosk import Kiosk
from tests.test_acceptor import _tasks


async def test_kiosk_heartbeats_reach_its_store_controller(net, monkeypatch):
    kiosk = Kiosk(net.context("kiosk-a2-1"), net.state_dir)
    assert kiosk.controller is not None and kiosk.controller.id == "store-controller-a2"
    controller = net.app("store-controller-a2")
    monitor = controller.monitor
    assert "kiosk-a2-1" not in controller.last_seen

    beats: list[float] = []
    three = trio.Event()
    seen = monitor.seen

    def spy(name: str, now: float) -> bool:
        if name == "kiosk-a2-1":
            beats.append(now)
            if len(beats) >= 3:
                three.set()
        return seen(name, now)

    monkeypatch.setattr(monitor, "seen", spy)
    async with trio.open_nursery() as nursery:
        await nursery.start(kiosk.run_heartbeat, 0.05)
        with trio.fail_after(10):
            await three.wait()  # periodic: three heartbeats arrived
        nursery.cancel_scope.cancel()

    last = controller.last_seen["kiosk-a2-1"]
    assert last == beats[-1] and beats == sorted(beats)
    # watched from its first heartbeat: falls due exactly SILENCE_LIMIT after the last one
    assert monitor.next_deadline() == last + SILENCE_LIMIT
    assert monitor.due(last + SILENCE_LIMIT - 0.01) == []
    assert monitor.due(last + SILENCE_LIMIT) == ["kiosk-a2-1"]
    assert net.app("store-controller-a1").last_seen == {}  # only its own store's controller hears it


async def test_a_store_controller_watches_from_its_stores_first_heartbeat_not_from_its_start(net, monkeypatch):
    """A national node process has 2,750 store controllers, most never hearing from a kiosk in a
    run: none has a watching task until its store's first heartbeat, and silence is reported as before."""

    def watchers() -> list[str]:
        tasks = _tasks(trio.lowlevel.current_root_task())
        return [t.name for t in tasks if t.name.endswith("StoreController._watch")]

    assert watchers() == []
    controller = net.app("store-controller-a2")
    controller.set_silence_limit(0.5)
    reported, heard = trio.Event(), trio.Event()
    silent, seen = controller._kiosk_silent, controller.monitor.seen

    async def report(kiosk: str) -> None:
        await silent(kiosk)
        reported.set()

    def beat(name: str, now: float) -> bool:
        heard.set()
        return seen(name, now)

    monkeypatch.setattr(controller, "_kiosk_silent", report)
    monkeypatch.setattr(controller.monitor, "seen", beat)
    kiosk = Kiosk(net.context("kiosk-a2-1"), net.state_dir)
    async with trio.open_nursery() as nursery:
        await nursery.start(kiosk.run_heartbeat, 60)
        with trio.fail_after(10):
            await heard.wait()
        nursery.cancel_scope.cancel()  # one heartbeat, then silence
    assert len(watchers()) == 1
    with trio.fail_after(10):
        await reported.wait()
    assert [r["kiosk"] for r in controller.silence_reports] == ["kiosk-a2-1"]
