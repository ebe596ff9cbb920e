"""The one injectable clock: aware datetimes in Asia/Tokyo, optionally started at an emulated
time and run faster, so service-hour boundaries can be shown live and runs replayed."""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

JST = ZoneInfo("Asia/Tokyo")


class Clock:
    def __init__(self, start: datetime | None = None, speed: float = 1.0) -> None:
        if start is not None and start.tzinfo is None:
            raise ValueError("clock start must carry a UTC offset, e.g. 2026-11-24T06:29:50+09:00")
        self._start = start.astimezone(JST) if start else None
        self._speed = speed
        self._mono0 = time.monotonic()

    def now(self) -> datetime:
        if self._start is None:
            return datetime.now(JST)
        return self._start + timedelta(seconds=(time.monotonic() - self._mono0) * self._speed)

    @property
    def emulated(self) -> bool:
        """Started at a given time rather than following the wall clock."""
        return self._start is not None

    @property
    def speed(self) -> float:
        return self._speed

    def set(self, start: datetime) -> None:
        """Jump the emulated time (tests, the demo); the speed is kept."""
        self._start = start.astimezone(JST)
        self._mono0 = time.monotonic()

    @classmethod
    def parse(cls, start: str | None, speed: float = 1.0) -> Clock:
        return cls(datetime.fromisoformat(start) if start else None, speed)
