"""The national bench's cost per role: CPU per issuance of the store routers, EC routers, DMZ
relays, centers, OCSP, municipalities and the load generator, and TLS handshakes per issuance.

Each node process serves one node kind (`spread.start(..., by_kind=True)`), so a process's CPU is
its kind's: bench/costs.py's model, taken over the measured window of each phase, is summed by
kind. The handshakes are the node processes' own tallies (gateway/node/handshakes.py), read by
signal at the start and the end of the same window: every connection of the run has a server
among the nodes, so full + resumed counts every handshake, the kiosks' included.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from bench.costs import CostProcess, CostWindow
from gateway.node import handshakes
from topology.spec.model import RELAY_KINDS

ROLES = ("store-router", "ec-router", "dmz-relay", "issuance-center", "ocsp", "municipality", "generator")
TALLY_WAIT_S = 10.0  # a node process busy at 100 % still runs its signal handler within milliseconds


def node_processes(hosts) -> list[CostProcess]:
    """One CostProcess per nodehost named KIND-N (a spread by kind): relays or origin, of its kind."""
    out = []
    for h in hosts:
        kind = h.site.rsplit("-", 1)[0]
        out.append(CostProcess(h.site, "relays" if kind in RELAY_KINDS else "origin", h.pid, hops=(kind,)))
    return out


def read_tallies(state_dir: Path, pids: list[int], wait_s: float = TALLY_WAIT_S) -> dict[str, dict[str, int]] | None:
    """The processes' handshake tallies summed by kind, asked for by signal now; None if one did
    not answer within `wait_s` (gone, or not a nodehost)."""
    paths = {pid: handshakes.tally_path(state_dir, pid) for pid in pids}
    for pid, path in paths.items():
        path.unlink(missing_ok=True)
        try:
            os.kill(pid, handshakes.SIGNAL)
        except ProcessLookupError:
            return None
    deadline = time.monotonic() + wait_s
    while not all(p.exists() for p in paths.values()):
        if time.monotonic() > deadline:
            return None
        time.sleep(0.01)  # polling the files: the handlers run in other processes
    total: dict[str, dict[str, int]] = {}
    for path in paths.values():
        for kind, counts in json.loads(path.read_text()).items():
            into = total.setdefault(kind, {"full": 0, "resumed": 0})
            for how, n in counts.items():
                into[how] = into.get(how, 0) + n
    return total


class RoleWindow(CostWindow):
    """bench/costs.py's CPU window, plus the node processes' handshake tallies at its two ends."""

    def __init__(self, known: list[CostProcess], state_dir: Path) -> None:
        super().__init__(known)
        self.state_dir = state_dir
        self.pids = [p.pid for p in known]
        self.hs_start: dict | None = None
        self.hs_end: dict | None = None
        self._ends = threading.Lock()

    def begin(self) -> None:
        with self._ends:
            if not self.start:
                self.hs_start = read_tallies(self.state_dir, self.pids)
                super().begin()

    def finish(self) -> None:
        """Once, whether from the timer or the run's end (both may call it at the same moment: two
        readers would delete each other's tally files)."""
        with self._ends:
            if self.start and not self.end:
                super().finish()
                self.hs_end = read_tallies(self.state_dir, self.pids)

    def handshakes(self) -> dict[str, dict[str, int]] | None:
        """Handshakes by kind within the window; None where a tally was not read."""
        if self.hs_start is None or self.hs_end is None:
            return None
        out = {}
        for kind, counts in self.hs_end.items():
            was = self.hs_start.get(kind, {})
            out[kind] = {how: n - was.get(how, 0) for how, n in counts.items()}
        return out


def role_costs(model: dict, hs: dict[str, dict[str, int]] | None, issued: int) -> dict:
    """µs of CPU per issuance by role (ROLES, then the total), and full and resumed handshakes per
    issuance (in all and by the kind of the server that did them)."""
    cpu: dict[str, float] = {}
    for row in model.get("processes", []):
        role = row["hops"][0] if row["hops"] else row["role"]
        cpu[role] = cpu.get(role, 0.0) + row["cpu_s"]

    def per(x: float, digits: int = 1) -> float | None:
        return round(x / issued, digits) if issued else None

    us = {r: per(cpu[r] * 1e6) for r in ROLES if r in cpu}
    us |= {r: per(s * 1e6) for r, s in cpu.items() if r not in ROLES}  # a role this list does not know
    out: dict = {
        "issued": issued,
        "window_s": model.get("window_s"),
        "us_per_issuance": us,
        "total_us_per_issuance": per(sum(cpu.values()) * 1e6),
        "cores_used": model.get("total_cores"),
    }
    if hs is not None:
        full = sum(c.get("full", 0) for c in hs.values())
        resumed = sum(c.get("resumed", 0) for c in hs.values())
        out["handshakes"] = {
            "full": full,
            "resumed": resumed,
            "full_per_issuance": per(full, 3),
            "resumed_per_issuance": per(resumed, 3),
            "by_server_kind": {k: hs[k] for k in sorted(hs)},
        }
    return out


def role_table(phases: list[dict]) -> list[str]:
    """The report's markdown table: a phase a row, µs of CPU per issuance by role, handshakes per issuance."""
    roles = [r for r in ROLES if any(r in (p.get("roles") or {}).get("us_per_issuance", {}) for p in phases)]
    lines = [
        "| phase | cores | issued | " + " | ".join(roles) + " | total µs | cores used | full hs | resumed hs |",
        "|---|---|---|" + "---|" * len(roles) + "---|---|---|---|",
    ]
    for p in phases:
        c = p.get("roles") or {}
        us, hs = c.get("us_per_issuance", {}), c.get("handshakes") or {}
        cells = [_num(us.get(r)) for r in roles]
        lines.append(
            f"| {p['name']} | {p.get('cores') or 'all'} | {c.get('issued', '-')} | " + " | ".join(cells) + " | "
            f"{_num(c.get('total_us_per_issuance'))} | {_num(c.get('cores_used'), 2)} | "
            f"{_num(hs.get('full_per_issuance'), 2)} | {_num(hs.get('resumed_per_issuance'), 2)} |"
        )
    return lines


def _num(v, digits: int = 0) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"
