"""`konbini policy check`: the expected reachability matrix, probed, compared, reported.

Expected: `policy.reachability` (the same data the app check and the nftables rules compile
from). Observed, netns mode: a TCP SYN for every (source node, server node) pair from the
source's namespace (allowed => SYN-ACK, forbidden => nothing), each allowed connection across a
line once more through the sender's own stack (its output chain), allowed pairs on other ports,
over UDP and ICMP (nothing), spoofed sources from neighbouring namespaces (nothing) and
addresses outside the topology (nothing); each namespace's interfaces and routes (no route
out). App level, both modes: `topology.check.app`. Any difference makes the check fail.
Every result names the requirement IDs it is evidence for (DESIGN §2).
"""

from __future__ import annotations

import contextlib
import html
import json
import random
import select
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import trio

from gateway.business.clock import JST, Clock
from gateway.node.server import NodeStartError
from kiosk_emu.card import CardStore
from topology.check.annex import (
    NEEDS_OPEN_HOURS,
    AnnexCheck,
    NotCheckable,
    RemoteRun,
    closed_at,
    evidence_site,
    first_store,
    open_time,
    run_annex_checks,
)
from topology.check.app import CHECKS, pick, run_check
from topology.check.matrix import check_matrix
from topology.check.scrape import ScrapeError, sample, scrape_in_namespace
from topology.launch.clockfile import read_clock, running_clock
from topology.launch.loopback import run_topology
from topology.netns.plan import MONITORING_SITE, NetPlan
from topology.pki import PKI
from topology.policy.compiler import (
    admin_reachability,
    allow_violation,
    compile_admin_allowlists,
    compile_allowlists,
    reachability,
)
from topology.policy.monitoring import METRICS_PORT
from topology.policy.nft import allowed_flows
from topology.spec.kinds import KINDS, Side
from topology.spec.model import Node, Topology

PROBE_TIMEOUT = 0.5  # seconds to wait for replies after the last frame is sent
# probe.py sends a probe on "lo" as raw IP through the namespace's own stack: routing and the output
# chain decide, so to an address on another site it leaves by that line's veth, as a node's would
OWN_STACK = "lo"
OTHER_PORTS = (22, 443)  # probed on every allowed pair: only the allow-listed port may answer
OUTSIDE = ("198.19.255.254", "198.18.255.254")  # inside 198.18/15 but in no topology (SEC-SN-1)
# DESIGN §2, every security-annex ID: the rule in a few words, as the report prints it
REQUIREMENTS = {
    "SEC-EC-1": "EC center router dedicated to the service; other routers refused",
    "SEC-EC-2": "DMZ: only DMZ<->issuance center and DMZ<->store; issuance center<->store forbidden",
    "SEC-EC-3": "a DMZ relay mediates between the store network and the issuance center",
    "SEC-SN-1": "closed dedicated lines, no third-party access",
    "SEC-SN-2": "certificate data encrypted in transit (TLS 1.3, mutual authentication)",
    "SEC-SN-3": "every store connection goes through the EC center",
    "SEC-ST-2": "the store router restricts in-store traffic at protocol level",
    "SEC-ST-3/KI-6": "store staff cannot operate store-controller / kiosk programs",
    "SEC-ST-4": "in-store wireless cannot reach kiosks",
    "SEC-KI-1": "issuance requires the card's authentication (signed challenge after PIN)",
    "SEC-KI-2": "certificate data erased from the kiosk after printing, verifiably",
    "SEC-KI-4": "only maintenance staff reach the kiosk system (password, rate-limited)",
    "SEC-KI-5": "the kiosk's issuance log, without personal data",
    "SEC-KI-7": "kiosk faults notified to the store register and the maintenance center",
    "SEC-KI-8": "the store controller reports a silent kiosk within a bound",
}
OUT_OF_SCOPE = {
    "SEC-ST-1, SEC-KI-3 and the annex's other physical/organisational items": "locks, cameras, ISMS certification, franchise rules: DESIGN §2 leaves them out; no network "
    "emulation can show them, so they are audited on site, not by konbini",
}
NETNS_ONLY = ("SEC-EC-2 kernel filtering", "SEC-SN-1 no route out / spoofing", "SEC-ST-4 Wi-Fi blocked in the kernel")


@dataclass
class Probe:
    id: int
    kind: (
        str  # "tcp-pair" | "sender-stack" | "other-port" | "udp" | "icmp" | "spoof" | "outside" | "metrics-port" | ...
    )
    site: str  # the namespace it is sent from
    iface: str | None  # None: no route; sent on every veth of `site`
    src: str  # node id or "-"
    dst: str
    src_ip: str
    dst_ip: str
    proto: str
    port: int
    expect_answer: bool
    requirements: tuple[str, ...]
    rule: str | None = None
    watch: set[str] = field(default_factory=set)  # sites where a reply would show
    # set per run (`plan_probes`): a fresh source port and sequence number, so neither a stale
    # conntrack entry nor a SYN-ACK retransmitted for an earlier run can pass for an answer
    sport: int = 0
    seq: int = 0


@dataclass
class Result:
    id: int
    kind: str
    src: str
    dst: str
    proto: str
    port: int
    sent_from: str
    expected: str
    observed: str
    ok: bool
    requirements: tuple[str, ...]
    rule: str | None


def _pair_reqs(src: Node, dst: Node, allowed: bool) -> tuple[str, ...]:
    if allowed:
        return KINDS[dst.kind].evidence
    broken = allow_violation(src, dst)
    reqs = [broken[0]] if broken else []
    if KINDS[src.kind].side == Side.STORE and KINDS[dst.kind].side == Side.CENTER:
        reqs.append("SEC-SN-3")
    reqs += KINDS[dst.kind].denial_evidence
    return tuple(dict.fromkeys(reqs or ["SEC-SN-1"]))


def plan_probes(topo: Topology, plan: NetPlan) -> list[Probe]:
    probes: list[Probe] = []

    def add(**kw) -> None:
        p = Probe(id=len(probes), **kw)
        p.watch |= {p.site}
        probes.append(p)

    def site(node_id: str) -> str:
        return topo.nodes[node_id].site

    for r in reachability(topo):
        src, dst = topo.node(r.src), topo.node(r.dst)
        s_ip, d_ip = plan.address(r.src), plan.address(r.dst)
        reqs = _pair_reqs(src, dst, r.allowed)
        egress = plan.egress(src.site, d_ip)
        common = dict(site=src.site, iface=egress, src=r.src, dst=r.dst, src_ip=s_ip, dst_ip=d_ip, watch={dst.site})
        add(
            kind="tcp-pair", proto="tcp", port=r.port, expect_answer=r.allowed, requirements=reqs, rule=r.rule, **common
        )
        if not r.allowed:
            continue
        # protocol-level filtering: only the allow-listed port and protocol get through
        for port in OTHER_PORTS:
            if port != r.port:
                add(
                    kind="other-port",
                    proto="tcp",
                    port=port,
                    expect_answer=False,
                    requirements=("SEC-EC-2", *reqs),
                    **common,
                )
        add(kind="udp", proto="udp", port=r.port, expect_answer=False, requirements=("SEC-EC-2", *reqs), **common)
        add(kind="icmp", proto="icmp", port=0, expect_answer=False, requirements=("SEC-EC-2", *reqs), **common)
        # spoofing: a neighbour of the destination claims to be the allowed source
        for other in plan.sites.values():
            if other.name in (src.site, dst.site):
                continue
            for iface in other.interfaces:
                if iface.peer == r.dst or (
                    site(iface.peer) == dst.site and plan.egress(other.name, d_ip) == iface.name
                ):
                    extra = ("SEC-ST-4",) if any(topo.node(n).kind == "wifi" for n in other.nodes) else ()
                    add(
                        kind="spoof",
                        site=other.name,
                        iface=iface.name,
                        src=r.src,
                        dst=r.dst,
                        src_ip=s_ip,
                        dst_ip=d_ip,
                        proto="tcp",
                        port=r.port,
                        expect_answer=False,
                        requirements=("SEC-SN-1", *extra, *reqs),
                        watch={dst.site, src.site},
                    )
                    break
    # the metrics port: only the monitoring namespace opens it (no line's source does), and the
    # admin ports: only their consoles (packets from anywhere else are dropped before any TLS)
    for r in reachability(topo):
        if r.allowed:
            src, dst = topo.node(r.src), topo.node(r.dst)
            d_ip = plan.address(r.dst)
            add(
                kind="metrics-port",
                site=src.site,
                iface=plan.egress(src.site, d_ip),
                src=r.src,
                dst=r.dst,
                src_ip=plan.address(r.src),
                dst_ip=d_ip,
                proto="tcp",
                port=METRICS_PORT,
                expect_answer=False,
                requirements=("SEC-SN-3", "SEC-EC-2"),
                watch={dst.site},
            )
    if plan.monitoring is not None:
        for site in plan.monitoring.links:
            for node_id in plan.sites[site].servers:
                d_ip = plan.address(node_id)
                add(
                    kind="metrics-port",
                    site=MONITORING_SITE,
                    iface=plan.monitoring.links[site].mon_ifname,
                    src="monitoring",
                    dst=node_id,
                    src_ip=plan.monitoring.address,
                    dst_ip=d_ip,
                    proto="tcp",
                    port=METRICS_PORT,
                    expect_answer=True,
                    requirements=("SEC-SN-3",),
                    rule="monitoring",
                    watch={site},
                )
    for r in admin_reachability(topo):
        src, dst = topo.node(r.src), topo.node(r.dst)
        d_ip = plan.address(r.dst)
        egress = plan.egress(src.site, d_ip)
        if egress is None:
            continue  # no line carries it at all: the "tcp-pair" probes show that for the main port
        add(
            kind="admin-port",
            site=src.site,
            iface=egress,
            src=r.src,
            dst=r.dst,
            src_ip=plan.address(r.src),
            dst_ip=d_ip,
            proto="tcp",
            port=r.port,
            expect_answer=r.allowed,
            rule=r.rule,
            requirements=("SEC-ST-3/KI-6",) + (() if r.allowed else ("SEC-KI-4",) if dst.kind == "kiosk" else ()),
            watch={dst.site},
        )
    for f in allowed_flows(topo, plan):  # a node's own console (the store controller's): not a pair of nodes above
        if f.surface == "admin" and f.src == f.dst:
            add(
                kind="admin-port",
                site=f.src_site,
                iface=OWN_STACK,
                src=f.src,
                dst=f.dst,
                src_ip=f.src_ip,
                dst_ip=f.dst_ip,
                proto="tcp",
                port=f.port,
                expect_answer=True,
                rule=f.rule,
                requirements=("SEC-ST-3/KI-6",),
            )
    # in-store Wi-Fi reaches no kiosk, on any protocol (kiosks do not listen, but an unfiltered
    # kernel would still answer with a RST or an echo reply)
    for wifi in topo.of_kind("wifi"):
        for kiosk in topo.of_kind("kiosk"):
            k_ip = plan.address(kiosk.id)
            for proto, port in (("tcp", 8443), ("tcp", 22), ("udp", 53), ("icmp", 0)):
                add(
                    kind="wifi-kiosk",
                    site=wifi.site,
                    iface=plan.egress(wifi.site, k_ip),
                    src=wifi.id,
                    dst=kiosk.id,
                    src_ip=plan.address(wifi.id),
                    dst_ip=k_ip,
                    proto=proto,
                    port=port,
                    expect_answer=False,
                    requirements=("SEC-ST-4",),
                    watch={kiosk.site},
                )
    # nothing outside the topology answers, whatever interface it is tried on
    for s in plan.sites.values():
        for addr in OUTSIDE:
            if topo.by_address(addr) is None:
                add(
                    kind="outside",
                    site=s.name,
                    iface=None,
                    src=s.nodes[0],
                    dst=addr,
                    src_ip=plan.address(s.nodes[0]),
                    dst_ip=addr,
                    proto="tcp",
                    port=8443,
                    expect_answer=False,
                    requirements=("SEC-SN-1",),
                )
    # every connection the rulesets accept across a line, sent through the *sender's* own stack:
    # the frame probes above leave below the sender's output chain, so only these show that the
    # sending namespace lets its allowed connections out (an output accept rule dropped is caught)
    for f in allowed_flows(topo, plan):
        if f.src_site != f.dst_site:
            reqs = (
                KINDS[topo.node(f.dst).kind].evidence
                if f.surface == "line"
                else ("SEC-ST-3/KI-6",)
                if f.surface == "admin"
                else ("SEC-SN-3",)
            )
            add(
                kind="sender-stack",
                site=f.src_site,
                iface=OWN_STACK,
                src=f.src,
                dst=f.dst,
                src_ip=f.src_ip,
                dst_ip=f.dst_ip,
                proto="tcp",
                port=f.port,
                expect_answer=True,
                requirements=reqs,
                rule=f.rule,
                watch={f.dst_site},
            )
    return renumber(probes)


SOURCE_PORTS = (10000, 65000)


def renumber(probes: list[Probe]) -> list[Probe]:
    """A fresh source port and sequence number for every probe, before each run of them. Ports
    count up from a random base per source address: the agents match a reply by its whole
    5-tuple, and a part of 99 national stores has 87,505 probes, more than there are ports."""
    per_source = Counter(p.src_ip for p in probes)
    most = max(per_source.values(), default=0)
    if most > SOURCE_PORTS[1] - SOURCE_PORTS[0]:
        raise ValueError(
            f"{most:,} probes from one source address, more than the "
            f"{SOURCE_PORTS[1] - SOURCE_PORTS[0]:,} source ports a run gives them"
        )
    base = random.randrange(SOURCE_PORTS[0], SOURCE_PORTS[1] - most)
    seq = random.randrange(1 << 31)
    taken: Counter[str] = Counter()
    for p in probes:
        p.sport, p.seq = base + taken[p.src_ip], (seq + p.id * 7919) % (1 << 32)
        taken[p.src_ip] += 1
    return probes


def _frames(plan: NetPlan, probe: Probe) -> list[tuple[str, str]]:
    """(interface, frame hex) for one probe: built by scapy, as a sender that obeys no rules would."""
    from scapy.layers.inet import ICMP, IP, TCP, UDP
    from scapy.layers.l2 import Ether

    ifaces = _macs(plan, probe.site)
    names = [probe.iface] if probe.iface else [i.name for i in plan.sites[probe.site].interfaces]
    if probe.proto == "tcp":
        l4 = TCP(sport=probe.sport, dport=probe.port, flags="S", seq=probe.seq)
    elif probe.proto == "udp":
        l4 = UDP(sport=probe.sport, dport=probe.port) / b"konbini-probe"
    else:
        l4 = ICMP(type=8, id=probe.sport, seq=1) / b"konbini-probe"
    out = []
    for name in names:
        if name == "lo":
            ether = Ether(src="00:00:00:00:00:00", dst="00:00:00:00:00:00")
        else:
            ether = Ether(src=ifaces[name][0], dst=ifaces[name][1])
        out.append((name, bytes(ether / IP(src=probe.src_ip, dst=probe.dst_ip, ttl=64) / l4).hex()))
    return out


def _macs(plan: NetPlan, site: str) -> dict[str, tuple[str, str]]:
    """interface -> (its MAC, the far end's) for a site's namespace or the monitoring namespace."""
    if site == MONITORING_SITE and plan.monitoring is not None:
        return {link.mon_ifname: (link.mon_mac, link.site_mac) for link in plan.monitoring.links.values()}
    out = {i.name: (i.mac, i.peer_mac) for i in plan.sites[site].interfaces}
    link = plan.monitor_link(site)
    if link is not None:
        out[link.site_ifname] = (link.site_mac, link.mon_mac)
    return out


def _namespace(plan: NetPlan, site: str) -> str:
    if site == MONITORING_SITE and plan.monitoring is not None:
        return plan.monitoring.namespace
    return plan.namespace(site)


def run_probes(
    plan: NetPlan, probes: list[Probe], timeout: float = PROBE_TIMEOUT
) -> tuple[dict[int, str], dict[str, dict]]:
    """Start one `topology.check.probe` per namespace, release them together, gather what they saw."""
    with ProbeAgents(plan) as agents:
        return agents.run(probes, timeout)


class AgentError(RuntimeError):
    """A namespace's probe agent exited or stopped answering (the run, not the policy, failed)."""


class ProbeAgents:
    """One `topology.check.probe` per namespace, started on first use and kept for the next run:
    `policy mutate --netns` probes once per mutant, and a start costs more than a run."""

    def __init__(self, plan: NetPlan) -> None:
        self.plan = plan
        self.procs: dict[str, subprocess.Popen] = {}

    def __enter__(self) -> ProbeAgents:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop every agent; the next run starts them again (after a failed run, whose other agents
        are left mid-job)."""
        for proc in self.procs.values():
            with contextlib.suppress(OSError):  # an agent that died leaves a broken pipe
                proc.stdin.close()  # the agent's loop ends at end of input
        for proc in self.procs.values():
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()

    def _agent(self, site: str) -> subprocess.Popen:
        if site not in self.procs:
            self.procs[site] = subprocess.Popen(
                ["ip", "netns", "exec", _namespace(self.plan, site), sys.executable, "-m", "topology.check.probe"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        return self.procs[site]

    def _line(self, site: str, seconds: float) -> str:
        proc = self.procs[site]
        if select.select([proc.stdout], [], [], seconds)[0] and (line := proc.stdout.readline()):
            return line.strip()
        try:
            state = f"exited with status {proc.wait(1)}"
        except subprocess.TimeoutExpired:
            state = f"no answer in {seconds:.0f} s"
        proc.kill()
        err = proc.stderr.read().strip()[-300:]
        self.close()
        raise AgentError(f"probe in {_namespace(self.plan, site)} failed ({state}): {err}")

    def run(
        self, probes: list[Probe], timeout: float = PROBE_TIMEOUT, only_used: bool = False
    ) -> tuple[dict[int, str], dict[str, dict]]:
        """`only_used`: only in the namespaces these probes are sent from or watched in (a partial
        run, as `policy mutate --netns` makes; its surroundings then cover only those namespaces)."""
        plan = self.plan
        names = [*plan.sites, *([MONITORING_SITE] if plan.monitoring is not None else [])]
        if only_used:
            used = {p.site for p in probes} | {s for p in probes for s in p.watch}
            names = [s for s in names if s in used]
        jobs: dict[str, dict] = {s: {"site": s, "timeout": timeout, "send": [], "watch": []} for s in names}
        for p in probes:
            for iface, frame in _frames(plan, p):
                jobs[p.site]["send"].append({"id": p.id, "iface": iface, "frame": frame})
            for s in p.watch:
                jobs[s]["watch"].append(
                    {
                        "id": p.id,
                        "src": p.src_ip,
                        "dst": p.dst_ip,
                        "proto": p.proto,
                        "port": p.port,
                        "sport": p.sport,
                        "ack": (p.seq + 1) % (1 << 32),
                    }
                )
        for s, job in jobs.items():
            proc = self._agent(s)
            proc.stdin.write(json.dumps(job) + "\n")
            proc.stdin.flush()
        for s in jobs:  # every capture socket is open before any frame is sent
            if (line := self._line(s, 30)) != "ready":
                self.close()
                raise AgentError(f"probe in {_namespace(plan, s)} said {line[:200]!r} instead of ready")
        for s in jobs:
            self.procs[s].stdin.write("go\n")
            self.procs[s].stdin.flush()
        answered: dict[int, str] = {}
        sites: dict[str, dict] = {}
        for s in jobs:
            report = json.loads(self._line(s, 30 + timeout))
            for pid, what in report.pop("answered").items():
                answered.setdefault(int(pid), what)
            sites[s] = report
        return answered, sites


def compare(probes: list[Probe], answered: dict[int, str]) -> list[Result]:
    results = []
    for p in probes:
        seen = answered.get(p.id)
        expected = "syn-ack" if p.expect_answer else "nothing"
        ok = seen == "syn-ack" if p.expect_answer else seen is None
        results.append(
            Result(
                p.id,
                p.kind,
                p.src,
                p.dst,
                p.proto,
                p.port,
                p.site,
                expected,
                seen or "nothing",
                ok,
                p.requirements,
                p.rule,
            )
        )
    return results


def surroundings_results(plan: NetPlan, sites: dict[str, dict], start_id: int) -> list[Result]:
    """Per namespace: only lo and the topology's veths, no default route, nothing routable outside."""
    results = []
    for s, info in sorted(sites.items()):
        if s == MONITORING_SITE and plan.monitoring is not None:
            want = sorted(["lo", *(link.mon_ifname for link in plan.monitoring.links.values())])
        else:
            want = sorted(plan.interface_names(s))
        for kind, expected, observed in (
            ("interfaces", " ".join(want), " ".join(info["interfaces"])),
            ("default-route", "none", "present" if info["default_route"] else "none"),
            ("route-out", "unreachable", info["route_out"] or "unreachable"),
        ):
            results.append(
                Result(
                    start_id + len(results),
                    kind,
                    "-",
                    "-",
                    "-",
                    0,
                    s,
                    expected,
                    observed,
                    expected == observed,
                    ("SEC-SN-1",),
                    None,
                )
            )
        for err in info.get("errors", []):
            results.append(
                Result(
                    start_id + len(results),
                    "probe-error",
                    "-",
                    "-",
                    "-",
                    0,
                    s,
                    "no error",
                    err,
                    False,
                    ("SEC-SN-1",),
                    None,
                )
            )
    return results


# -- app level ------------------------------------------------------------------------------------


def app_checks_loopback(topo: Topology, state_dir: Path) -> tuple[list[dict], str | None]:
    """Launch the topology in-process (loopback) and run the app checks against it, with the
    servers' denial counters as evidence. If the addresses are taken (`konbini up` is running),
    check the running one instead, without counters."""

    async def checks(pki, running) -> list[dict]:
        out = []
        for name in CHECKS:
            server = running.servers.get(topo.of_kind(CHECKS[name][1])[0].id) if running else None
            before = server.denials[CHECKS[name][3]] if server else 0
            res = asdict(await run_check(topo, pki, "loopback", name))
            if server is not None:
                with trio.move_on_after(2):
                    while server.denials[CHECKS[name][3]] == before:
                        await trio.sleep(0.01)  # the server counts the denial as it closes, just after we see it
                res["denials_counted"] = server.denials[CHECKS[name][3]] - before
                res["refused"] = res["refused"] and res["denials_counted"] >= 1
            out.append(res)
        return out

    async def taken(start_error):
        return await checks(
            PKI.ensure(state_dir, topo), None
        ), f"topology already running ({start_error}); denial counters not read"

    return trio.run(_launched, topo, state_dir, None, lambda running: checks(running.pki, running), taken)


async def _launched(topo: Topology, state_dir: Path, clock: Clock | None, run, taken):
    """`run(running)` against the topology launched in-process (loopback); `taken(error)` instead
    when its addresses are already in use (a `konbini up` is running). Returns (results, note)."""
    try:
        async with trio.open_nursery() as nursery:
            running = await nursery.start(
                lambda task_status: run_topology(topo, state_dir, clock=clock, task_status=task_status)
            )
            out = await run(running)
            nursery.cancel_scope.cancel()
            return out, None
    except (NodeStartError, BaseExceptionGroup) as exc:
        start_error = _find(exc, NodeStartError)
        if start_error is None:
            raise
    return await taken(start_error)


def evidence_clock(topo: Topology) -> Clock:
    """Today's first open hour in Tokyo (10:00, or the next day the service opens: not Dec 29 - Jan 3),
    so that the issuances of SEC-KI-2 can go whatever the wall clock says."""
    now = datetime.now(JST)
    return Clock(open_time(topo, now) or now.replace(hour=10, minute=0, second=0, microsecond=0))


def annex_checks_live(topo: Topology, state_dir: Path) -> tuple[list[dict], str | None]:
    """Launch the topology (loopback, in-process: its admin and maintenance servers too) and run the
    annex's live checks against it (topology/check/annex.py); when `konbini up` runs it already,
    against that one, in its time (its counters are in its process, so not read here)."""
    clock = evidence_clock(topo)

    async def taken(start_error):
        now = running_clock(state_dir)
        pki = PKI.ensure(state_dir, topo)
        skip = _closed_checks(topo, now)
        annex = await run_annex_checks(
            RemoteRun(topo, state_dir, pki, CardStore(state_dir, pki, now.now), now, mode="loopback"), skip=skip
        )
        note = f"checked against the running topology ({start_error}), at its time {now.now():%Y-%m-%d %H:%M} JST"
        return annex, note

    annex, note = trio.run(_launched, topo, state_dir, clock, run_annex_checks, taken)
    if note is None:
        note = f"checked against the topology launched in-process at {clock.now():%Y-%m-%d %H:%M} JST, when the service is open"
        return annex, note
    closed = _closed_checks(topo, running_clock(state_dir))
    return annex + private_launch_checks(topo, closed, running_clock(state_dir)), note


def _closed_checks(topo: Topology, clock: Clock) -> frozenset[str]:
    """The issuing checks the running nodes would refuse now: their time is outside service hours."""
    return NEEDS_OPEN_HOURS if closed_at(topo, clock.now()) else frozenset()


def private_launch_checks(topo: Topology, requirements: frozenset[str], nodes_clock: Clock) -> list[dict]:
    """`requirements`' checks on a launch of the same file at its first open hour today, in a network
    namespace of their own with a fresh state directory (root: `unshare -n`): the running nodes'
    time is outside service hours, and an evidence run must not depend on the hour it is run at."""
    if not requirements:
        return []
    at = evidence_clock(topo).now()
    why = (
        f"on a launch of the same file at {at:%Y-%m-%d %H:%M} JST in a private network namespace: "
        f"the running nodes' time {nodes_clock.now():%Y-%m-%d %H:%M} JST is outside service hours "
        f"({closed_at(topo, nodes_clock.now())})"
    )
    with tempfile.TemporaryDirectory(prefix="konbini-evidence-") as tmp:
        cmd = [
            "unshare",
            "-n",
            "sh",
            "-c",
            'ip link set lo up && exec "$@"',
            "sh",
            sys.executable,
            "-m",
            "topology.check.annex",
            "--launch",
            "--topology",
            topo.source,
            "--state",
            tmp,
            "--clock",
            at.isoformat(),
            "--only",
            ",".join(sorted(requirements)),
        ]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
            failure = (
                None
                if done.returncode == 0 and done.stdout.strip()
                else (done.stderr.strip().splitlines() or ["no output"])[-1][:300]
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            failure = str(exc)
    if failure is not None:
        return [
            asdict(
                AnnexCheck(
                    req,
                    why,
                    "checked at an open hour",
                    f"NOT RUN: {failure} (as root it runs in a network "
                    "namespace of its own; else start the topology at an open hour: `konbini up --clock …`)",
                    False,
                )
            )
            for req in sorted(requirements)
        ]
    checks = json.loads(done.stdout.strip().splitlines()[-1])
    return [{**c, "check": f"{c['check']}, {why}"} for c in checks]


def annex_checks_netns(topo: Topology, plan: NetPlan, state_dir: Path) -> tuple[list[dict], str | None]:
    """The annex's live checks from the store's namespace against the nodehosts, with the store
    controller's `principal-not-allowed` denials read before and after through its metrics scrape
    from the monitoring namespace (the servers are other processes here). The issuing checks go to
    a private launch when the nodes' time is outside service hours (`private_launch_checks`)."""
    try:
        site = evidence_site(topo)
    except NotCheckable as exc:  # as in loopback mode: a NOT RUN note (no annex evidence fails the check)
        return [], f"annex checks not run: {exc}"
    try:
        ctl = first_store(topo)[0]
    except NotCheckable:
        ctl = None  # its admin checks say NOT RUN; no denials to count
    clock, speed = read_clock(state_dir)
    nodes_clock = Clock.parse(clock, speed)
    closed = _closed_checks(topo, nodes_clock)

    def denials() -> float | None:
        if plan.monitoring is None or ctl is None:
            return None
        try:
            text = scrape_in_namespace(
                plan.monitoring.namespace, topo.source, state_dir, ctl, plan.address(ctl), plan.monitoring.address
            )
        except ScrapeError:
            return None
        return sample(text, "konbini_denials_total", reason="principal-not-allowed")

    before = denials()
    cmd = [
        "ip",
        "netns",
        "exec",
        plan.namespace(site),
        sys.executable,
        "-m",
        "topology.check.annex",
        "--topology",
        topo.source,
        "--state",
        str(state_dir),
        "--clock-speed",
        str(speed),
        "--skip",
        ",".join(sorted(closed)),
    ]
    done = subprocess.run(
        cmd + (["--clock", clock] if clock else []), capture_output=True, text=True, timeout=120, check=False
    )
    if done.returncode != 0 or not done.stdout.strip():
        return (
            [],
            f"annex checks failed in {plan.namespace(site)}: {(done.stderr.strip().splitlines() or ['no output'])[-1][:300]}",
        )
    annex = json.loads(done.stdout.strip().splitlines()[-1])
    after = denials()
    if ctl is not None:
        refused_calls = sum(
            c["numbers"].get("calls", 0)
            for c in annex
            if c["requirement"] == "SEC-ST-3/KI-6" and "admin API as store-staff" in c["check"]
        )
        counted = None if before is None or after is None else int(after - before)
        annex.append(
            asdict(
                AnnexCheck(
                    "SEC-ST-3/KI-6",
                    f"{ctl}'s refusals of store staff, in its metrics (scraped from {plan.monitoring.namespace if plan.monitoring else '-'})",
                    f'konbini_denials_total{{reason="principal-not-allowed"}} up by at least {refused_calls}',
                    f"up by {counted}" if counted is not None else "scrape failed",
                    counted is not None and counted >= refused_calls > 0,
                    tool="Prometheus scrape as the monitoring principal (topology/check/scrape.py)",
                    numbers={"before": before, "after": after, "refused_calls": refused_calls},
                )
            )
        )
    annex += private_launch_checks(topo, closed, nodes_clock)
    return (
        annex,
        f"kiosk and store checks ran inside {plan.namespace(site)} against the running nodes, at their time {nodes_clock.now():%Y-%m-%d %H:%M} JST",
    )


def _find(exc: BaseException, kind: type) -> BaseException | None:
    """`exc` itself or the first `kind` inside an exception group (Trio nurseries wrap errors)."""
    if isinstance(exc, kind):
        return exc
    for inner in getattr(exc, "exceptions", ()):
        if (found := _find(inner, kind)) is not None:
            return found
    return None


def app_checks_netns(topo: Topology, plan: NetPlan, state_dir: Path) -> list[dict]:
    """The app checks from inside the source nodes' namespaces against the running netns topology."""
    procs = {}
    for name in CHECKS:
        src, _ = pick(topo, name)
        procs[name] = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                plan.namespace(topo.node(src).site),
                sys.executable,
                "-m",
                "topology.check.app",
                "--topology",
                topo.source,
                "--state",
                str(state_dir),
                "--mode",
                "netns",
                name,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    out = []
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=30)
        if proc.returncode != 0:
            out.append(
                {
                    "check": name,
                    "refused": False,
                    "detail": f"check failed: {stderr.strip()[-200:]}",
                    "requirements": CHECKS[name][2],
                }
            )
        else:
            out.append(json.loads(stdout))
    return out


# -- the whole check and its report -------------------------------------------------------------


def annex_note_is_failure(annex: list[dict], note: str | None) -> bool:
    """No annex evidence at all is a failure, not a pass."""
    return not annex


def check(
    topo: Topology,
    state_dir: Path,
    *,
    netns: bool,
    plan: NetPlan | None = None,
    timeout: float = PROBE_TIMEOUT,
    extra: list[dict] | None = None,
) -> dict:
    """`extra`: evidence from outside tools (testssl.sh, nmap), as annex checks are shaped."""
    t0 = time.perf_counter()
    results: list[Result] = []
    if netns:
        assert plan is not None
        probes = plan_probes(topo, plan)
        answered, sites = run_probes(plan, probes, timeout)
        results = compare(probes, answered) + surroundings_results(plan, sites, len(probes))
        app = app_checks_netns(topo, plan, state_dir)
        note = None
    else:
        app, note = app_checks_loopback(topo, state_dir)
    annex, annex_note = (
        annex_checks_netns(topo, plan, state_dir) if netns and plan else annex_checks_live(topo, state_dir)
    )
    mode = "netns" if netns else "loopback"
    matrix = check_matrix(topo, compile_allowlists(topo, mode), compile_admin_allowlists(topo, mode), mode)
    summary: dict[str, dict] = {}
    for r in results:
        for req in r.requirements:
            s = summary.setdefault(req, {"checks": 0, "failed": 0})
            s["checks"] += 1
            s["failed"] += not r.ok
    for a in app:
        for req in a["requirements"]:
            s = summary.setdefault(req, {"checks": 0, "failed": 0})
            s["checks"] += 1
            s["failed"] += not a["refused"]
    tools: dict[str, set[str]] = {}
    for r in results:
        for req in r.requirements:
            tools.setdefault(req, set()).add(
                "scapy probes (topology/check/probe.py)"
                if r.kind not in ("interfaces", "default-route", "route-out")
                else "ip link/route in each namespace"
            )
    for a in app:
        for req in a["requirements"]:
            tools.setdefault(req, set()).add("konbini app check (topology/check/app.py)")
    for c in annex:
        s = summary.setdefault(c["requirement"], {"checks": 0, "failed": 0})
        s["checks"] += 1
        s["failed"] += not c["ok"]
        tools.setdefault(c["requirement"], set()).add(c["tool"])
    for c in extra or ():
        s = summary.setdefault(c["requirement"], {"checks": 0, "failed": 0})
        s["checks"] += 1
        s["failed"] += not c["ok"]
        tools.setdefault(c["requirement"], set()).add(c["tool"])
    requirements = []
    for req, rule in REQUIREMENTS.items():
        s = summary.get(req, {"checks": 0, "failed": 0})
        status = (
            "FAIL" if s["failed"] else ("pass" if s["checks"] else ("needs --netns" if not netns else "NOT CHECKED"))
        )
        requirements.append({"id": req, "rule": rule, **s, "status": status, "tools": sorted(tools.get(req, ()))})
    failed = [r for r in results if not r.ok]
    return {
        "topology": topo.name,
        "source": topo.source,
        "mode": "netns" if netns else "loopback",
        "elapsed_s": round(time.perf_counter() - t0, 3),
        "ok": not failed
        and all(a["refused"] for a in app)
        and all(c["ok"] for c in annex)
        and all(c["ok"] for c in extra or ())
        and not annex_note_is_failure(annex, annex_note)
        and all(m.ok for m in matrix),
        "probes": len(results),
        "differences": [asdict(r) for r in failed],
        "summary": dict(sorted(summary.items())),
        "app": app,
        "app_note": note,
        "annex": annex,
        "matrix": {"pairs": len(matrix), "differences": [asdict(m) for m in matrix if not m.ok]},
        "annex_note": annex_note,
        "evidence": list(extra or ()),
        "requirements": requirements,
        "out_of_scope": OUT_OF_SCOPE,
        "needs_netns": [] if netns else list(NETNS_ONLY),
        # a compact file: where each expanded allow entry was written (file:line of its template)
        "rule_origins": dict(sorted(topo.rule_origins.items())),
        "results": [asdict(r) for r in results],
    }


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(report: dict) -> str:
    lines = [
        f"# konbini policy check: {report['topology']} ({report['mode']})",
        "",
        f"**{'PASS' if report['ok'] else 'FAIL'}** — {report['probes']} kernel-level probes, "
        f"{len(report['differences'])} differences, {len(report['app'])} app-level checks, {report['elapsed_s']} s.",
        "",
        "## Every requirement of the security annex (DESIGN §2)",
        "",
        "| requirement | rule | checks | failed | status | observed by |",
        "|---|---|---:|---:|---|---|",
        *(
            f"| {r['id']} | {r['rule']} | {r['checks']} | {r['failed']} | {r['status']} | {'; '.join(r['tools'])} |"
            for r in report.get("requirements", ())
        ),
        "",
        "Out of scope: " + "; ".join(f"{k}: {v}" for k, v in report.get("out_of_scope", {}).items()) + ".",
        "",
        f"Compiled policy against the expected matrix (allow-lists and admin surfaces, every principal): "
        f"{report['matrix']['pairs']} pairs, {len(report['matrix']['differences'])} differences.",
        "",
        "## Kiosk and store checks (live, against the running topology)",
        "",
        "| requirement | check | expected | observed | ok | tool |",
        "|---|---|---|---|---|---|",
        *(
            f"| {c['requirement']} | {_cell(c['check'])} | {_cell(c['expected'])} | {_cell(c['observed'])} | "
            f"{'yes' if c['ok'] else '**NO**'} | {c['tool']} |"
            for c in [*report.get("annex", ()), *report.get("evidence", ())]
        ),
        "",
        "## App level",
        "",
        "| check | from | to | refused | detail | requirements |",
        "|---|---|---|---|---|---|",
        *(
            f"| {a['check']} | {a.get('src', '-')} | {a.get('dst', '-')} | {'yes' if a['refused'] else '**NO**'} | {a['detail']} | {', '.join(a['requirements'])} |"
            for a in report["app"]
        ),
    ]
    if report.get("app_note"):
        lines += ["", f"Note: {report['app_note']}"]
    if report.get("annex_note"):
        lines += ["", f"Note: {report['annex_note']}"]
    if report["needs_netns"]:
        lines += ["", "## Needs `--netns` (root)", "", *(f"- {n}" for n in report["needs_netns"])]
    if report.get("rule_origins"):
        lines += [
            "",
            "## Allow entries and the template lines they came from",
            "",
            "| allow entry | written at |",
            "|---|---|",
        ]
        lines += [f"| {rule} | {origin} |" for rule, origin in report["rule_origins"].items()]
    if report["differences"]:
        lines += [
            "",
            "## Differences",
            "",
            "| kind | from site | src | dst | proto/port | expected | observed | requirements |",
            "|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {d['kind']} | {d['sent_from']} | {d['src']} | {d['dst']} | {d['proto']}/{d['port']} | {d['expected']} | {d['observed']} | {', '.join(d['requirements'])} |"
            for d in report["differences"]
        ]
    return "\n".join(lines) + "\n"


def render_html(report: dict) -> str:
    """The same report as one self-contained HTML page (no scripts, no outside resources)."""
    esc = html.escape

    def table(head: tuple[str, ...], rows: list[tuple]) -> str:
        th = "".join(f"<th>{esc(h)}</th>" for h in head)
        trs = "".join("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in row) + "</tr>" for row in rows)
        return f"<table><tr>{th}</tr>{trs}</table>"

    verdict = "PASS" if report["ok"] else "FAIL"
    parts = [
        "<!doctype html><meta charset='utf-8'>",
        f"<title>konbini policy check: {esc(report['topology'])}</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #999;padding:3px 6px;font-size:90%;vertical-align:top}"
        ".FAIL,.NO{color:#b00;font-weight:bold}</style>",
        f"<h1>konbini policy check: {esc(report['topology'])} ({esc(report['mode'])})</h1>",
        f"<p class='{verdict}'>{verdict}: {report['probes']} kernel-level probes, {len(report['differences'])} differences, "
        f"{len(report['app'])} app-level checks, {len(report.get('annex', ()))} kiosk/store checks, {report['elapsed_s']} s.</p>",
        "<h2>Every requirement of the security annex (DESIGN §2)</h2>",
        table(
            ("requirement", "rule", "checks", "failed", "status", "observed by"),
            [
                (r["id"], r["rule"], r["checks"], r["failed"], r["status"], "; ".join(r["tools"]))
                for r in report.get("requirements", ())
            ],
        ),
        "<h3>Out of scope</h3><ul>"
        + "".join(f"<li><b>{esc(k)}</b>: {esc(v)}</li>" for k, v in report.get("out_of_scope", {}).items())
        + "</ul>",
        "<h2>Kiosk and store checks</h2>",
        table(
            ("requirement", "check", "expected", "observed", "ok", "tool"),
            [
                (c["requirement"], c["check"], c["expected"], c["observed"], "yes" if c["ok"] else "NO", c["tool"])
                for c in [*report.get("annex", ()), *report.get("evidence", ())]
            ],
        ),
        "<h2>App level</h2>",
        table(
            ("check", "from", "to", "refused", "detail", "requirements"),
            [
                (
                    a["check"],
                    a.get("src", "-"),
                    a.get("dst", "-"),
                    "yes" if a["refused"] else "NO",
                    a["detail"],
                    ", ".join(a["requirements"]),
                )
                for a in report["app"]
            ],
        ),
    ]
    if report.get("rule_origins"):
        parts += [
            "<h2>Allow entries and the template lines they came from</h2>",
            table(("allow entry", "written at"), list(report["rule_origins"].items())),
        ]
    if report["differences"]:
        parts += [
            "<h2>Differences</h2>",
            table(
                ("kind", "from site", "src", "dst", "proto/port", "expected", "observed"),
                [
                    (
                        d["kind"],
                        d["sent_from"],
                        d["src"],
                        d["dst"],
                        f"{d['proto']}/{d['port']}",
                        d["expected"],
                        d["observed"],
                    )
                    for d in report["differences"]
                ],
            ),
        ]
    return "\n".join(parts) + "\n"


def write_report(report: dict, directory: Path) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    md, js = directory / "report.md", directory / "report.json"
    md.write_text(render_markdown(report))
    (directory / "report.html").write_text(render_html(report))
    js.write_text(json.dumps(report, indent=1))
    return md, js
