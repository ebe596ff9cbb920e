"""The cost model: CPU microseconds per completed request for every process of a bench phase.

A ratio of throughputs says who is faster, not where the cores go. Over the measured window of
a phase (warm-up end to measured end, the same window the load generator counts requests in)
the bench reads utime+stime of every process in /proc/PID/stat twice: konbini's relay processes
or HAProxy, the center side (the origin), the load generator's workers, the impairment daemon.
The difference divided by the requests completed in that window is that process's cost per
request; a process that serves one hop only (netns mode, or `--relay-processes hop`) gives that
hop's cost. The notes say when the generator or the origin, not the relay chain, is what limits
a phase: then its throughput ratio measures them, not the relays.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")
BUSY_CORE = 0.9  # a single-threaded process using more of a core than this is likely what limits the run
DAEMON_MARK = "topology.launch.impaird"


@dataclass(frozen=True)
class CostProcess:
    """One process whose CPU the cost model counts (its live descendants count with it)."""

    name: str
    role: str  # relays | baseline | origin | generator | lines | client
    pid: int
    hops: tuple[str, ...] = ()  # node kinds it serves
    threads: bool = False  # multi-threaded (HAProxy): more than one core is no sign of a bottleneck


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of one process (fields 14 and 15 of /proc/PID/stat), None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / TICK


def _children() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            ppid = int(Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        out.setdefault(ppid, []).append(int(entry.name))
    return out


def descendants(pid: int, children: dict[int, list[int]] | None = None) -> list[int]:
    """pid and every live process below it (a center with worker processes counts as one)."""
    children = _children() if children is None else children
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def other_children(known: list[CostProcess], parent: int | None = None) -> list[CostProcess]:
    """The bench's own children that are not a known server: the load generator's workers, the
    impairment daemon's supervisor, a compiled cross-check client. multiprocessing's resource
    tracker is left out (it does no request work)."""
    children = _children()
    taken = {p for k in known for p in descendants(k.pid, children)}
    out, n = [], 0
    for pid in sorted(children.get(parent or os.getpid(), [])):
        if pid in taken:
            continue
        cmd = _cmdline(pid)
        if "resource_tracker" in cmd or not cmd:
            continue
        if DAEMON_MARK in cmd:
            out.append(CostProcess("impairment daemon", "lines", pid))
        elif "h2mtls_load" in cmd:
            out.append(CostProcess("compiled client", "client", pid))
        else:
            out.append(CostProcess(f"generator worker {n}", "generator", pid))
            n += 1
    return out


class CostWindow:
    """CPU of named processes at the start and the end of a measured window, taken on timers
    (the bench's main thread is waiting on the load meanwhile)."""

    def __init__(self, known: list[CostProcess]) -> None:
        self.known = known
        self.procs: list[CostProcess] = []
        self.start: dict[str, float] = {}
        self.end: dict[str, float] = {}
        self.t_start = self.t_end = 0.0
        self._lock = threading.Lock()
        self._timers: list[threading.Timer] = []

    def _sample(self) -> dict[str, float]:
        children = _children()
        out = {}
        for p in self.procs:
            total = [cpu_seconds(q) for q in descendants(p.pid, children)]
            out[p.name] = sum(t for t in total if t is not None)
        return out

    def begin(self) -> None:
        with self._lock:
            if self.start:
                return
            self.procs = self.known + other_children(self.known)
            self.t_start = time.time()
            self.start = self._sample()

    def finish(self) -> None:
        """The end sample; a second call (timer and run end both) keeps the first."""
        with self._lock:
            if not self.start or self.end:
                return
            self.t_end = time.time()
            self.end = self._sample()

    def arm(self, start_wall: float, end_wall: float) -> None:
        """Take the samples at these wall-clock times (the measured window of the load)."""
        for at, what in ((start_wall, self.begin), (end_wall, self.finish)):
            t = threading.Timer(max(0.0, at - time.time()), what)
            t.daemon = True
            t.start()
            self._timers.append(t)

    def close(self) -> None:
        """At the end of the run: cancel what has not fired; a window never begun stays empty."""
        for t in self._timers:
            t.cancel()
        self.finish()

    def model(self, completed: int, cpus: int | None = None, extra: list[tuple[CostProcess, float]] = ()) -> dict:
        """The cost model of the window; `extra`: processes measured another way (a child's rusage)."""
        if not self.start or not self.end:
            return {
                "window_s": 0.0,
                "completed": completed,
                "processes": [],
                "per_hop_us": {},
                "notes": ["no CPU window: the run ended before its warm-up did"],
            }
        used = {p.name: self.end.get(p.name, 0.0) - self.start.get(p.name, 0.0) for p in self.procs}
        used |= {p.name: cpu for p, cpu in extra}
        procs = self.procs + [p for p, _ in extra]
        return cost_model(procs, used, self.t_end - self.t_start, completed, cpus or os.cpu_count() or 1)


def cost_model(procs: list[CostProcess], cpu_s: dict[str, float], window_s: float, completed: int, cpus: int) -> dict:
    """Per process: CPU seconds, cores and µs per completed request over the window; per hop from
    the processes that serve exactly one hop; the chain's and the origin's totals; the notes."""

    def us(cpu: float) -> float | None:
        return round(cpu / completed * 1e6, 1) if completed else None

    rows = []
    for p in procs:
        cpu = max(0.0, cpu_s.get(p.name, 0.0))
        rows.append(
            {
                "name": p.name,
                "role": p.role,
                "pid": p.pid,
                "hops": list(p.hops),
                "threads": p.threads,
                "cpu_s": round(cpu, 3),
                "cores": round(cpu / window_s, 3) if window_s > 0 else None,
                "us_per_request": us(cpu),
            }
        )
    per_hop: dict[str, float] = {}
    for p, row in zip(procs, rows, strict=True):
        if p.role in ("relays", "baseline") and len(p.hops) == 1:
            per_hop[p.hops[0]] = per_hop.get(p.hops[0], 0.0) + row["cpu_s"]
    model = {
        "window_s": round(window_s, 3),
        "completed": completed,
        "cpus": cpus,
        "processes": rows,
        "per_hop_us": {hop: us(cpu) for hop, cpu in sorted(per_hop.items())},
        "chain_us_per_request": us(sum(r["cpu_s"] for r in rows if r["role"] in ("relays", "baseline"))),
        "origin_us_per_request": us(sum(r["cpu_s"] for r in rows if r["role"] == "origin")),
        "generator_us_per_request": us(sum(r["cpu_s"] for r in rows if r["role"] == "generator")),
        "total_cores": round(sum(r["cpu_s"] for r in rows) / window_s, 3) if window_s > 0 else None,
    }
    model["notes"] = bottleneck_notes(model)
    return model


def bottleneck_notes(model: dict) -> list[str]:
    """Say when the load generator, the origin or the machine, not the relay chain, limits a phase."""
    notes = []
    rows = model["processes"]
    for r in rows:
        if r["role"] == "generator" and (r["cores"] or 0) >= BUSY_CORE:
            notes.append(
                f"the load generator is the bottleneck: {r['name']} used {r['cores']:.2f} of a core; the "
                "throughput ratio measures the generator too (add --workers, or see --cross-check)"
            )
        if r["role"] == "origin" and not r["threads"] and (r["cores"] or 0) >= BUSY_CORE:
            notes.append(f"the origin is the bottleneck: the center side ({r['name']}) used {r['cores']:.2f} of a core")
    chain, origin = model.get("chain_us_per_request"), model.get("origin_us_per_request")
    if chain and origin and origin > chain:
        notes.append(
            f"the origin costs more per request than the relay chain ({origin:,.0f} µs against {chain:,.0f} µs): "
            "the center side, not the relays, is where this scenario's cores go"
        )
    total, cpus = model.get("total_cores"), model.get("cpus") or 1
    if total is not None and total >= BUSY_CORE * cpus:
        notes.append(
            f"the machine is saturated: all processes together used {total:.2f} of {cpus} cores, so every "
            "process's throughput is bounded by its share of them"
        )
    return notes
