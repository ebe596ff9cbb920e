"""Run benchmark scenarios: servers in their own processes, the load generator in others.

Process layout (so nothing shares an event loop with the generator):
- the *origin* process runs the center side (issuance center, OCSP, municipalities) for the
  whole run, at a fixed emulated time (20:30 JST: muni-a open, muni-b closed);
- the *front* process is either konbini's relays (store routers, EC routers, DMZ relays) or
  HAProxy on the same addresses; each phase starts a fresh one and records its CPU and memory;
- the load generator's worker processes (`kiosk_emu.load.generator.run_load`).
Phases run back to back per scenario: konbini, then (with --baseline haproxy) HAProxy.

With `--netns` (root) the whole topology instead runs in netns mode for the whole run (namespaces
`konbini-<tag>-<site>`, one nodehost per namespace, as `konbini up --netns`), every load worker
enters its kiosks' namespace before opening a socket, and everything is torn down at the end.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import re
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from bench import crosscheck
from bench.baselines.haproxy import (
    LOG_SAMPLE,
    HAProxyError,
    HAProxyProcess,
    config,
    haproxy_binary,
    hop_timers,
)
from bench.costs import CostProcess, CostWindow
from bench.failover import FailoverError, FaultSchedule, Targets, analyse, targets
from bench.report import write_reports
from bench.scenarios import SCENARIOS, Scenario
from bench.topology import with_kiosks
from gateway.business.clock import JST, Clock
from gateway.business.ledger import UNFINISHED, ledger_path
from gateway.business.rules import window, within
from gateway.business.session import DELIVERY_TIMEOUT, NOTICE_TTL
from kiosk_emu.card import CardError, CardStore
from kiosk_emu.latency import with_relay_waits
from kiosk_emu.load.generator import KioskSpec, LoadError, LoadSpec, run_load
from kiosk_emu.smartphone import SmartphoneStore
from topology.launch import netns
from topology.launch.impair import Impairments
from topology.launch.netns import NetnsError, require_root
from topology.netns.plan import PlanError, build_plan, namespace_prefix
from topology.pki import PKI
from topology.spec.kinds import RELAY_CHAIN  # the relay kinds from the kiosk's router inwards
from topology.spec.model import CENTER_KINDS, RELAY_KINDS, Impairment, Mode, Topology

log = logging.getLogger("konbini.bench")

TICK = os.sysconf("SC_CLK_TCK")


PHASES = ("konbini", "lines", "haproxy")  # konbini's relays; the same with the lines impaired; HAProxy's relays
BENCH_PHONE = "bench-phone"  # the smartphone credential the "smartphone" case holds up (made from the first pool card)


class BenchError(Exception):
    """A bench that cannot run; one line for the user."""


def bench_clock_start() -> datetime:
    """Yesterday 20:30 JST: inside muni-a's hours, outside muni-b's, the same whenever it is run."""
    return (datetime.now(JST) - timedelta(days=1)).replace(hour=20, minute=30, second=0, microsecond=0)


# -- server processes ----------------------------------------------------------------------------


def proc_stats(pid: int | None) -> dict:
    """CPU seconds (user+system) and memory of a process, from /proc."""
    if not pid:
        return {}
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    mem = {k: int(v) for k, v in re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", status, re.M)}
    return {
        "cpu_s": (int(stat[11]) + int(stat[12])) / TICK,
        "rss_mib": round(mem.get("VmRSS", 0) / 1024, 1),
        "peak_rss_mib": round(mem.get("VmHWM", 0) / 1024, 1),
    }


def procs_stats(pids: list[int]) -> dict:
    """`proc_stats` added up over several processes (one per operator, or per namespace), plus
    the largest single process's peak RSS: the per-relay-process memory bound is about that one."""
    out: dict = {}
    for pid in pids:
        stats = proc_stats(pid)
        for k, v in stats.items():
            out[k] = round(out.get(k, 0) + v, 2)
        out["max_process_peak_rss_mib"] = max(out.get("max_process_peak_rss_mib", 0), stats.get("peak_rss_mib", 0))
    return out


SOAK_RSS_GROWTH_PCT = 5.0  # the soak passes when no node process grows more over the last 80 %
SOAK_FD_SLACK = 2  # descriptors a node process may gain over the last 80 % and still count as flat


class ProcessSampler:
    """RSS and open descriptors of named processes, sampled on a thread every `interval` seconds
    while a soak phase runs (a thread: the bench's main thread waits on the load workers)."""

    def __init__(self, pids: dict[str, int], interval: float) -> None:
        self.pids = pids
        self.interval = interval
        self.samples: dict[str, list[tuple[float, float, int]]] = {name: [] for name in pids}  # (s, RSS MiB, fds)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-sampler", daemon=True)

    def __enter__(self) -> ProcessSampler:
        self._t0 = time.monotonic()
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()  # one last point at the very end

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        t = round(time.monotonic() - self._t0, 2)
        for name, pid in self.pids.items():
            stats = proc_stats(pid)
            try:
                fds = len(os.listdir(f"/proc/{pid}/fd"))
            except OSError:
                continue  # the process is gone; the summary says so by its missing tail
            self.samples[name].append((t, stats.get("rss_mib", 0.0), fds))

    def summary(self, result: dict, issuances: dict | None = None) -> dict:
        """Per process: RSS and descriptors at the 20 % and the 90 % mark of the run; the ledger's
        issuances left unfinished (`unfinished_issuances`); the verdict."""
        procs = {}
        for name, series in self.samples.items():
            if len(series) < 2:
                procs[name] = {"samples": len(series), "ok": False, "why": "fewer than 2 samples"}
                continue
            span = series[-1][0]
            mark = next(p for p in series if p[0] >= 0.2 * span)
            # the verdict's end is the 90 % mark: the last samples see the load winding down
            end = [p for p in series if p[0] <= 0.9 * span][-1]
            growth = (end[1] - mark[1]) / mark[1] * 100 if mark[1] else 0.0
            tail_fds = [p[2] for p in series if mark[0] <= p[0] <= end[0]]
            procs[name] = {
                "samples": len(series),
                "rss_mib_at_20pct": mark[1],
                "rss_mib_at_90pct": end[1],
                "rss_growth_pct": round(growth, 2),
                "fds_at_20pct": mark[2],
                "fds_at_90pct": end[2],
                "fds_min": min(tail_fds),
                "fds_max": max(tail_fds),
                "ok": growth < SOAK_RSS_GROWTH_PCT and end[2] - mark[2] <= SOAK_FD_SLACK,
                "series": [{"s": t, "rss_mib": r, "fds": f} for t, r, f in series],
            }
        errors = sum((result.get("errors") or {}).values())
        return {
            "rss_growth_limit_pct": SOAK_RSS_GROWTH_PCT,
            "fd_slack": SOAK_FD_SLACK,
            "interval_s": self.interval,
            "processes": procs,
            "errors": errors,
            "misdelivered": result.get("misdelivered", 0),
            "issuances": issuances,
            "ok": bool(procs)
            and all(p["ok"] for p in procs.values())
            and errors == 0
            and result.get("misdelivered", 0) == 0
            and (issuances is None or issuances["past_bound"] == 0),
        }


def unfinished_issuances(path: str) -> dict | None:
    """The ledger's issuances in each state when a soak ends, and how many of those not in a final
    state (created: streaming, sent: awaiting the notice) are past their bound, counted back from
    the ledger's latest change: the center must have ended those (cancelled or expired). Read only;
    None without a ledger file (":memory:")."""
    if not Path(path).exists():
        return None
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        states = dict(conn.execute("SELECT state, count(*) FROM issuances GROUP BY state").fetchall())
        (latest,) = conn.execute("SELECT max(changed) FROM issuances").fetchone()
        past = 0
        if latest is not None:
            now = datetime.fromisoformat(latest)
            past = conn.execute(
                "SELECT count(*) FROM issuances WHERE (state = 'created' AND changed < ?) OR (state = 'sent' AND changed < ?)",
                (
                    (now - timedelta(seconds=DELIVERY_TIMEOUT)).isoformat(),
                    (now - timedelta(seconds=NOTICE_TTL)).isoformat(),
                ),
            ).fetchone()[0]
    finally:
        conn.close()
    return {
        "states": states,
        "unfinished": sum(states.get(s, 0) for s in UNFINISHED),
        "past_bound": past,
        "bounds_s": {"created": DELIVERY_TIMEOUT, "sent": NOTICE_TTL},
    }


class NodeGroup:
    """Several NodeProcesses started and stopped together (the relays, one process per operator)."""

    def __init__(self, procs: list[NodeProcess]) -> None:
        self.procs = procs

    def start(self, timeout: float = 60.0) -> float:
        try:
            return max(p.start(timeout) for p in self.procs)
        except BaseException:
            self.stop()
            raise

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid]

    def stop(self) -> None:
        for p in self.procs:
            p.stop()


class _Running:
    """The front of a netns bench: already running for the whole bench."""

    pid = None

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


class NodeProcess:
    """Some nodes of a topology served by `run_topology` in a child process."""

    def __init__(
        self,
        topo: Topology,
        state_dir: Path,
        only: set[str],
        clock_start: datetime,
        what: str,
        reuse_port: bool = False,
    ) -> None:
        self.args = (topo, str(state_dir), only, clock_start.isoformat())
        self.reuse_port = reuse_port  # one of several workers on the same addresses (SO_REUSEPORT)
        self.what = what
        self.hops = tuple(sorted({topo.node(n).kind for n in only}))  # the node kinds it serves (cost model)
        self.module = (
            "bench.serve" if set(self.hops) <= set(RELAY_KINDS) else "bench.serve_any"
        )  # relays load no crypto
        self.proc: subprocess.Popen | None = None
        self.conn = None
        self.hung = False  # SIGSTOPped by the failover bench

    def start(self, timeout: float = 60.0) -> float:
        if self.conn is not None:  # a restart after a kill
            self.conn.close()
        parent, child = mp.Pipe()
        self.conn = parent  # kept open while the child runs: it stops when this end closes
        self.proc = subprocess.Popen(
            [sys.executable, "-m", self.module, str(child.fileno())], pass_fds=[child.fileno()]
        )
        child.close()
        parent.send((*self.args, self.reuse_port))
        if not parent.poll(timeout):
            self.stop()
            raise BenchError(f"the {self.what} did not come up within {timeout:.0f} s")
        try:
            kind, payload = parent.recv()
        except EOFError:
            self.stop()
            raise BenchError(f"the {self.what} exited at start (status {self.proc.wait()})") from None
        if kind != "ready":
            self.stop()
            raise BenchError(f"cannot start the {self.what}: {payload}")
        return payload

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def hang(self) -> None:
        """SIGSTOP, as a hung server: its sockets still accept connections, nothing answers."""
        self.proc.send_signal(signal.SIGSTOP)
        self.hung = True

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)
        self.hung = False

    def kill(self) -> int | None:
        """SIGKILL, as a crash: the exit status (-9), None if it outlived 5 s."""
        self.proc.kill()
        try:
            return self.proc.wait(5)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            if self.hung:  # a stopped process holds its SIGTERM until continued
                self.resume()
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.conn is not None:
            self.conn.close()
            self.conn = None


# -- options and setup ---------------------------------------------------------------------------


@dataclass
class BenchOptions:
    scenarios: list[str]
    topology: Topology
    state_dir: Path
    out_dir: Path
    rate: float | None = None
    concurrency: int | None = None
    duration_s: float = 10.0
    warmup_s: float | None = None
    kiosks: int = 24
    workers: int = 1
    baseline: str | None = None
    count: int | None = None
    p99_target_ms: float = 100.0
    sweep_steps: int = 8
    sweep_factor: float = 1.5
    h2load: bool = False
    progress: bool = True
    seed: int = 1
    netns: bool = False  # run the topology in netns mode (root); the kiosks' workers join their namespaces
    netns_tag: str = "bench"  # namespaces konbini-<tag>-<site>
    lines: dict[str, str] | None = (
        None  # line kind -> delay ("20ms"): repeat konbini's phase with those lines impaired (root)
    )
    cross_check: bool = False  # drive the relay scenarios again with the compiled Go client, both chains
    relay_processes: str = "operator"  # konbini's relays: one process per operator, or per (operator, hop kind)
    center_processes: str = "one"  # the center side: one process, or one per role (centers, OCSP, municipalities)
    center_workers: int = 1  # processes serving the whole center side on shared addresses (SO_REUSEPORT)
    notes: list[str] = field(default_factory=list)


def validate(opts: BenchOptions) -> None:
    unknown = [s for s in opts.scenarios if s not in SCENARIOS]
    if unknown:
        raise BenchError(f"unknown scenario {unknown[0]!r}; one of: {', '.join(SCENARIOS)}")
    if opts.rate is not None and opts.rate <= 0:
        raise BenchError(f"impossible rate {opts.rate:g}: --rate must be > 0 requests per second")
    if opts.concurrency is not None and opts.concurrency <= 0:
        raise BenchError(f"impossible concurrency {opts.concurrency}: --concurrency must be >= 1")
    if opts.duration_s <= 0:
        raise BenchError("--duration must be > 0 seconds")
    if opts.kiosks < 1 or opts.workers < 1:
        raise BenchError("--kiosks and --workers must be >= 1")
    if opts.baseline not in (None, "haproxy"):
        raise BenchError(f"unknown baseline {opts.baseline!r}; only 'haproxy' is supported")
    if opts.baseline == "haproxy" or opts.h2load:
        try:
            haproxy_binary()
        except HAProxyError as exc:
            raise BenchError(str(exc)) from None
    if opts.relay_processes not in ("operator", "hop"):
        raise BenchError(f"--relay-processes {opts.relay_processes!r}: one of operator, hop")
    if opts.center_processes not in ("one", "role"):
        raise BenchError(f"--center-processes {opts.center_processes!r}: one of one, role")
    if opts.center_processes == "role" and opts.netns:
        raise BenchError("--center-processes role is for loopback mode (netns mode runs a process per site)")
    if opts.center_workers < 1:
        raise BenchError("--center-workers must be >= 1")
    if opts.center_workers > 1 and (opts.center_processes == "role" or opts.netns):
        raise BenchError(
            "--center-workers is for loopback mode with --center-processes one (each worker serves the whole center side)"
        )
    if opts.cross_check:
        if opts.netns:
            raise BenchError("--cross-check runs in loopback mode (the compiled client has no namespace support)")
        try:
            haproxy_binary()
            crosscheck.go_binary()
        except (HAProxyError, crosscheck.CrossCheckError) as exc:
            raise BenchError(str(exc)) from None
    if opts.h2load and shutil.which("h2load") is None:
        raise BenchError("h2load is not installed (apt-get install nghttp2-client), needed for --h2load")
    if opts.lines is not None:
        if os.geteuid() != 0:
            raise BenchError("--line impairs lines per address pair on lo, which needs root")
        kinds = {line.kind for line in opts.topology.lines}
        if unknown := sorted(set(opts.lines) - kinds):
            raise BenchError(
                f"no line of kind {unknown[0]!r} in {opts.topology.source}; kinds: {', '.join(sorted(kinds))}"
            )
        if opts.netns:
            raise BenchError("--line runs in loopback mode; in netns mode set the lines with `konbini link set`")
    if any(SCENARIOS[s].failover for s in opts.scenarios) and (opts.netns or opts.baseline):
        raise BenchError("the failover scenario kills konbini's own node processes: loopback mode, no --baseline")
    if opts.netns:
        if opts.baseline or opts.h2load:
            raise BenchError("--netns runs konbini's relays only: --baseline and --h2load are loopback-only")
        try:
            require_root("`konbini bench --netns`")
            namespace_prefix(opts.netns_tag)
        except (NetnsError, PlanError) as exc:
            raise BenchError(str(exc)) from None


class Bench:
    def __init__(self, opts: BenchOptions) -> None:
        validate(opts)
        self.opts = opts
        need = opts.kiosks
        for name in opts.scenarios:  # closed-loop issuance: one customer per kiosk, so enough kiosks
            sc = SCENARIOS[name]
            if sc.workload.kind == "issuance" and opts.concurrency and opts.rate is None and opts.concurrency > need:
                need = opts.concurrency
                opts.notes.append(f"kiosks raised to {need} so that every issuance in flight has its own kiosk")
        self.topo, self.kiosk_ids = with_kiosks(opts.topology, need)
        self.clock_start = bench_clock_start()
        self.origin: NodeProcess | None = None
        self.mode = Mode.NETNS if opts.netns else Mode.LOOPBACK
        self.plan = None  # netns mode: the NetPlan once its namespaces exist
        self.hosts: list = []  # netns mode: the nodehosts
        self.failover: Targets | None = None  # the failover scenario: the servers it kills, each alone in a process
        self.isolated: dict[str, NodeProcess] = {}  # center-side servers in a process of their own (failover)
        self.roles: dict[str, NodeProcess] = {}  # --center-processes role: OCSP, municipalities, by kind
        self.workers: list[NodeProcess] = []  # --center-workers N: the center side's workers after the first
        if any(SCENARIOS[s].failover for s in opts.scenarios):
            try:
                self.failover = targets(self.topo)
            except FailoverError as exc:
                raise BenchError(str(exc)) from None

    def prepare(self) -> None:
        o = self.opts
        o.state_dir.mkdir(parents=True, exist_ok=True)
        self.pki = PKI.ensure(o.state_dir, self.topo)
        cards = CardStore(o.state_dir, self.pki, Clock(self.clock_start).now)
        self.cards = [c.card_id for c in cards.ensure_pool(len(self.kiosk_ids))]
        try:
            revoked = cards.load("bench-revoked")
        except Exception:  # noqa: BLE001 - first run: make it
            revoked = cards.new(card_id="bench-revoked")
        if revoked.serial not in cards.revocations():
            cards.revoke("bench-revoked", "key-compromise")
        phones = SmartphoneStore(cards)
        try:
            phones.current(BENCH_PHONE)  # reissued when its month is over
        except CardError:  # first run (or its card changed): make it
            phones.issue(self.cards[0], phone_id=BENCH_PHONE)
        munis = self.topo.municipalities()
        clock = Clock(self.clock_start).now()
        self.open_muni = self.closed_muni = ""
        for code, node in munis.items():
            m = node.municipality
            if not m or not m.participating or "residence-record" not in m.certificates:
                continue
            is_open = within(clock, *window(self.topo.service_hours, m.hours))
            if is_open and not self.open_muni:
                self.open_muni = code
            if not is_open and not self.closed_muni:
                self.closed_muni = code
        if self.failover is not None:  # the load goes to the municipality with two document servers
            node = munis[self.failover.municipality]
            if not within(clock, *window(self.topo.service_hours, node.municipality.hours)):
                raise BenchError(f"{self.topo.source}: municipality {node.municipality.display} is closed at 20:30 JST")
            self.open_muni = self.failover.municipality
        if not self.open_muni:
            raise BenchError(
                f"{self.topo.source}: no participating municipality open at 20:30 JST for the issuance scenarios"
            )

    def start_origin(self) -> None:
        if self.opts.netns:
            self.start_netns()
            return
        alone = self.failover.isolated if self.failover is not None else set()
        center = {n.id for n in self.topo.nodes.values() if n.kind in CENTER_KINDS and n.id not in alone}
        if self.opts.center_processes == "role":
            # the issuance centers (the ledger's one writer) in one process, OCSP and the municipalities each in another
            by_role: dict[str, set[str]] = {}
            for nid in center:
                by_role.setdefault(self.topo.node(nid).kind, set()).add(nid)
            center = by_role.pop("issuance-center", set())
            for kind, ids in sorted(by_role.items()):
                self.roles[kind] = NodeProcess(self.topo, self.opts.state_dir, ids, self.clock_start, f"{kind} servers")
                self.roles[kind].start()
        n = self.opts.center_workers
        what = "issuance center side" if self.opts.center_processes == "one" else "issuance centers"
        # --center-workers N: N processes each serving the whole center side on the same addresses
        # (SO_REUSEPORT); they share the kiosk sessions and the ledger file (gateway/business/sessions.py,
        # ledger.py), so any worker may take any request of a kiosk
        self.origin = NodeProcess(
            self.topo,
            self.opts.state_dir,
            center,
            self.clock_start,
            what if n == 1 else "center worker 1",
            reuse_port=n > 1,
        )
        self.origin.start()
        for i in range(2, n + 1):
            self.workers.append(
                NodeProcess(
                    self.topo, self.opts.state_dir, center, self.clock_start, f"center worker {i}", reuse_port=True
                )
            )
            self.workers[-1].start()
        for nid in sorted(alone & {n.id for n in self.topo.nodes.values() if n.kind in CENTER_KINDS}):
            self.isolated[nid] = NodeProcess(self.topo, self.opts.state_dir, {nid}, self.clock_start, nid)
            self.isolated[nid].start()

    def start_netns(self) -> None:
        """Namespaces and every server of the bench topology (its extra kiosks included), as `up --netns`."""
        plan = build_plan(self.topo, self.opts.netns_tag)
        netns.create_network(plan, self.opts.state_dir)  # rolls itself back on failure
        self.plan = plan
        netns.register_launcher(plan.prefix)
        self.opts.notes.extend(netns.apply_impairments(plan))
        self.hosts = netns.start_nodehosts(
            plan, self.topo.source, self.opts.state_dir, clock=self.clock_start.isoformat(), topo=self.topo
        )

    def stop(self) -> None:
        if self.origin is not None:
            self.origin.stop()
        for proc in [*self.isolated.values(), *self.roles.values(), *self.workers]:
            proc.stop()
        if self.plan is not None:  # always, also after an error or Ctrl-C
            try:
                netns.stop_nodehosts(self.hosts)
            finally:
                self.hosts = []
                netns.teardown(self.plan.prefix, self.opts.state_dir)
                self.plan = None

    def server_pids(self, front) -> tuple[list[int], list[int]]:
        """(relay pids, center-side pids) whose CPU and memory the report shows."""
        if self.plan is None:
            front_pids = front.pids if isinstance(front, NodeGroup) else [front.pid]
            origin = [
                self.origin.pid if self.origin else None,
                *(p.pid for p in self.isolated.values()),
                *(p.pid for p in self.roles.values()),
                *(p.pid for p in self.workers),
            ]
            return [p for p in front_pids if p], [p for p in origin if p]
        relay, center = [], []
        for h in self.hosts:
            kinds = {self.topo.node(n).kind for n in self.plan.sites[h.site].servers}
            (relay if kinds & set(RELAY_KINDS) else center).append(h.pid)
        return relay, center

    def cost_processes(self, front) -> list[CostProcess]:
        """The server processes of a phase, named and with the hops they serve, for the cost model."""
        if self.plan is not None:
            out = []
            for h in self.hosts:
                kinds = tuple(sorted({self.topo.node(n).kind for n in self.plan.sites[h.site].servers}))
                role = "relays" if set(kinds) & set(RELAY_KINDS) else "origin"
                out.append(CostProcess(f"nodehost {h.site}", role, h.pid, kinds))
            return out
        out = []
        if isinstance(front, NodeGroup):
            out += [CostProcess(p.what.removeprefix("konbini "), "relays", p.pid, p.hops) for p in front.procs if p.pid]
        elif isinstance(front, HAProxyProcess) and front.pid:
            kinds = tuple(sorted({n.kind for n in self.topo.nodes.values() if n.kind in RELAY_KINDS}))
            out.append(CostProcess("haproxy (every relay hop)", "baseline", front.pid, kinds, threads=True))
        if self.origin is not None and self.origin.pid:
            name = "center side" if not self.roles and not self.workers else self.origin.what
            out.append(CostProcess(name, "origin", self.origin.pid, self.origin.hops))
        out += [CostProcess(p.what, "origin", p.pid, p.hops) for p in self.workers if p.pid]
        out += [CostProcess(nid, "origin", p.pid, p.hops) for nid, p in self.isolated.items() if p.pid]
        out += [CostProcess(p.what, "origin", p.pid, p.hops) for p in self.roles.values() if p.pid]
        return out

    def haproxy_split(self, result: dict, front: HAProxyProcess, window: CostWindow) -> None:
        """HAProxy's hops in the latency split, from its logged timers over the cost window."""
        kinds = {n.id: n.kind for n in self.topo.nodes.values() if n.kind in RELAY_KINDS}
        try:
            text = front.log_path.read_text(errors="replace")
        except OSError:
            return
        timers = hop_timers(text, kinds, window.t_start, window.t_end)
        flows = result["ok"] + sum(result["refused"].values()) + sum(result["cancelled"].values())
        result["haproxy_timers"] = {k: t.as_json() for k, t in timers.items()} | {"log_sample": LOG_SAMPLE}
        if not timers or not flows or not result.get("latency_split"):
            return
        order = [k for k in RELAY_CHAIN if k in timers]
        waits = [(k, timers[k].up_ms * LOG_SAMPLE / flows) for k in order]
        # the relay chain ends at the issuance center (the bench origin answers on its address)
        result["latency_split"] = with_relay_waits(result["latency_split"], "issuance-center", waits, "haproxy")

    def impairments(self) -> Impairments:
        """Every line of the kinds in --line impaired with its delay, per address pair on lo (root)."""
        overrides = {
            line.id: Impairment(delay=self.opts.lines[line.kind])
            for line in self.topo.lines
            if line.kind in (self.opts.lines or {})
        }
        return Impairments(self.topo, Mode.LOOPBACK, state_dir=self.opts.state_dir, overrides=overrides)

    def _front(self, phase: str):
        relays = [n for n in self.topo.nodes.values() if n.kind in RELAY_KINDS]
        if self.plan is not None:
            return _Running()  # netns mode: the relays run in their nodehosts for the whole bench
        if phase == "konbini":
            # One process per operator's relay chain (SO_REUSEPORT is not needed: every relay has
            # its own address), so the relays can use both cores as HAProxy's threads do; with
            # --relay-processes hop one per operator and hop kind, so the cost model has each hop's CPU.
            groups: dict[str, set[str]] = {}
            alone = self.failover.isolated if self.failover is not None else set()
            for n in relays:
                key = n.operator or "-"
                if n.id in alone:  # the failover bench kills it: nothing else in its process
                    key = f"{key} {n.id}"
                elif self.opts.relay_processes != "operator":
                    key = f"{key} {n.kind}"
                groups.setdefault(key, set()).add(n.id)
            return NodeGroup(
                [
                    NodeProcess(
                        self.topo, self.opts.state_dir, ids, self.clock_start, f"konbini relays of operator {key}"
                    )
                    for key, ids in sorted(groups.items())
                ]
            )
        cfg = self.opts.state_dir / "haproxy" / "haproxy.cfg"
        text = config(self.topo, self.pki, self.opts.state_dir)
        cfg.parent.mkdir(parents=True, exist_ok=True)
        cfg.write_text(text)
        return HAProxyProcess(cfg, [(n.address, n.port or 0) for n in relays])

    def spec(self, sc: Scenario, rate: float | None, concurrency: int | None, duration: float) -> LoadSpec:
        o = self.opts
        kiosks = []
        for kid, card in zip(self.kiosk_ids, self.cards, strict=True):
            k = self.topo.node(kid)
            r = self.topo.node(k.upstream or "")
            if self.plan is not None:
                ns = self.plan.namespace(k.site)
                kiosks.append(
                    KioskSpec(kid, k.address_in(Mode.NETNS), r.id, r.address_in(Mode.NETNS), r.port or 0, card, ns)
                )
            else:
                kiosks.append(KioskSpec(kid, k.address, r.id, r.address, r.port or 0, card))
        hop_kinds = {n.id: n.kind for n in self.topo.nodes.values()}
        warm = o.warmup_s if o.warmup_s is not None else min(2.0, duration * 0.2)
        return LoadSpec(
            workload=sc.workload,
            state_dir=str(o.state_dir),
            kiosks=kiosks,
            ca_path=str(self.pki.network_ca_path),
            rate=rate,
            concurrency=concurrency,
            duration_s=duration,
            warmup_s=warm,
            count=o.count,
            seed=o.seed,
            open_muni=self.open_muni,
            closed_muni=self.closed_muni or self.open_muni,
            revoked_card="bench-revoked",
            smartphone=BENCH_PHONE,
            hop_kinds=hop_kinds,
            clock_start=self.clock_start.isoformat(),
            centers=tuple(sorted(n.id for n in self.topo.of_kind("issuance-center"))),
            trace=self.failover.watched if sc.failover and self.failover is not None else None,
        )

    def load_mode(self, sc: Scenario) -> tuple[float | None, int | None]:
        o = self.opts
        if o.rate is not None:
            return o.rate, None
        if o.concurrency is not None:
            return None, o.concurrency
        if sc.concurrency is not None:
            return None, sc.concurrency or len(self.kiosk_ids)
        return sc.rate, None

    def phase(self, sc: Scenario, phase: str, rate: float | None, concurrency: int | None, duration: float) -> dict:
        if phase == "lines":
            impairments = self.impairments()
            notes = impairments.start()
            try:
                result = self.phase(sc, "konbini", rate, concurrency, duration)
            finally:
                impairments.stop()
            result["phase"] = "lines"
            result["lines"] = {"in_force": {k: v for k, v in sorted((self.opts.lines or {}).items())}, "notes": notes}
            return result
        front = self._front(phase)
        front.start()
        try:
            relay_pids, origin_pids = self.server_pids(front)
            window = CostWindow(self.cost_processes(front))
            before = procs_stats(relay_pids)
            origin_before = procs_stats(origin_pids)
            t0 = time.perf_counter()
            label = f"{sc.name} [{phase}{', netns' if self.plan is not None else ''}]"
            spec = self.spec(sc, rate, concurrency, duration)

            faults = self.fault_schedule(front, spec) if sc.failover else None

            def on_go(go: float) -> None:  # the CPU window is the measured window
                window.arm(go + spec.warmup_s, go + spec.warmup_s + spec.duration_s)
                if faults is not None:
                    faults.go(go)

            try:
                if sc.soak:
                    names = {f"relays-{i}": pid for i, pid in enumerate(relay_pids)} | {
                        f"origin-{i}": pid for i, pid in enumerate(origin_pids)
                    }
                    with ProcessSampler(names, interval=max(0.2, min(5.0, duration / 60))) as sampler:
                        result = run_load(
                            spec, self.opts.workers, progress=self.opts.progress, label=label, on_go=on_go
                        )
                    result["soak"] = sampler.summary(
                        result, unfinished_issuances(ledger_path(self.topo.ledger, self.opts.state_dir))
                    )
                else:
                    result = run_load(spec, self.opts.workers, progress=self.opts.progress, label=label, on_go=on_go)
            finally:
                window.close()
                if faults is not None:
                    faults.stop()
            if faults is not None:
                result["failover"] = analyse(result.pop("trace", []), faults.events, self.failover, duration)
                result["failover"]["errors"] = faults.errors
                result["failover"]["ok"] = (
                    result["failover"]["ok"] and not faults.errors and result["misdelivered"] == 0
                )
            wall = time.perf_counter() - t0
            after = procs_stats(relay_pids)
            origin_after = procs_stats(origin_pids)
        finally:
            front.stop()
        result["phase"] = phase
        completed = result["ok"] + sum(result["refused"].values()) + sum(result["cancelled"].values())
        result["costs"] = window.model(completed)
        if isinstance(front, HAProxyProcess):
            self.haproxy_split(result, front, window)
        result["servers"] = {
            "relay_cpu_s": round(after.get("cpu_s", 0) - before.get("cpu_s", 0), 2),
            "relay_cpu_cores": round((after.get("cpu_s", 0) - before.get("cpu_s", 0)) / wall, 2) if wall else None,
            "relay_peak_rss_mib": after.get("peak_rss_mib"),
            "relay_max_process_peak_rss_mib": after.get("max_process_peak_rss_mib"),
            "relay_processes": len(relay_pids),
            "origin_cpu_s": round(origin_after.get("cpu_s", 0) - origin_before.get("cpu_s", 0), 2),
            "origin_rss_mib": origin_after.get("rss_mib"),
        }
        return result

    def fault_schedule(self, front, spec: LoadSpec) -> FaultSchedule:
        """The failover scenario's kills and restarts: each target's own process, relay or center side."""
        procs = {nid: p for p in front.procs for nid in p.args[2] if nid in self.failover.isolated} | self.isolated
        return FaultSchedule(self.failover, procs, spec.warmup_s, spec.duration_s)

    def run_scenario(self, sc: Scenario) -> dict:
        phases = (
            ["konbini"]
            + (["lines"] if self.opts.lines else [])
            + (["haproxy"] if self.opts.baseline == "haproxy" else [])
        )
        entry: dict = {"what": sc.what, "success_only": sc.success_only}
        if sc.sweep:
            for phase in phases:
                entry[phase] = self.sweep(sc, phase)
        else:
            rate, conc = self.load_mode(sc)
            for phase in phases:
                entry[phase] = self.phase(sc, phase, rate, conc, self.opts.duration_s)
                if entry[phase].get("partial"):
                    break
        if "haproxy" in entry and "konbini" in entry:
            entry["ratios"] = ratios(entry["konbini"], entry["haproxy"])
        return entry

    def sweep(self, sc: Scenario, phase: str) -> dict:
        o = self.opts
        rate = o.rate or sc.rate or 50.0
        steps = []
        best = None
        for _ in range(o.sweep_steps):
            r = self.phase(sc, phase, rate, None, o.duration_s)
            p99 = r.get("p99_ms")
            ok = (
                p99 is not None
                and p99 < o.p99_target_ms
                and not r["errors"]
                and r["misdelivered"] == 0
                and r["dropped"] <= 0.01 * max(1, r["arrivals"])
            )
            steps.append(
                {
                    k: r.get(k)
                    for k in ("rate", "throughput_rps", "p50_ms", "p99_ms", "dropped", "arrivals", "misdelivered")
                }
                | {
                    "errors": sum(r["errors"].values()),
                    "pass": ok,
                    "generator_saturated": r["generator"]["generator_saturated"],
                }
            )
            if r.get("partial"):
                break
            if not ok:
                break
            best = rate
            rate = round(rate * o.sweep_factor, 1)
        last = steps[-1] if steps else {}
        return {
            "scenario": sc.name,
            "phase": phase,
            "p99_target_ms": o.p99_target_ms,
            "best_rate": best,
            "steps": steps,
            "throughput_rps": max((s["throughput_rps"] for s in steps if s["pass"]), default=0.0),
            "p50_ms": last.get("p50_ms"),
            "p99_ms": last.get("p99_ms"),
            "misdelivered": sum(s["misdelivered"] for s in steps),
            "errors": {},
            "dropped": sum(s["dropped"] for s in steps),
            "partial": False,
        }

    # -- compiled-client cross-check ---------------------------------------------------------

    def cross_check(self, scenarios: dict) -> dict:
        """relay-small, relay-64k and relay-1m with the compiled Go client, konbini's relays then
        HAProxy's; both ratios (this client's and the generator's, where the scenario ran with
        --baseline haproxy) side by side."""
        o = self.opts
        try:
            binary = crosscheck.build(o.state_dir / "tools")
        except crosscheck.CrossCheckError as exc:
            raise BenchError(str(exc)) from None
        out: dict = {"client": "h2mtls_load (Go net/http, compiled)", "duration_s": o.duration_s, "scenarios": {}}
        for name in crosscheck.SCENARIOS:
            sc = SCENARIOS[name]
            conc = o.concurrency or sc.concurrency or len(self.kiosk_ids)
            cmd = crosscheck.command(binary, self.topo, self.pki, self.kiosk_ids, sc.workload.size, conc, o.duration_s)
            entry: dict = {"concurrency": conc, "command": " ".join(cmd[:8]) + " -pairs <one per kiosk>"}
            for phase in ("konbini", "haproxy"):
                entry[phase] = self._client_run(phase, cmd, o.duration_s)
            client = (entry["konbini"]["rps"] / entry["haproxy"]["rps"]) if entry["haproxy"].get("rps") else None
            generator = ((scenarios.get(name) or {}).get("ratios") or {}).get("throughput")
            entry["ratios"] = crosscheck.compare(generator, round(client, 3) if client is not None else None)
            out["scenarios"][name] = entry
        return out

    def _client_run(self, phase: str, cmd: list[str], duration: float) -> dict:
        front = self._front(phase)
        front.start()
        try:
            window = CostWindow(self.cost_processes(front))
            children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            window.begin()
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
            except subprocess.TimeoutExpired:
                raise BenchError(f"the compiled client did not finish within {duration + 60:.0f} s") from None
            window.finish()
            children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        finally:
            front.stop()
        if done.returncode != 0:
            raise BenchError(f"the compiled client failed (exit {done.returncode}): {done.stderr.strip()[-300:]}")
        try:
            result = crosscheck.parse(done.stdout)
        except crosscheck.CrossCheckError as exc:
            raise BenchError(str(exc)) from None
        client_cpu = (children1.ru_utime + children1.ru_stime) - (children0.ru_utime + children0.ru_stime)
        client = CostProcess("compiled client", "client", 0)
        result["costs"] = window.model(int(result.get("ok", 0)), extra=[(client, client_cpu)])
        return result

    # -- h2load cross-check ----------------------------------------------------------------

    def h2load(self, phases: list[str], duration: float) -> dict:
        """relay-small and relay-64k with h2load through a cleartext-h2 → mTLS shim (h2load has no client cert option)."""
        kid = self.kiosk_ids[0]
        port = 9080
        shim_topo = self.topo
        out: dict = {
            "note": "h2load has no client-certificate option; it drives a local HAProxy shim (cleartext h2 on the "
            f"kiosk's address, mTLS as {kid} to its store router), so figures include one extra hop",
            "runs": [],
        }
        cfg = self.opts.state_dir / "haproxy" / "h2load-shim.cfg"
        text = config(shim_topo, self.pki, self.opts.state_dir, shim=(kid, port))
        # keep only the shim frontend/backend: the relays are whichever phase runs
        shim_only = text.split("frontend h2load-shim", 1)[1]
        head = text.split("\nfrontend ", 1)[0]
        cfg.write_text(head + "\nfrontend h2load-shim" + shim_only)
        k = self.topo.node(kid)
        for phase in phases:
            front = self._front(phase)
            front.start()
            shim = HAProxyProcess(cfg, [(k.address, port)])
            try:
                shim.start()
                for size in (0, 64 * 1024):
                    url = f"http://{k.address}:{port}/bench/blob?size={size}"
                    cmd = ["h2load", "-D", str(int(duration)), "--warm-up-time", "1", "-c", "4", "-m", "16", url]
                    res = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
                    out["runs"].append(
                        {"phase": phase, "size": size, "command": " ".join(cmd), **parse_h2load(res.stdout)}
                    )
            finally:
                shim.stop()
                front.stop()
        return out


def parse_h2load(text: str) -> dict:
    out: dict = {}
    m = re.search(r"finished in [\d.]+\w*, ([\d.]+) req/s, ([\d.]+)(\w+)/s", text)
    if m:
        unit = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3}.get(m[3], 1)
        out["rps"] = float(m[1])
        out["bytes_per_s"] = float(m[2]) * unit
    m = re.search(
        r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", text
    )
    if m:
        out.update(total=int(m[1]), succeeded=int(m[4]), failed=int(m[5]), errored=int(m[6]))
    m = re.search(r"time for request:\s+([\d.]+)(\w+)\s+([\d.]+)(\w+)\s+([\d.]+)(\w+)", text)
    if m:
        scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}
        out["min_ms"] = float(m[1]) * scale.get(m[2], 1)
        out["max_ms"] = float(m[3]) * scale.get(m[4], 1)
        out["mean_ms"] = float(m[5]) * scale.get(m[6], 1)
    if not out:
        out["raw_tail"] = text[-500:]
    return out


def ratios(k: dict, h: dict) -> dict:
    """konbini ÷ HAProxy: throughput (>1: konbini faster) and latency (>1: konbini slower)."""

    def div(a, b):
        return round(a / b, 3) if a is not None and b else None

    out = {"throughput": div(k.get("throughput_rps"), h.get("throughput_rps"))}
    if "best_rate" in k:
        out["best_rate"] = div(k.get("best_rate"), h.get("best_rate"))
    else:
        out["p50"] = div(k.get("p50_ms"), h.get("p50_ms"))
        out["p99"] = div(k.get("p99_ms"), h.get("p99_ms"))
    return out


def run_bench(opts: BenchOptions) -> dict:
    """Run the scenarios, write report.json and report.html under opts.out_dir; returns the report."""
    bench = Bench(opts)
    report: dict = {
        "created": datetime.now().astimezone().isoformat(timespec="seconds"),
        "mode": bench.mode,
        "machine": {"cpus": os.cpu_count(), "platform": os.uname().sysname + " " + os.uname().release},
        "options": {
            "scenarios": opts.scenarios,
            "topology": opts.topology.source,
            "rate": opts.rate,
            "concurrency": opts.concurrency,
            "duration_s": opts.duration_s,
            "kiosks": len(bench.kiosk_ids),
            "workers": opts.workers,
            "baseline": opts.baseline,
            "p99_target_ms": opts.p99_target_ms,
            "emulated_time": bench.clock_start.isoformat(),
            "netns_tag": opts.netns_tag if opts.netns else None,
            "relay_processes": opts.relay_processes,
            "center_processes": opts.center_processes,
            "center_workers": opts.center_workers,
            "cross_check": opts.cross_check,
        },
        "notes": opts.notes,
        "scenarios": {},
        "partial": False,
    }
    try:
        bench.prepare()
        bench.start_origin()
        for name in opts.scenarios:
            report["scenarios"][name] = entry = bench.run_scenario(SCENARIOS[name])
            if any(isinstance(v, dict) and v.get("partial") for v in entry.values()):
                report["partial"] = True
                break
        if opts.cross_check and not report["partial"]:
            report["cross_check"] = bench.cross_check(report["scenarios"])
        if opts.h2load and not report["partial"]:
            report["h2load"] = bench.h2load(
                ["konbini"] + (["haproxy"] if opts.baseline else []), min(opts.duration_s, 10)
            )
    except KeyboardInterrupt:
        report["partial"] = True
    except (LoadError, HAProxyError, NetnsError, PlanError) as exc:
        raise BenchError(str(exc)) from None
    finally:
        bench.stop()
        opts.out_dir.mkdir(parents=True, exist_ok=True)
        write_reports(report, opts.out_dir)
    return report
