"""The bench's server processes: nodes served by `run_topology` in a child (`NodeProcess`), several
started together (`NodeGroup`), and their CPU and memory read from /proc."""

from __future__ import annotations

import multiprocessing as mp
import os
import re
import signal
import subprocess
import sys
from datetime import datetime
from pathlib import Path

from bench.options import BenchError
from topology.spec.model import RELAY_KINDS, Topology

TICK = os.sysconf("SC_CLK_TCK")


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


class RunningFront:
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
