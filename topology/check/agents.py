"""Running the policy probes: one `topology.check.probe` agent per namespace, released together,
each reporting the replies it saw and its namespace's surroundings (interfaces, routes).
"""

from __future__ import annotations

import contextlib
import json
import select
import subprocess
import sys

from topology.check.probes import PROBE_TIMEOUT, Probe
from topology.netns.plan import MONITORING_SITE, NetPlan


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


def namespace_of(plan: NetPlan, site: str) -> str:
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
                ["ip", "netns", "exec", namespace_of(self.plan, site), sys.executable, "-m", "topology.check.probe"],
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
        raise AgentError(f"probe in {namespace_of(self.plan, site)} failed ({state}): {err}")

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
                raise AgentError(f"probe in {namespace_of(plan, s)} said {line[:200]!r} instead of ready")
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
