"""Pin a run to k cores: this process (and so every child it starts afterwards) and running
processes, every thread of each, through sched_setaffinity.

The national bench runs a phase on 1 core and again on 2 to see how its rate scales
(bench/scaling.py). On a shared machine the k cores are not the run's alone: others' processes
still run on them, which the report says next to the figures.
"""

from __future__ import annotations

import os
from pathlib import Path


class PinningError(Exception):
    """Asked for more cores than this process may run on."""


def cores_for(k: int, allowed: set[int] | None = None) -> set[int]:
    """The first `k` of the cores this process may run on."""
    allowed = os.sched_getaffinity(0) if allowed is None else allowed
    if not 1 <= k <= len(allowed):
        raise PinningError(f"{k} core(s) asked for, {len(allowed)} available: {sorted(allowed)}")
    return set(sorted(allowed)[:k])


def pin(pids: list[int], cores: set[int]) -> None:
    """Every thread of these processes and of this one on `cores`; a process gone meanwhile is skipped."""
    for pid in [os.getpid(), *pids]:
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            continue
        for tid in tids:
            try:
                os.sched_setaffinity(tid, cores)
            except OSError:  # the thread ended
                pass


def allowed_of(pid: int) -> set[int] | None:
    """The cores a process may run on (None once it is gone): what a test checks after `pin`."""
    try:
        return os.sched_getaffinity(pid) if Path(f"/proc/{pid}").exists() else None
    except OSError:
        return None
