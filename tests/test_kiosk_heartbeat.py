"""Kiosk heartbeats to the store controller through the running topology (SEC-KI-8)."""

from __future__ import annotations

import trio

from gateway.nodes.heartbeat import SILENCE_LIMIT
from kiosk_emu.kiosk import Kiosk


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
