"""Netns mode on the machine: build a `NetPlan` with ip/nft/tc, run the node servers inside it,
and take it all down again. Root only.

Safety rules: every namespace we create is named `konbini-…` and only those are ever deleted;
nothing is linked to the machine's own interfaces; a failed `up` deletes what it created.
Node servers run as one `topology.launch.nodehost` child per namespace, controlled only through its
pipes (it prints "ready", it exits on stdin EOF) and a pid file, never through a network.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import json
import os
import selectors
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

from topology.launch import impair, nodehost
from topology.launch.clockfile import write_clock
from topology.launch.servers import before_fork
from topology.netns.enter import enter_namespace, in_namespace_argv
from topology.netns.impair import ImpairError
from topology.netns.plan import MONITORING_SITE, NS_PREFIX, NetPlan
from topology.pki import PKI
from topology.policy.nft import compile_rulesets
from topology.spec.load import TopologyError, load_topology
from topology.spec.model import Mode, Topology

ROOT_COMMANDS = "`konbini up --netns`, `konbini down`, `konbini policy check --netns`, `konbini link set` and `konbini issue --netns`"
READY_TIMEOUT = 30.0

_SYSCTLS = (
    "net.ipv4.ip_forward=0",  # no namespace routes for another: every hop is an application relay
    "net.ipv4.conf.all.rp_filter=0",  # anti-spoofing is nftables' job, visible in the ruleset
    "net.ipv6.conf.all.disable_ipv6=1",  # the emulated network is IPv4 only
    "net.ipv6.conf.default.disable_ipv6=1",
)


class NetnsError(Exception):
    """One line for the user."""


RUN_DIR = Path("/run/konbini")  # prefix -> launcher pid, so a bare `down` spares live tagged (test) runs


def register_launcher(prefix: str) -> None:
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    (RUN_DIR / f"{prefix.rstrip('-')}.pid").write_text(f"{os.getpid()}\n")


def _live_tagged_prefixes() -> set[str]:
    live = set()
    for f in RUN_DIR.glob("*.pid") if RUN_DIR.exists() else ():
        prefix = f.stem + "-"
        try:
            pid = int(f.read_text().strip())
            os.kill(pid, 0)
        except (OSError, ValueError):
            f.unlink(missing_ok=True)
            continue
        if prefix != NS_PREFIX and not _zombie(pid):
            live.add(prefix)
    return live


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise NetnsError(f"{what} needs root (so do {ROOT_COMMANDS}); run it with sudo")


def _run(cmd: list[str], stdin: str | None = None) -> str:
    try:
        done = subprocess.run(cmd, input=stdin, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise NetnsError(f"{cmd[0]} not found; netns mode needs iproute2 and nftables") from None
    if done.returncode != 0:
        first = (done.stderr.strip() or done.stdout.strip() or f"exit {done.returncode}").splitlines()[0]
        raise NetnsError(f"{' '.join(cmd[:4])}…: {first}")
    return done.stdout


def list_namespaces(prefix: str = NS_PREFIX) -> list[str]:
    out = _run(["ip", "netns", "list"])
    return sorted(line.split()[0] for line in out.splitlines() if line.split() and line.split()[0].startswith(prefix))


def net_dir(state_dir: Path) -> Path:
    return Path(state_dir) / "net"


def _site_script(plan: NetPlan, site: str, files: Path, ruleset: str) -> str:
    """Shell run inside one namespace: sysctls, then the ruleset, then links, addresses, routes."""
    info = plan.sites[site]
    batch = ["link set lo up"]
    batch += [f"addr add {a}/32 dev lo" for a in plan.local_addresses(site)]
    batch += [f"link set {i.name} up" for i in info.interfaces]
    batch += [f"route add {a}/32 dev {ifname}" for a, ifname in plan.routes(site)]
    link = plan.monitor_link(site)
    if link is not None and plan.monitoring is not None:
        batch += [f"link set {link.site_ifname} up", f"route add {plan.monitoring.address}/32 dev {link.site_ifname}"]
    return _script(files, site, batch, ruleset)


def _monitoring_script(plan: NetPlan, files: Path, ruleset: str) -> str:
    """The monitoring namespace: its one address, a veth per site with servers, a route to each server."""
    mon = plan.monitoring
    assert mon is not None
    batch = ["link set lo up", f"addr add {mon.address}/32 dev lo"]
    batch += [f"link set {link.mon_ifname} up" for link in mon.links.values()]
    batch += [f"route add {a}/32 dev {ifname}" for a, ifname in plan.monitoring_routes()]
    return _script(files, MONITORING_SITE, batch, ruleset)


def _script(files: Path, name: str, batch: list[str], ruleset: str) -> str:
    (files / f"{name}.ip").write_text("\n".join(batch) + "\n")
    (files / f"{name}.nft").write_text(ruleset)
    lines = [f"sysctl -q -w {' '.join(_SYSCTLS)}", f"nft -f {files / f'{name}.nft'}", f"ip -b {files / f'{name}.ip'}"]
    return " && ".join(lines)


def all_namespaces(plan: NetPlan) -> list[str]:
    """Every namespace netns mode makes for `plan`: one per site, then the monitoring one."""
    return [s.namespace for s in plan.sites.values()] + ([plan.monitoring.namespace] if plan.monitoring else [])


def apply_impairments(plan: NetPlan, state_dir: Path | None = None) -> list[str]:
    """Every line's `impair:` in the namespaces (topology.launch.impair: NFQUEUE daemon, numgen,
    tbf; netem where the kernel has it), the daemon supervised until `teardown`. Returns notes:
    what carries the impairments, or why they are not applied (that must not stop the topology)."""
    try:
        return impair.Impairments(plan.topo, Mode.NETNS, plan, state_dir).start()
    except (impair.LineError, ImpairError) as exc:
        return [f"line impairments not applied: {exc}"]


def create_network(plan: NetPlan, state_dir: Path, sites: list[str] | None = None) -> float:
    """Namespaces, veths, rulesets, addresses, routes; rolled back on any failure. Returns seconds.
    Line impairments come after, from `apply_impairments`. `sites`: the patterns `plan` is the part
    of its file for (`up --netns --sites`, whose file is `plan.topo.source`), recorded for `running_part`."""
    require_root("building namespaces")
    t0 = time.perf_counter()
    wanted = all_namespaces(plan)
    clash = sorted(set(wanted) & set(list_namespaces(plan.prefix)))
    if clash:
        raise NetnsError(f"namespace {clash[0]} already exists ({len(clash)} of ours do); run `konbini down` first")
    files = net_dir(state_dir)
    files.mkdir(parents=True, exist_ok=True)
    created: list[str] = []
    try:
        for ns in wanted:
            _run(["ip", "netns", "add", ns])
            created.append(ns)
        veths = [
            f"link add {v.name} netns {plan.namespace(v.site_a)} address {v.mac_a} type veth "
            f"peer name {v.name} netns {plan.namespace(v.site_b)} address {v.mac_b}"
            for v in plan.veths
        ]
        if plan.monitoring is not None:
            veths += [
                f"link add {link.site_ifname} netns {plan.namespace(site)} address {link.site_mac} type veth "
                f"peer name {link.mon_ifname} netns {plan.monitoring.namespace} address {link.mon_mac}"
                for site, link in plan.monitoring.links.items()
            ]
        if veths:
            _run(["ip", "-b", "-"], "\n".join(veths) + "\n")
        rulesets = compile_rulesets(plan.topo, plan)
        procs = {
            site: subprocess.Popen(
                [
                    *in_namespace_argv(plan.namespace(site)),
                    "sh",
                    "-ec",
                    _site_script(plan, site, files, rulesets[site]),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for site in plan.sites
        }
        if plan.monitoring is not None:
            procs[MONITORING_SITE] = subprocess.Popen(
                [
                    *in_namespace_argv(plan.monitoring.namespace),
                    "sh",
                    "-ec",
                    _monitoring_script(plan, files, rulesets[MONITORING_SITE]),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        failed = []
        for site, proc in procs.items():
            _, err = proc.communicate()
            if proc.returncode != 0:
                failed.append(f"{site}: {(err.strip().splitlines() or ['exit ' + str(proc.returncode)])[-1]}")
        if failed:
            raise NetnsError(f"cannot configure namespace {plan.prefix}{failed[0]}")
    except BaseException:
        _delete_namespaces(created)
        raise
    (files / "up.json").write_text(
        json.dumps({"prefix": plan.prefix, "topology": plan.topo.source, "namespaces": wanted, "sites": sites})
    )
    return time.perf_counter() - t0


def running_part(topo: Topology, state_dir: Path) -> Topology:
    """The topology the netns run of this state directory serves: `topo`, or the part of it that
    `up --netns --sites` wrote out (net/up.json names its file), so that `policy check --netns`
    and `issue --netns` see the nodes and addresses that run and no others."""
    try:
        data = json.loads((net_dir(state_dir) / "up.json").read_text())
    except (OSError, ValueError):
        return topo
    if not data.get("sites"):
        return topo
    try:
        return load_topology(data["topology"])
    except (OSError, TopologyError) as exc:
        raise NetnsError(f"the running part ({data['topology']}) cannot be read: {exc}") from None


_libc = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG, _PR_SET_NAME = 1, 15
NODEHOST_COMM = b"konbini-node"  # the process name `konbini down` checks before killing a pid file's pid


class Nodehost:
    """A forked child serving one namespace's nodes; `close()` ends it through its stdin pipe.
    `job` is what it was forked for, `again(siblings)` forks it anew (topology/launch/supervisor.py)."""

    def __init__(self, site: str, pid: int, ready_fd: int, stdin_fd: int) -> None:
        self.site, self.pid, self.ready_fd, self.stdin_fd = site, pid, ready_fd, stdin_fd
        self.returncode: int | None = None
        self.job: tuple[str, str | None, list[str]] = (site, None, [])
        self.again = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def close(self) -> None:
        for fd in (self.ready_fd, self.stdin_fd):
            try:
                os.close(fd)
            except OSError:
                pass
        self.ready_fd = self.stdin_fd = -1  # once: the numbers may be another pipe's by the next call


def _fork_nodehost(
    site,
    namespace: str | None,
    argv: list[str],
    log_path: Path,
    siblings: list[Nodehost],
    topo=None,
    pki=None,
    namespaces=None,
    append: bool = False,
) -> Nodehost:
    """fork + setns rather than `ip netns exec python -m topology.launch.nodehost`: the child inherits
        the already imported modules (nodehost among them), which cuts a 20-namespace start from seconds
    to well under one."""
    ready_r, ready_w = os.pipe()
    stdin_r, stdin_w = os.pipe()
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC), 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # child: never returns
        rc = 1
        try:
            os.close(ready_r)
            os.close(stdin_w)
            for other in siblings:  # else a sibling's stdin would never see EOF while we live
                other.close()
            os.dup2(stdin_r, 0)
            os.dup2(ready_w, 1)
            os.dup2(log_fd, 2)
            _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
            _libc.prctl(_PR_SET_NAME, ctypes.c_char_p(NODEHOST_COMM))
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the launcher's; it closes our stdin
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            if namespace is not None:  # None: loopback mode, several processes (topology/launch/spread.py)
                enter_namespace(namespace)
            rc = nodehost.main(argv, topo=topo, pki=pki, namespaces=namespaces)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc)
    os.close(ready_w)
    os.close(stdin_r)
    os.close(log_fd)
    return Nodehost(site, pid, ready_r, stdin_w)


def hosted_nodes(plan: NetPlan, site: str) -> list[str]:
    """What a site's nodehost serves: its server nodes, and the nodes (kiosks) with only an admin
    surface, whose maintenance endpoint `run_topology` starts for them."""
    nodes = plan.sites[site].nodes
    return [n for n in nodes if n in plan.sites[site].servers or plan.topo.nodes[n].admin_port is not None]


GROUP_ABOVE = 64  # namespaces with servers; more share node processes (`processes_for`)


def processes_for(namespaces: int, asked: int | None = None) -> int:
    """How many node processes serve `namespaces` namespaces: `asked` (`up --netns --processes`),
    else one each up to GROUP_ABOVE, else two a core: a process per namespace costs too much
    memory for a large part (docs/national.md)."""
    if asked is not None:
        return max(1, min(asked, namespaces))
    return namespaces if namespaces <= GROUP_ABOVE else min(namespaces, 2 * (os.cpu_count() or 1))


def start_nodehosts(
    plan: NetPlan,
    topo_file: str,
    state_dir: Path,
    clock: str | None = None,
    clock_speed: float = 1.0,
    topo=None,
    pki: PKI | None = None,
    processes: int | None = None,
) -> list[Nodehost]:
    """Nodehosts for the namespaces with servers, one each or (`processes_for`) several namespaces
    to a process, whose every socket is then made in its node's namespace (`in_namespace`); returns
    once every one said "ready".
    `topo`: serve this in-memory topology (e.g. the bench's, with extra kiosks), else `plan.topo`.
    The children inherit it and its PKI, made once here: a child that loaded them itself took a
    second or more each (docs/performance.md). Each compiles the
    allow-lists of its own nodes.
    `pki`: the caller's, already ensured for `topo`."""
    topo = topo if topo is not None else plan.topo
    pki = pki if pki is not None else PKI.ensure(Path(state_dir).resolve(), topo)
    pid_dir = net_dir(state_dir) / "pids"
    pid_dir.mkdir(parents=True, exist_ok=True)
    write_clock(state_dir, clock, clock_speed)
    jobs = [
        (site.name, site.namespace, hosted) for site in plan.sites.values() if (hosted := hosted_nodes(plan, site.name))
    ]
    count = processes_for(len(jobs), processes)
    namespaces = None
    if count < len(jobs):  # consecutive sites together: a store's neighbours, an operator's stores
        namespaces = {site.name: site.namespace for site in plan.sites.values()}
        groups = [jobs[i * len(jobs) // count : (i + 1) * len(jobs) // count] for i in range(count)]
        jobs = [(f"group-{i}", group[0][1], [n for _, _, ids in group for n in ids]) for i, group in enumerate(groups)]

    def started(host: Nodehost, namespace: str | None) -> None:
        (pid_dir / f"{namespace}.pid").write_text(f"{host.pid}\n")

    return fork_nodehosts(
        jobs,
        Mode.NETNS,
        topo_file,
        state_dir,
        net_dir(state_dir) / "logs",
        READY_TIMEOUT,
        clock,
        clock_speed,
        topo,
        pki,
        started=started,
        namespaces=namespaces,
    )


def fork_nodehosts(
    jobs,
    mode: Mode,
    topo_file: str,
    state_dir: Path,
    log_dir: Path,
    timeout: float,
    clock: str | None = None,
    clock_speed: float = 1.0,
    topo=None,
    pki=None,
    started=None,
    progress=None,
    namespaces=None,
    siblings: list[Nodehost] = (),
    restart: bool = False,
    meanwhile=None,
) -> list[Nodehost]:
    """A forked nodehost per job (name, namespace or None, node ids), each logging to
    `log_dir`/NAME.log; returns once every one said "ready", else stops them all and raises.
    `topo`, `pki`: the parent's, for the children to inherit instead of making again.
    `started(host, namespace)` after each fork; `progress(ready, total)` as they come up;
    `meanwhile()` once all are forked, before waiting for them (the parent's own work then runs
    on a core the children leave, instead of before them).
    `namespaces`: site -> namespace, for children serving several (each enters its job's first).
    `siblings`: nodehosts already running (a restart's), whose pipes each child closes; a restart
    appends to the log, which holds what the last one said before it died."""
    log_dir.mkdir(parents=True, exist_ok=True)
    hosts: list[Nodehost] = []
    sel = selectors.DefaultSelector()
    if topo is not None:
        before_fork(topo, state_dir, [i for _, _, ids in jobs for i in ids])
    # The model is objects the children only read (millions at national size):
    # out of the collector's reach, no child's collection walks them or writes to their pages
    gc.collect()
    gc.freeze()
    try:
        for name, namespace, ids in jobs:
            argv = [
                "--topology",
                str(Path(topo_file).resolve()),
                "--state",
                str(Path(state_dir).resolve()),
                "--mode",
                mode,
                "--nodes",
                ",".join(ids),
                "--clock-speed",
                str(clock_speed),
            ]
            if clock:
                argv += ["--clock", clock]
            host = _fork_nodehost(
                name,
                namespace,
                argv,
                log_dir / f"{name}.log",
                [*siblings, *hosts],
                topo,
                pki,
                namespaces,
                append=restart,
            )
            host.job = (name, namespace, ids)
            host.again = functools.partial(
                _fork_again,
                (name, namespace, ids),
                mode,
                topo_file,
                state_dir,
                log_dir,
                timeout,
                clock,
                clock_speed,
                topo,
                pki,
                started,
                namespaces,
            )
            hosts.append(host)
            if started is not None:
                started(host, namespace)
            sel.register(host.ready_fd, selectors.EVENT_READ, host)
        if meanwhile is not None:
            meanwhile()
        wait_ready(hosts, sel, log_dir, timeout, progress)
        return hosts
    except BaseException:
        stop_nodehosts(hosts)
        raise
    finally:
        sel.close()


def _fork_again(job, *args, siblings: list[Nodehost]) -> Nodehost:
    """The nodehost of `job` forked anew, with the arguments it was first forked with."""
    return fork_nodehosts([job], *args, siblings=siblings, restart=True)[0]


def wait_ready(
    hosts: list[Nodehost], sel: selectors.BaseSelector, log_dir: Path, timeout: float, progress=None
) -> None:
    """Until every nodehost in `sel` said "ready"; NetnsError naming the first that exited, or
    those still starting after `timeout`. `progress(ready, total)` after each one."""
    waiting = {h.site for h in hosts}
    deadline = time.monotonic() + timeout
    while waiting:
        left = deadline - time.monotonic()
        if left <= 0:
            raise NetnsError(f"nodes of {', '.join(sorted(waiting))} not ready after {timeout:.0f} s (see {log_dir})")
        for key, _ in sel.select(left):
            host = key.data
            data = os.read(host.ready_fd, 64)
            if data.startswith(b"ready"):
                waiting.discard(host.site)
                sel.unregister(host.ready_fd)
                if progress is not None:
                    progress(len(hosts) - len(waiting), len(hosts))
            elif not data:
                log = (log_dir / f"{host.site}.log").read_text(errors="replace").strip().splitlines()
                raise NetnsError(
                    f"nodes of {host.site} exited: {log[-1] if log else 'no output'} (see {log_dir / host.site}.log)"
                )


def stop_nodehosts(hosts: list[Nodehost], grace: float = 1.0) -> None:
    """SIGTERM (immediate: nothing is in flight that a restart cannot redo), SIGKILL after `grace`."""
    for h in hosts:
        h.close()
        if h.poll() is None:
            try:
                os.kill(h.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace
    for h in hosts:
        while h.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if h.poll() is None:
            os.kill(h.pid, signal.SIGKILL)
            os.waitpid(h.pid, 0)


def _netns_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _pids_in(namespaces: list[str]) -> set[int]:
    """Processes living in any of `namespaces`: compared by the namespace file's identity."""
    ids = {i for ns in namespaces if (i := _netns_id(f"/run/netns/{ns}"))}
    pids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _netns_id(f"/proc/{entry}/ns/net") in ids:
            pids.add(int(entry))
    return pids


def _nodehost_pids(state_dir: Path | None) -> set[int]:
    pids = set()
    if state_dir is None:
        return pids
    for pid_file in (net_dir(state_dir) / "pids").glob("*.pid"):
        try:
            pid = int(pid_file.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            comm = Path(f"/proc/{pid}/comm").read_bytes().strip()
        except (OSError, ValueError):
            pid_file.unlink(missing_ok=True)
            continue
        if _zombie(pid):
            continue
        if b"topology.launch.nodehost" in cmdline or comm == NODEHOST_COMM:  # the pid may have been reused
            pids.add(pid)
    return pids


def _kill(pids: set[int], grace: float = 1.0) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    alive = set(pids)
    while alive and time.monotonic() < deadline:
        alive = {p for p in alive if Path(f"/proc/{p}").exists() and not _zombie(p)}
        if alive:
            time.sleep(0.02)
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except (OSError, IndexError):
        return True


def _delete_namespaces(namespaces: list[str]) -> None:
    for ns in namespaces:
        if not ns.startswith(NS_PREFIX):
            continue  # never touch anything that is not ours
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def teardown(prefix: str = NS_PREFIX, state_dir: Path | None = None) -> tuple[list[str], int]:
    """Kill nodehosts and every process inside our namespaces, then delete the namespaces
    (their veths, addresses, routes and rulesets go with them). Returns (namespaces, processes)."""
    require_root("`konbini down`")
    if not prefix.startswith(NS_PREFIX):
        raise NetnsError(f"refusing to delete namespaces outside {NS_PREFIX}*")
    namespaces = list_namespaces(prefix)
    skipped: list[str] = []
    if prefix == NS_PREFIX:  # a bare `konbini down`: every konbini-* but those of a live tagged launcher
        live = _live_tagged_prefixes()
        skipped = [ns for ns in namespaces if any(ns.startswith(p) for p in live)]
        namespaces = [ns for ns in namespaces if ns not in skipped]
    impair.stop_netns_runs(prefix, _live_tagged_prefixes() if prefix == NS_PREFIX else set())  # the impairment daemon
    pids = _pids_in(namespaces) | _nodehost_pids(state_dir)
    pids.discard(os.getpid())
    _kill(pids)
    _delete_namespaces(namespaces)
    if state_dir is not None:
        for pid_file in (net_dir(state_dir) / "pids").glob("*.pid"):
            pid_file.unlink(missing_ok=True)
        (net_dir(state_dir) / "up.json").unlink(missing_ok=True)
    if not skipped:
        (RUN_DIR / f"{prefix.rstrip('-')}.pid").unlink(missing_ok=True)
    return namespaces, len(pids)
