"""Run one load: spawn the worker processes, start them together, collect and merge their results.

The coordinator prints nothing: it tells `progress` (see `LoadProgress`) how far the run is, and
the CLI draws it.
"""

from __future__ import annotations

import multiprocessing as mp
import queue as queue_mod
import time
from collections.abc import Callable
from typing import Protocol

from kiosk_emu.load.merge import merge_results
from kiosk_emu.load.spec import KioskSpec, LoadSpec
from kiosk_emu.load.worker import worker_main


class LoadProgress(Protocol):
    """How far a run is, told to whoever shows it (the CLI's progress bar)."""

    def start(self, label: str, total_s: float) -> None: ...

    def update(self, elapsed_s: float, done: int) -> None: ...

    def stop(self) -> None: ...


class LoadError(Exception):
    """The load could not be run (kiosks cannot connect, a worker died); one line for the user."""


def run_load(
    spec: LoadSpec,
    workers: int = 1,
    *,
    progress: LoadProgress | None = None,
    label: str = "",
    on_go: Callable[[float], None] | None = None,
) -> dict:
    """Run one load across `workers` processes; returns the merged result (see `merge_results`).
    `on_go(wall_time)` is told when the workers start (warm-up begins): the bench's cost model
    times its CPU window from it; `progress` is told how far the run is, under `label`."""
    if spec.rate is not None and spec.rate <= 0:
        raise LoadError(f"impossible rate {spec.rate}: it must be > 0 requests per second")
    if spec.rate is None and (spec.concurrency or 0) <= 0:
        raise LoadError("give a rate > 0 (open loop) or a concurrency >= 1 (closed loop)")
    workers = max(1, min(workers, len(spec.kiosks)))
    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()
    go, stop = ctx.Event(), ctx.Event()
    go_at = ctx.Value("d", 0.0)
    shares = worker_shares(spec.kiosks, workers)
    workers = len(shares)
    procs = []
    for wid in range(workers):
        part = LoadSpec(**{**spec.__dict__, "kiosks": shares[wid]})
        p = ctx.Process(target=worker_main, args=(wid, workers, part, out, go, go_at, stop), daemon=True)
        p.start()
        procs.append(p)
    results: dict[int, dict] = {}
    interrupted = False
    try:
        wait_ready(out, procs)
        go_at.value = time.time() + 0.1
        go.set()
        if on_go is not None:
            on_go(go_at.value)
        results = collect(out, procs, spec, workers, progress, label)
    except KeyboardInterrupt:
        interrupted = True
        stop.set()
        results = collect(out, procs, spec, workers, None, label, deadline_s=15)
    finally:
        stop.set()
        go.set()
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
    merged = merge_results(list(results.values()), spec)
    merged["partial"] = interrupted or merged["partial"] or len(results) < workers
    return merged


def wait_ready(out, procs) -> None:
    """Until every worker has connected its kiosks; LoadError with the first one's error, or if
    one dies or they take over two minutes."""
    ready = 0
    deadline = time.monotonic() + 120
    while ready < len(procs):
        try:
            kind, _, payload = out.get(timeout=0.5)
        except queue_mod.Empty:
            if time.monotonic() > deadline or any(not p.is_alive() for p in procs):
                raise LoadError("a load-generator worker did not start (see the log above)") from None
            continue
        if kind == "error":
            raise LoadError(payload)
        ready += kind == "ready"


def worker_shares(kiosks: list[KioskSpec], workers: int) -> list[list[KioskSpec]]:
    """Kiosks per worker, round-robin. A worker lives in one network namespace, so in netns mode
    kiosks are first grouped by namespace: at least one worker per namespace, `workers` spread over them."""
    groups: dict[str | None, list[KioskSpec]] = {}
    for k in kiosks:
        groups.setdefault(k.namespace, []).append(k)
    per = max(1, workers // len(groups)) if groups else 1
    return [g[i::n] for g in groups.values() for n in [min(per, len(g))] for i in range(n)]


def collect(
    out,
    procs,
    spec: LoadSpec,
    workers: int,
    progress: LoadProgress | None,
    label: str,
    deadline_s: float | None = None,
) -> dict[int, dict]:
    """The workers' results by worker id, until all have sent one, all died, or the deadline."""
    results: dict[int, dict] = {}
    done_by: dict[int, int] = {}
    total_s = spec.warmup_s + spec.duration_s
    limit = time.monotonic() + (deadline_s if deadline_s is not None else total_s + 30)
    if progress is not None:
        progress.start(label or spec.workload.name, total_s)
    t0 = time.monotonic()
    try:
        while len(results) < workers and time.monotonic() < limit:
            try:
                kind, wid, payload = out.get(timeout=0.25)
            except queue_mod.Empty:
                if all(not p.is_alive() for p in procs):
                    break
                kind = None
            if kind == "progress":
                done_by[wid] = payload
            elif kind == "result":
                results[wid] = payload
            if progress is not None:
                progress.update(min(total_s, time.monotonic() - t0), sum(done_by.values()))
    finally:
        if progress is not None:
            progress.stop()
    return results
