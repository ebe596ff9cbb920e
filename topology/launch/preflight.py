"""The pre-flight check: the machine limits a topology will hit, named before anything starts.

`konbini up` on a large file fails late and obscurely without it: EMFILE after minutes of
starting listeners, EADDRNOTAVAIL when a relay's upstream connections use up the ephemeral
ports of its one source address, or the OOM killer. Each `Need` compares what the topology
asks for (counted from the file, with the per-listener cost measured on this machine kind)
with what the kernel grants, and says how to raise it. A soft open-files limit below what is
needed but within the hard limit is raised here, in this process, and reported.

In loopback mode every node shares one process, so both ends of every connection count
against that process's open files.
"""

from __future__ import annotations

import os
import resource
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from topology.spec.model import RELAY_KINDS, Node, Topology

FD_RESERVE = 256  # the interpreter, logs, the ledger, the PKI files being read
CONNECTION_FDS = 2  # loopback: both ends of a connection are in this one process
MIB = 1 << 20
# Fitted to the national file, `konbini up --processes 12` (PKI made beforehand) on this machine
# kind: the machine's used memory grew by 4.1-4.6 GiB and PSS summed to 3.85 GiB with 223,522
# listeners, 247,989 nodes and 13 processes. The model is counted once: the children inherit the
# parent's pages copy on write, frozen out of the collector's reach, and touch only their own
# nodes. (4,600 MiB - 13 x 64 MiB - the model's 533 MiB) / 223,522 = ~15 KiB a listener: its
# socket, its node's server, allow-list and share of the touched model. TLS contexts and
# metrics are made at a node's first use and are not counted.
RSS_PER_LISTENER = 16 * 1024
BASE_RSS = 64 * MIB  # the interpreter and konbini's modules, per process (the default topology at ready)
# The loaded model: national.yaml, 247,989 nodes, ~538 MiB after load + compile = ~2.2 KiB a node.
MODEL_PER_NODE = 2200


@dataclass(frozen=True)
class Need:
    limit: str  # what the kernel limits
    needed: int
    granted: int | None  # None: not knowable here
    unit: str
    how: str  # how to raise it
    note: str = ""
    blocking: bool = True  # False: a peak figure (every kiosk connected at once), reported, not refused

    @property
    def ok(self) -> bool:
        return self.granted is None or self.needed <= self.granted

    def line(self) -> str:
        granted = "unknown" if self.granted is None else f"{self.granted:,}"
        verdict = "ok" if self.ok else ("TOO LOW" if self.blocking else "too low at peak")
        text = f"{self.limit}: needs {self.needed:,} {self.unit}, has {granted} ({verdict})"
        if self.note:
            text += f"; {self.note}"
        if not self.ok:
            text += f"; {self.how}"
        return text


def listeners(topo: Topology, metrics: bool = True) -> int:
    """Listening sockets the topology opens: each server's port and metrics port, and every admin
    or maintenance port (a kiosk's too, though a kiosk is no server)."""
    n = 0
    for node in topo.nodes.values():
        n += (node.is_server * (1 + metrics)) + (node.admin_port is not None)
    return n


def upstream_connections(topo: Topology) -> Counter[tuple[str, str]]:
    """(relay, next hop) -> the connections from the relay's one address to that hop with every
    kiosk connected at once, the shape of the file's `upstream_connections` taken into account:
    a paired relay opens one per downstream connection (all to its first hop under "failover",
    spread under "balance"), a pooled one at most its `connections` per hop."""
    into: Counter[str] = Counter()  # downstream connections into each relay
    for node in topo.nodes.values():
        if node.kind == "kiosk" and node.upstream:
            into[node.upstream] += 1
    out: Counter[tuple[str, str]] = Counter()
    for relay in _store_side_first(topo):
        n, hops = into[relay.id], relay.hops
        if not n or not hops:
            continue
        way = topo.upstream_connections_for(relay)
        balance = relay.upstream_policy == "balance"
        for hop in hops if balance else hops[:1]:  # failover: the first hop takes them all
            share = -(-n // len(hops)) if balance else n
            out[relay.id, hop] = min(way.connections, share) if way.mode == "pooled" else share
            into[hop] += out[relay.id, hop]
    return out


def _store_side_first(topo: Topology) -> list[Node]:
    """The relays, each after every relay whose next hop it is (Kahn's order over the hops)."""
    relays = {n.id: n for n in topo.nodes.values() if n.kind in RELAY_KINDS}
    feeding: Counter[str] = Counter(hop for r in relays.values() for hop in r.hops if hop in relays)
    ready = [r for r in relays.values() if not feeding[r.id]]
    order = []
    while ready:
        relay = ready.pop()
        order.append(relay)
        for hop in relay.hops:
            if hop in relays:
                feeding[hop] -= 1
                if not feeding[hop]:
                    ready.append(relays[hop])
    return order


def upstream_fanout(topo: Topology, counts: Counter[tuple[str, str]] | None = None) -> tuple[str, str, int]:
    """The relay and next hop with the most connections between them at peak (`upstream_connections`,
    or `counts` if given), and how many: they share one (source address, next hop) pair, and with
    it the ephemeral port range."""
    counts = upstream_connections(topo) if counts is None else counts
    if not counts:
        return "", "", 0
    (relay, hop), count = counts.most_common(1)[0]
    return relay, hop, count


def _read_int(path: str) -> int | None:
    try:
        return int(Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _port_range() -> int | None:
    try:
        lo, hi = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        return None
    return hi - lo + 1


def _mem_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


# A file with more listeners than this starts in one process per core: its start is mostly
# binding sockets and building servers, which the processes do side by side.
SPREAD_ABOVE = 20_000


def processes_for(topo: Topology, *, connections: int = 512) -> int:
    """`konbini up`'s default `--processes` in loopback mode: one for a small file; for a large
    one, one a core, or more where one process's hard open-files limit cannot hold its share
    (national.yaml under a hard limit of 20,000: 20)."""
    n_listen = listeners(topo)
    if n_listen <= SPREAD_ABOVE:
        return 1
    room = resource.getrlimit(resource.RLIMIT_NOFILE)[1] - CONNECTION_FDS * connections - FD_RESERVE
    by_limit = -(-n_listen // room) if room > 0 else 1
    return max(by_limit, os.cpu_count() or 1)


def check(
    topo: Topology, *, connections: int = 512, processes: int = 1, raise_soft: bool = True
) -> tuple[list[Need], list[str]]:
    """(every limit with its verdict, notes on what was changed here). `connections`: the
    concurrent connections to plan for (a bench's in-flight requests times the hops);
    `processes`: `up --processes`, the nodes spread over that many (the open-files limit is per
    process, and the spread is balanced by listeners)."""
    notes: list[str] = []
    n_listen = listeners(topo)
    per_process = -(-n_listen // processes)
    fds = per_process + CONNECTION_FDS * connections + FD_RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    nr_open = _read_int("/proc/sys/fs/nr_open")
    if raise_soft and soft < fds:
        # within the hard limit anyone may raise the soft one; root may raise the hard one up to fs.nr_open
        new_hard = hard if fds <= hard else (fds if os.geteuid() == 0 and nr_open and fds <= nr_open else None)
        if new_hard is not None:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (fds, new_hard))
            except (ValueError, OSError):  # root without CAP_SYS_RESOURCE (a container) may not raise the hard limit
                notes.append(f"open files: could not raise the hard limit {hard:,} (no CAP_SYS_RESOURCE here)")
            else:
                notes.append(
                    f"open files: limit raised from {soft:,} to {fds:,} for this run"
                    + (
                        f" (hard limit {hard:,} -> {new_hard:,}, as root)"
                        if new_hard != hard
                        else f" (hard limit {hard:,})"
                    )
                )
                soft = fds
    needs = [
        Need(
            "open files (RLIMIT_NOFILE, one process)",
            fds,
            soft,
            "descriptors",
            f"run `ulimit -n {fds}` first (as root, or raise the hard limit in /etc/security/limits.conf"
            + (f"; fs.nr_open is {nr_open:,}" if nr_open else "")
            + ")"
            + (
                f", or spread the nodes: `--processes {-(-n_listen // max(1, soft - CONNECTION_FDS * connections - FD_RESERVE))}`"
                if soft > CONNECTION_FDS * connections + FD_RESERVE
                else ""
            ),
            (
                f"{per_process:,} of {n_listen:,} listeners in each of {processes} processes"
                if processes > 1
                else f"{n_listen:,} listeners"
            )
            + f" + {connections:,} connections x {CONNECTION_FDS} + {FD_RESERVE} spare",
        ),
        Need(
            "system-wide open files (fs.file-max)",
            n_listen + fds * processes - per_process * processes,
            _read_int("/proc/sys/fs/file-max"),
            "descriptors",
            f"`sysctl -w fs.file-max={2 * (n_listen + fds)}`",
        ),
    ]
    counts = upstream_connections(topo)  # once: a walk of the relays, 0.5 s national
    relay, hop, fan = upstream_fanout(topo, counts)
    if relay:
        way = topo.upstream_connections_for(topo.node(relay))
        needs.append(
            Need(
                f"ephemeral ports per source address ({relay} to {hop})",
                fan,
                _port_range(),
                "ports",
                '`sysctl -w net.ipv4.ip_local_port_range="1024 65535"`, fewer kiosks connected at once, '
                f"or `upstream_connections: {{{topo.node(relay).kind}: {{mode: pooled}}}}`",
                (
                    f"pooled: at most {way.connections} connections per next hop"
                    if way.mode == "pooled"
                    else "each downstream connection paired with an upstream one"
                ),
                blocking=False,
            )
        )
    kiosks = sum(1 for n in topo.nodes.values() if n.kind == "kiosk")
    peak = kiosks + sum(counts.values())
    needs.append(
        Need(
            "open files with every kiosk connected (all processes)",
            n_listen + CONNECTION_FDS * peak + FD_RESERVE * processes,
            soft * processes,
            "descriptors",
            f"`ulimit -n` of {-(-(n_listen + CONNECTION_FDS * peak) // processes) + FD_RESERVE:,} per process",
            f"{kiosks:,} kiosk connections + {peak - kiosks:,} relay upstream connections, x {CONNECTION_FDS}",
            blocking=False,
        )
    )
    mem = BASE_RSS * processes + MODEL_PER_NODE * len(topo.nodes) + RSS_PER_LISTENER * n_listen
    needs.append(
        Need(
            "memory (MemAvailable)",
            mem // MIB,
            (m // MIB) if (m := _mem_available()) else None,
            "MiB",
            "free memory, or fewer processes",
            f"~{RSS_PER_LISTENER // 1024} KiB a listener, "
            f"~{MODEL_PER_NODE / 1024:.1f} KiB a node and {BASE_RSS // MIB} MiB a process, measured",
        )
    )
    return needs, notes


def refusals(needs: list[Need]) -> list[Need]:
    """The limits that stop a launch: blocking ones not met."""
    return [n for n in needs if n.blocking and not n.ok]
