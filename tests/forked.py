"""Several forked processes started together, for tests of what processes share (a ledger file,
a session file): `at_once(target, args, timeout)` forks one process per argument tuple, each
called as target(start, out, *args) with a Barrier `start` they all wait on and a Queue `out`
for their answers; returns every process's answers once all exited 0."""

from __future__ import annotations

import multiprocessing


def at_once(target, args: list[tuple], timeout: float = 60.0) -> list:
    ctx = multiprocessing.get_context("fork")
    start, out = ctx.Barrier(len(args)), ctx.Queue()
    procs = [ctx.Process(target=target, args=(start, out, *a)) for a in args]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    assert [p.exitcode for p in procs] == [0] * len(procs)
    return [out.get(timeout=5) for _ in procs]
