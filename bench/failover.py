"""The failover bench: kill one of two redundant servers under load, restart it, hang it, and see what it cost.

During an open-loop issuance run the process hosting the first DMZ relay of an operator with two
is SIGSTOPped (hung: its sockets still accept, nothing answers) at 10 % of the measured window and
continued at 25 %, then SIGKILLed at 30 % and started again at 45 %; the same for the first of a
municipality's two document servers from 55 % to 90 %. Hangs come first: a continued process
serves again at once (the center asks its first document server again once a probe finds it
answering), a restarted one only after seconds of start-up. Each of those servers runs alone in its own
process for this (bench.runner isolates them), so a fault takes nothing else with it. The load
generator keeps every measured issuance as (start, end, outcome, which of the watched servers its
server-timing names); `analyse` turns that into completions and failures per second, who served
in each stretch of the run, the failures of each fault by reason and the time to pass over to the
survivor.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from topology.spec.model import Topology

# When each fault happens to the first of a pair, as a fraction of the measured window: hang
# (SIGSTOP), continue (SIGCONT), kill, restart. A pair's steps run in order, and a step that comes
# late (a restart waits for the process to be ready) delays the ones after it as much, so that
# every fault lasts its planned time.
RELAY_FAULTS = ((0.10, "hang"), (0.25, "continue"), (0.30, "kill"), (0.45, "restart"))
SERVER_FAULTS = ((0.55, "hang"), (0.70, "continue"), (0.75, "kill"), (0.90, "restart"))
ENDS = {"kill": "restart", "hang": "continue"}  # a fault and the event that ends it


class FailoverError(Exception):
    pass


@dataclass(frozen=True)
class Targets:
    """The redundant pairs the bench kills one of: (killed, survivor) each."""

    operator: str
    relays: tuple[str, str]  # DMZ relays of `operator`; the first is killed
    municipality: str  # its code
    servers: tuple[str, str]  # its document servers; the first is killed
    municipality_name: str | None = None  # as the file names it, e.g. 高松市

    @property
    def watched(self) -> tuple[str, ...]:
        return (*self.relays, *self.servers)

    @property
    def isolated(self) -> set[str]:
        """Nodes that must each run alone in a process."""
        return set(self.watched)


def targets(topo: Topology) -> Targets:
    """The first operator with two DMZ relays (the one its EC router tries first is killed) and the
    first participating municipality with two document servers (file order: the one the center
    tries first is killed)."""
    relays: dict[str, list[str]] = {}
    for n in topo.of_kind("dmz-relay"):
        relays.setdefault(n.operator or "-", []).append(n.id)
    pair = None
    for op, ids in relays.items():
        if len(ids) < 2:
            continue
        first = next((h for ec in topo.of_kind("ec-router") if ec.operator == op for h in ec.hops if h in ids), ids[0])
        pair = (op, (first, next(i for i in ids if i != first)))
        break
    servers: dict[str, list[str]] = {}
    for n in topo.of_kind("municipality"):
        if n.municipality is not None and n.municipality.participating:
            servers.setdefault(n.municipality.code, []).append(n.id)
    muni = next(((code, ids) for code, ids in servers.items() if len(ids) >= 2), None)
    if pair is None or muni is None:
        raise FailoverError(
            f"{topo.source}: the failover bench needs an operator with two DMZ relays and a "
            "municipality with two document servers (try --topology topology/redundant.yaml)"
        )
    data = topo.node(muni[1][0]).municipality
    return Targets(pair[0], pair[1], muni[0], (muni[1][0], muni[1][1]), data.name if data else None)


class FaultSchedule:
    """Kills, restarts, hangs and continues `procs` (node id -> bench.processes.NodeProcess) on a
    thread per node while the load runs, at fractions of the measured window; every event is timed
    from the window's start."""

    def __init__(self, t: Targets, procs: dict, warmup_s: float, duration_s: float) -> None:
        self.plan = [(RELAY_FAULTS, t.relays), (SERVER_FAULTS, t.servers)]
        self.procs = procs
        self.warmup_s = warmup_s
        self.duration_s = duration_s
        self.events: list[dict] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def go(self, go_wall: float) -> None:
        """The load's workers start at `go_wall` (time.time()); the measured window after warm-up.
        One thread per pair: a restart waits for its process to be ready (seconds under load),
        which must not delay the other pair's faults."""
        self.t0 = go_wall + self.warmup_s
        for steps, pair in self.plan:
            thread = threading.Thread(target=self._fault, args=(steps, pair), name=f"failover-{pair[0]}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def _fault(self, steps: tuple[tuple[float, str], ...], pair: tuple[str, str]) -> None:
        act = {"kill": self._kill, "restart": self._restart, "hang": self._hang, "continue": self._continue}
        late = 0.0
        try:
            for frac, what in steps:
                planned = self.t0 + frac * self.duration_s
                if self._stop.wait(max(0.0, planned + late - time.time())):
                    return
                try:
                    self.events.append(act[what](pair[0]))
                except Exception as exc:  # noqa: BLE001 - the run goes on; the report says what failed
                    self.errors.append(f"{what} {pair[0]}: {type(exc).__name__}: {exc}")
                    return
                late = max(late, time.time() - planned)
        finally:
            for node in pair:  # the run ended inside a hang: nothing stays stopped
                if self.procs[node].hung:
                    self.procs[node].resume()

    def _kill(self, node: str) -> dict:
        proc = self.procs[node]
        pid = proc.pid
        at = time.time() - self.t0
        status = proc.kill()
        return {
            "event": "kill",
            "node": node,
            "pid": pid,
            "at_s": round(at, 3),
            "signal": "SIGKILL",
            "exitcode": status,
            "pid_gone": not Path(f"/proc/{pid}").exists(),
        }

    def _hang(self, node: str) -> dict:
        proc = self.procs[node]
        proc.hang()
        return {
            "event": "hang",
            "node": node,
            "pid": proc.pid,
            "at_s": round(time.time() - self.t0, 3),
            "signal": "SIGSTOP",
        }

    def _continue(self, node: str) -> dict:
        proc = self.procs[node]
        proc.resume()
        return {
            "event": "continue",
            "node": node,
            "pid": proc.pid,
            "at_s": round(time.time() - self.t0, 3),
            "signal": "SIGCONT",
        }

    def _restart(self, node: str) -> dict:
        at = time.time() - self.t0
        ready_s = self.procs[node].start()
        return {
            "event": "restart",
            "node": node,
            "pid": self.procs[node].pid,
            "at_s": round(at, 3),
            "up_at_s": round(time.time() - self.t0, 3),
            "ready_s": round(ready_s, 3),
        }

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)


def per_second_counts(trace: list, duration_s: float) -> list[dict]:
    """Per second of the run (by end time): completions and whom they went through, failures by reason."""
    seconds = math.ceil(duration_s) + 6  # the last issuances end after the window (the grace period)
    per_second = [{"second": s, "ok": 0, "failed": 0, "reasons": Counter(), "via": Counter()} for s in range(seconds)]
    for _start, end, outcome, via in trace:
        row = per_second[min(max(0, int(end)), seconds - 1)]
        if outcome == "ok":
            row["ok"] += 1
            row["via"].update(via)
        else:
            row["failed"] += 1
            row["reasons"][outcome] += 1
    while per_second and not (per_second[-1]["ok"] or per_second[-1]["failed"]):
        per_second.pop()
    return per_second


def stretches_between(trace: list, events: list[dict]) -> list[dict]:
    """The same counts per stretch between one event and the next."""
    marks = sorted((e["at_s"], f"{e['event']} {e['node']}") for e in events)
    stretches = []
    bounds = [0.0, *[m[0] for m in marks], math.inf]
    names = ["before", *[m[1] for m in marks]]
    for (lo, hi), name in zip(zip(bounds, bounds[1:], strict=False), names, strict=True):
        inside = [r for r in trace if lo <= r[1] < hi]
        stretches.append(
            {
                "from": name,
                "from_s": lo,
                "to_s": None if hi == math.inf else hi,
                "ok": sum(1 for r in inside if r[2] == "ok"),
                "failed": dict(Counter(r[2] for r in inside if r[2] != "ok")),
                "via": dict(Counter(v for r in inside if r[2] == "ok" for v in r[3])),
            }
        )
    return stretches


def fault_effects(start: dict, events: list[dict], trace: list, t: Targets) -> dict:
    """One fault, from `start` (a kill or a hang) until its end: its failures, who served meanwhile,
    and the time to pass over to the survivor."""
    end = next(
        (
            e
            for e in events
            if e["event"] == ENDS[start["event"]] and e["node"] == start["node"] and e["at_s"] >= start["at_s"]
        ),
        None,
    )
    k0, k1 = start["at_s"], end["at_s"] if end else math.inf
    node = start["node"]
    survivor = next(p[1 - p.index(node)] for p in (t.relays, t.servers) if node in p)
    failures = [r for r in trace if k0 <= r[1] < k1 and r[2] != "ok"]
    last_failure = max((r[1] for r in failures), default=k0)
    ok = [r for r in trace if r[2] == "ok"]
    passed_over = min((r[1] for r in ok if k0 <= r[0] < k1 and survivor in r[3] and r[1] >= last_failure), default=None)
    started_down = [r for r in ok if k0 <= r[0] < k1]  # they may end after the fault ends (a slow machine)
    return {
        "fault": start["event"],
        "node": node,
        "survivor": survivor,
        "pid": start["pid"],
        "at_s": k0,
        "until_s": end["at_s"] if end else None,
        "pid_gone": start.get("pid_gone"),
        "up_again_at_s": end.get("up_at_s") if end else None,
        "failures": dict(Counter(r[2] for r in failures)),
        # from the fault until the first issuance started during it completes through the survivor
        "time_to_pass_over_s": round(passed_over - k0, 3) if passed_over is not None else None,
        "ok_before_via_faulty": sum(1 for r in ok if r[0] < k0 and node in r[3]),
        "ok_while_down": len(started_down),
        "ok_while_down_via_survivor": sum(1 for r in started_down if survivor in r[3]),
        # ended before the fault ended: the node was dead or stopped then, so this must be 0
        "ok_while_down_via_faulty": sum(1 for r in started_down if r[1] < k1 and node in r[3]),
    }


def analyse(trace: list, events: list[dict], t: Targets, duration_s: float) -> dict:
    """The run seen through its issuances: per second (by end time) completions, failures by reason
    and which watched servers served; per stretch between events the same counts. Per fault (a kill
    until its restart, a hang until its continue): the failures ending in that time, by reason; the
    issuances started in it and who served them; the time to pass over: from the fault until the
    first issuance that started during it completed through the survivor, no earlier than the last
    of those failures (None: nothing passed over)."""
    # an unexpected answer is "error:expected-ok-got-refused:X" to the generator; here it is its reason
    trace = [(start, end, outcome.removeprefix("error:expected-ok-got-"), via) for start, end, outcome, via in trace]
    events = sorted(events, key=lambda e: e["at_s"])
    per_second = per_second_counts(trace, duration_s)
    stretches = stretches_between(trace, events)
    faults = [fault_effects(start, events, trace, t) for start in events if start["event"] in ENDS]
    return {
        "targets": {
            "operator": t.operator,
            "relays": list(t.relays),
            "municipality": t.municipality,
            "municipality_name": t.municipality_name,
            "servers": list(t.servers),
        },
        "events": events,
        "per_second": [{**r, "reasons": dict(r["reasons"]), "via": dict(r["via"])} for r in per_second],
        "stretches": stretches,
        "faults": faults,
        "trace": [list(r) for r in trace],  # every measured issuance: start s, end s, outcome, watched servers seen
        "ok": len(faults) == 4
        and all(
            (f["fault"] != "kill" or f["pid_gone"])
            and f["ok_before_via_faulty"] > 0
            and f["time_to_pass_over_s"] is not None
            and f["ok_while_down_via_survivor"] > 0
            and f["ok_while_down_via_faulty"] == 0
            for f in faults
        )
        and bool(stretches)
        and stretches[-1]["ok"] > 0,
    }
