"""Kiosk monitoring at the store controller (SEC-KI-8) and fault fan-out (SEC-KI-7).

`HeartbeatMonitor` is pure bookkeeping over a monotonic time: a kiosk is tracked from its first
heartbeat; one that stays silent for SILENCE_LIMIT seconds is reported once, and its silent
interval is recorded when it speaks again (the SLA's outage input). `watch` is the Trio loop that
sleeps exactly until the next kiosk could fall silent, so the report comes at the limit, not a
polling period later. `deliver` pushes one fault to one target and retries with capped backoff
until it gets through: a fault goes to both the store register and the maintenance center.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

log = logging.getLogger("konbini.store-controller")

SILENCE_LIMIT = 30.0  # seconds; a silent kiosk is reported within this bound
RETRY_BASE, RETRY_CAP = 0.5, 30.0


@dataclass
class HeartbeatMonitor:
    limit: float = SILENCE_LIMIT
    last_seen: dict[str, float] = field(default_factory=dict)
    silent_since: dict[str, float] = field(default_factory=dict)  # reported kiosks -> last heartbeat before silence
    outages: list[tuple[str, float, float]] = field(default_factory=list)  # (kiosk, silent from, back at)
    # set by `watch` while no kiosk can fall silent: called when one becomes able to (first seen, or back)
    wake: Callable[[], None] | None = field(default=None, repr=False)

    def seen(self, kiosk: str, now: float) -> bool:
        """Record a heartbeat; True when the kiosk was reported silent and is back."""
        if self.wake is not None and (kiosk not in self.last_seen or kiosk in self.silent_since):
            self.wake()
        self.last_seen[kiosk] = now
        start = self.silent_since.pop(kiosk, None)
        if start is not None:
            self.outages.append((kiosk, start, now))
            return True
        return False

    def due(self, now: float) -> list[str]:
        """Kiosks silent for `limit` seconds not yet reported; each is reported once per silence."""
        out = [k for k, t in self.last_seen.items() if k not in self.silent_since and now - t >= self.limit]
        for k in out:
            self.silent_since[k] = self.last_seen[k]
        return sorted(out)

    def next_deadline(self) -> float | None:
        pending = [t + self.limit for k, t in self.last_seen.items() if k not in self.silent_since]
        return min(pending) if pending else None


async def watch(monitor: HeartbeatMonitor, report: Callable[[str], Awaitable[None]]) -> None:
    """Report each kiosk the moment it has been silent for the limit; runs until cancelled.

    With no kiosk that could fall silent (none seen yet, or all reported) it waits for one to
    be seen, not on a timer: polling once a second, the 55,000 controllers of national.yaml woke
    55,000 times a second and took most of both cores while `up` was starting."""
    while True:
        deadline = monitor.next_deadline()
        if deadline is None:
            event = trio.Event()
            monitor.wake = event.set
            try:
                await event.wait()
            finally:
                monitor.wake = None
            continue
        await trio.sleep_until(deadline)  # a later heartbeat only moves deadlines later
        for kiosk in monitor.due(trio.current_time()):
            await report(kiosk)


async def deliver(send: Callable[[dict], Awaitable[None]], fault: dict, *, what: str = "fault") -> int:
    """Send until it gets through, backing off 0.5 s, 1 s, 2 s ... 30 s; returns the attempts it took."""
    attempt = 0
    while True:
        attempt += 1
        try:
            await send(fault)
            return attempt
        except Exception as exc:  # any failure of the far side: try again later, never drop
            delay = min(RETRY_CAP, RETRY_BASE * 2 ** (attempt - 1))
            log.warning("%s not delivered (attempt %d: %s); retry in %.1f s", what, attempt, type(exc).__name__, delay)
            await trio.sleep(delay)


async def notify_fault(fault: dict, targets: dict[str, Callable[[dict], Awaitable[None]]]) -> dict[str, int]:
    """Push one fault to every target (store register, maintenance center) concurrently, each with retry."""
    attempts: dict[str, int] = {}

    async def one(name: str, send) -> None:
        attempts[name] = await deliver(send, fault, what=f"fault to {name}")

    async with trio.open_nursery() as nursery:
        for name, send in targets.items():
            nursery.start_soon(one, name, send)
    return attempts
