"""The running nodes' clock, written to their state directory for the processes that join them
later (`konbini issue` and `card new`, the policy check's kiosks), so that a card they make is
valid, and a refusal explained, in the nodes' time rather than the wall clock's."""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta
from pathlib import Path

from gateway.business.clock import Clock


def clock_path(state_dir: Path) -> Path:
    return Path(state_dir) / "clock.json"


def write_clock(state_dir: Path, clock: str | None, speed: float) -> None:
    """`clock`: the nodes' emulated time now (ISO), None when they run on the wall clock."""
    clock_path(state_dir).write_text(json.dumps({"clock": clock, "speed": speed, "started": time.time()}))


def write_running_clock(state_dir: Path, clock: Clock) -> None:
    write_clock(state_dir, clock.now().isoformat() if clock.emulated else None, clock.speed)


def read_clock(state_dir: Path) -> tuple[str | None, float]:
    """The nodes' clock as (ISO time now, speed), or (None, 1.0) when they run on the wall clock."""
    try:
        data = json.loads(clock_path(state_dir).read_text())
    except (OSError, ValueError):
        return None, 1.0
    if not data.get("clock"):
        return None, 1.0
    start = datetime.fromisoformat(data["clock"]) + timedelta(seconds=(time.time() - data["started"]) * data["speed"])
    return start.isoformat(), data["speed"]


def running_clock(state_dir: Path) -> Clock:
    """A clock that keeps the time of the topology last started with this state directory."""
    return Clock.parse(*read_clock(state_dir))
