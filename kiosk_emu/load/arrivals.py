"""When requests are meant to start: Poisson arrivals at a fixed or a piecewise rate, and latency
counted from that intended start (no coordinated omission)."""

from __future__ import annotations

import random
from collections.abc import Iterator


def poisson_arrivals(rate: float, start: float, end: float, rng: random.Random) -> Iterator[float]:
    """Intended start times of a Poisson process of `rate` per second in [start, end)."""
    if rate <= 0:
        raise ValueError("rate must be > 0")
    t = start
    while True:
        t += rng.expovariate(rate)
        if t >= end:
            return
        yield t


def piecewise_arrivals(segments: list[tuple[float, float]], start: float, rng: random.Random) -> Iterator[float]:
    """Intended start times of a Poisson process whose rate is `rate` for `seconds`, segment by
    segment, from `start` (a segment of rate 0 has no arrivals)."""
    t0 = start
    for seconds, rate in segments:
        end = t0 + seconds
        if rate > 0:
            yield from poisson_arrivals(rate, t0, end, rng)
        t0 = end


def latency_ms(intended: float, done: float) -> float:
    """Latency as the user sees it: from when the request *should* have started (open loop)."""
    return (done - intended) * 1000
