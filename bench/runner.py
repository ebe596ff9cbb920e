"""Run benchmark scenarios: servers in their own processes, the load generator in others.

Process layout (so nothing shares an event loop with the generator):
- the *origin* process runs the center side (issuance center, OCSP, municipalities) for the
  whole run, at a fixed emulated time (20:30 JST: muni-a open, muni-b closed);
- the *front* process is either konbini's relays (store routers, EC routers, DMZ relays) or
  HAProxy on the same addresses; each phase starts a fresh one and records its CPU and memory;
- the load generator's worker processes (`kiosk_emu.load.run.run_load`).
Phases run back to back per scenario: konbini, then (with --baseline haproxy) HAProxy.

With `--netns` (root) the whole topology instead runs in netns mode for the whole run (namespaces
`konbini-<tag>-<site>`, one nodehost per namespace, as `konbini up --netns`), every load worker
enters its kiosks' namespace before opening a socket, and everything is torn down at the end.
"""

from __future__ import annotations

import logging
import os
import time
from datetime import datetime

from bench import crosscheck
from bench.baselines.haproxy import HAProxyError, HAProxyProcess, config, with_haproxy_waits
from bench.costs import CostProcess, CostWindow
from bench.failover import FailoverError, FaultSchedule, Targets, analyse, targets
from bench.h2load import run_h2load
from bench.options import BENCH_PHONE, BenchError, BenchOptions, bench_clock_start, validate
from bench.processes import NodeGroup, NodeProcess, RunningFront, procs_stats
from bench.report import write_reports
from bench.results import as_report, ratios
from bench.scenarios import SCENARIOS, Scenario
from bench.soak import ProcessSampler, unfinished_issuances
from bench.sweep import sweep
from bench.topology import with_kiosks
from gateway.business.clock import Clock
from gateway.business.ledger import ledger_path
from gateway.business.rules import window, within
from kiosk_emu.card import CardError, CardStore
from kiosk_emu.load.run import LoadError, run_load
from kiosk_emu.load.spec import KioskSpec, LoadSpec
from kiosk_emu.smartphone import SmartphoneStore
from topology.launch import netns
from topology.launch.impair import Impairments
from topology.launch.netns import NetnsError
from topology.netns.plan import PlanError, build_plan
from topology.pki import PKI
from topology.spec.model import CENTER_KINDS, RELAY_KINDS, Impairment, Mode

log = logging.getLogger("konbini.bench")


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
        with_haproxy_waits(result, text, kinds, window.t_start, window.t_end)

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
            return RunningFront()  # netns mode: the relays run in their nodehosts for the whole bench
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
            return self.lines_phase(sc, rate, concurrency, duration)
        front = self._front(phase)
        front.start()
        try:
            relay_pids, origin_pids = self.server_pids(front)
            window = CostWindow(self.cost_processes(front))
            before = procs_stats(relay_pids)
            origin_before = procs_stats(origin_pids)
            t0 = time.perf_counter()
            result = self.measure(sc, phase, front, window, self.spec(sc, rate, concurrency, duration))
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

    def lines_phase(self, sc: Scenario, rate: float | None, concurrency: int | None, duration: float) -> dict:
        """konbini's phase again with the lines of the kinds in --line impaired."""
        impairments = self.impairments()
        notes = impairments.start()
        try:
            result = self.phase(sc, "konbini", rate, concurrency, duration)
        finally:
            impairments.stop()
        result["phase"] = "lines"
        result["lines"] = {"in_force": {k: v for k, v in sorted((self.opts.lines or {}).items())}, "notes": notes}
        return result

    def measure(self, sc: Scenario, phase: str, front, window: CostWindow, spec: LoadSpec) -> dict:
        """The load against a started front, its CPU window armed at the measured window; the soak's
        samples and the failover's faults alongside when the scenario asks for them."""
        label = f"{sc.name} [{phase}{', netns' if self.plan is not None else ''}]"
        faults = self.fault_schedule(front, spec) if sc.failover else None

        def on_go(go: float) -> None:  # the CPU window is the measured window
            window.arm(go + spec.warmup_s, go + spec.warmup_s + spec.duration_s)
            if faults is not None:
                faults.go(go)

        def load() -> dict:
            return run_load(spec, self.opts.workers, progress=self.opts.progress, label=label, on_go=on_go)

        try:
            if sc.soak:
                relay_pids, origin_pids = self.server_pids(front)
                names = {f"relays-{i}": pid for i, pid in enumerate(relay_pids)} | {
                    f"origin-{i}": pid for i, pid in enumerate(origin_pids)
                }
                with ProcessSampler(names, interval=max(0.2, min(5.0, spec.duration_s / 60))) as sampler:
                    result = load()
                result["soak"] = sampler.summary(
                    result, unfinished_issuances(ledger_path(self.topo.ledger, self.opts.state_dir))
                )
            else:
                result = load()
        finally:
            window.close()
            if faults is not None:
                faults.stop()
        if faults is not None:
            result["failover"] = analyse(result.pop("trace", []), faults.events, self.failover, spec.duration_s)
            result["failover"]["errors"] = faults.errors
            result["failover"]["ok"] = result["failover"]["ok"] and not faults.errors and result["misdelivered"] == 0
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
        return sweep(
            sc.name, phase, sc.rate, self.opts, lambda rate: self.phase(sc, phase, rate, None, self.opts.duration_s)
        )

    def cross_check(self, scenarios: dict) -> dict:
        """relay-small, relay-64k and relay-1m with the compiled Go client, konbini's relays then
        HAProxy's; both ratios (this client's and the generator's, where the scenario ran with
        --baseline haproxy) side by side."""
        o = self.opts
        binary = crosscheck.build(o.state_dir / "tools")
        out: dict = {"client": "h2mtls_load (Go net/http, compiled)", "duration_s": o.duration_s, "scenarios": {}}
        for name in crosscheck.SCENARIOS:
            sc = SCENARIOS[name]
            conc = o.concurrency or sc.concurrency or len(self.kiosk_ids)
            cmd = crosscheck.command(binary, self.topo, self.pki, self.kiosk_ids, sc.workload.size, conc, o.duration_s)
            entry: dict = {"concurrency": conc, "command": " ".join(cmd[:8]) + " -pairs <one per kiosk>"}
            for phase in ("konbini", "haproxy"):
                entry[phase] = crosscheck.run(cmd, o.duration_s, self._front, self.cost_processes, phase)
            client = (entry["konbini"]["rps"] / entry["haproxy"]["rps"]) if entry["haproxy"].get("rps") else None
            generator = ((scenarios.get(name) or {}).get("ratios") or {}).get("throughput")
            entry["ratios"] = crosscheck.compare(generator, round(client, 3) if client is not None else None)
            out["scenarios"][name] = entry
        return out

    def h2load(self, phases: list[str], duration: float) -> dict:
        """relay-small and relay-64k with h2load through a cleartext-h2 → mTLS shim."""
        return run_h2load(self.topo, self.pki, self.opts.state_dir, self.kiosk_ids[0], self._front, phases, duration)


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
    except (LoadError, HAProxyError, NetnsError, PlanError, crosscheck.CrossCheckError) as exc:
        raise BenchError(str(exc)) from None
    finally:
        bench.stop()
        opts.out_dir.mkdir(parents=True, exist_ok=True)
        write_reports(as_report(report), opts.out_dir)
    return report
