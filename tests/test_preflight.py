"""The pre-flight check: the limits a topology will hit, counted from the file and compared with
what this process and kernel grant, before `konbini up` starts anything."""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import msgspec

from topology.launch import preflight
from topology.policy.monitoring import METRICS_PORT
from topology.spec.load import load_topology
from topology.spec.model import UpstreamConnections

NATIONAL = Path(__file__).resolve().parent.parent / "topology" / "national.yaml"


def _listening() -> set[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN in this network namespace (/proc/net/tcp)."""
    out = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        if state == "0A":
            ip_hex, port_hex = local.split(":")
            ip = ".".join(str(int(ip_hex[i : i + 2], 16)) for i in (6, 4, 2, 0))
            out.add((ip, int(port_hex, 16)))
    return out


async def test_the_listener_count_is_what_a_running_topology_opens(net, topo):
    addresses = {node.address for node in topo.nodes.values()}
    opened = {(ip, port) for ip, port in _listening() if ip in addresses}  # this topology's, not the machine's
    expected = set()
    for node in topo.nodes.values():
        if node.is_server:
            expected |= {(node.address, node.port), (node.address, METRICS_PORT)}
        if node.admin_port is not None:  # a kiosk's maintenance endpoint too
            expected.add((node.address, node.admin_port))
    assert opened == expected
    assert preflight.listeners(topo) == len(opened)


def test_the_default_topology_fits_this_machine(topo):
    needs, _ = preflight.check(topo, raise_soft=False)
    assert preflight.refusals(needs) == [], [n.line() for n in needs]
    assert {n.limit.split(" (")[0] for n in needs} >= {"open files", "memory"}


def test_the_national_file_names_open_files_and_the_ports_behind_its_largest_operator(monkeypatch):
    national = load_topology(NATIONAL)
    monkeypatch.setattr(resource, "getrlimit", lambda _: (20_000, 20_000))
    needs, notes = preflight.check(national, raise_soft=False)
    by = {n.limit.split(" (")[0]: n for n in needs}
    files = by["open files"]
    assert not files.ok and files.needed > 220_000 and "ulimit -n" in files.line()
    ports = next(n for n in needs if n.limit.startswith("ephemeral ports"))
    # the EC routers pool their upstreams (their default): a handful of connections per next hop
    assert ports.ok and ports.needed == UpstreamConnections().connections
    assert not ports.blocking  # a peak figure: reported, never a reason to refuse `up`
    assert files in preflight.refusals(needs) and ports not in preflight.refusals(needs)
    assert notes == []
    # paired, operator a's 21,000 stores with 1-2 kiosks each pair every kiosk's connection at ec-router-a
    paired = UpstreamConnections(mode="paired")
    national = msgspec.structs.replace(national, upstream_connections={"ec-router": paired, "dmz-relay": paired})
    needs, _ = preflight.check(national, raise_soft=False)
    ports = next(n for n in needs if n.limit.startswith("ephemeral ports"))
    assert "ec-router-a" in ports.limit and 21_000 < ports.needed < 42_000 and not ports.ok


def test_up_spreads_a_large_file_over_the_processes_it_needs_by_default(monkeypatch, topo):
    """`konbini up national.yaml` with no --processes: enough processes that each one's share of
    listeners fits the hard open-files limit, at least one a core; a small file stays in one."""
    national = load_topology(NATIONAL)
    monkeypatch.setattr(resource, "getrlimit", lambda _: (1024, 20_000))
    monkeypatch.setattr(preflight.os, "cpu_count", lambda: 2)
    n = preflight.processes_for(national)
    assert n == 20  # 359,750 listeners over 20,000 - 512 x 2 - 256 descriptors each
    needs, _ = preflight.check(national, processes=n, raise_soft=False)
    assert next(x for x in needs if x.limit.startswith("open files")).needed <= 20_000
    monkeypatch.setattr(preflight.os, "cpu_count", lambda: 64)
    assert preflight.processes_for(national) == 64  # a core each when the limit asks for fewer
    assert preflight.processes_for(topo) == 1


def _default_need(topo) -> int:
    """Descriptors `up` needs for the default topology: 60 listeners + 512 connections x 2 + 256."""
    return preflight.listeners(topo) + preflight.CONNECTION_FDS * 512 + preflight.FD_RESERVE


def test_up_refuses_and_says_which_limit_when_it_cannot_raise_it(tmp_path, topo):
    # a process that may not raise its hard limit (as a non-root user): `up` stops before starting
    script = (
        "import os, resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))\n"
        "os.geteuid = lambda: 1000\n"
        "from topology.cli.main import main\n"
        f"sys.exit(main(['up', '--state', {str(tmp_path / 's')!r}]))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    need = _default_need(topo)
    assert need == 1340
    assert "open files" in done.stdout and f"needs {need:,}" in done.stdout and f"ulimit -n {need}" in done.stdout
    assert "pre-flight: 1 limit(s) too low" in done.stderr
    assert not (tmp_path / "s").exists()  # refused before anything was made


def test_a_soft_limit_below_the_need_is_raised_for_the_run(tmp_path, topo):
    script = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (64, 4096))\n"
        "from topology.launch import preflight\n"
        "from topology.spec.load import DEFAULT_TOPOLOGY, load_topology\n"
        "needs, notes = preflight.check(load_topology(DEFAULT_TOPOLOGY))\n"
        "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0], notes)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    need = _default_need(topo)
    assert done.stdout.startswith(f"{need} ") and f"raised from 64 to {need:,}" in done.stdout
