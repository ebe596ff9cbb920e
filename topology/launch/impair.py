"""Line impairments on the machine: apply a topology's `impair:` (and live `link set` changes) as
nftables loss rules, iptables-nft NFQUEUE rules, tc qdiscs and the supervised impairment daemon,
and take them all away again. Root only. What goes where is planned in `topology.netns.impair`.

A run keeps its state in one directory (`run_dir`): state.json (mode, live changes), the
daemon's config and status, its log, and changes.log (every `link set`/`link reset`). A later
`konbini link …` process finds the running topology there; a restarted topology starts from the
file again (its run directory is replaced).

Netns mode: rules live in the topology's namespaces and die with them. Loopback mode: rules
live on the launcher's own `lo` (run the tests inside `unshare -n`); the daemon's supervisor
removes them when it stops, also when the launcher was SIGKILLed (it dies with its parent).
Every run's table, chain and queue are named by the run (`impair_names`, `free_queue`): two
loopback topologies on one `lo` each keep and remove only their own, and a run that finds its
run directory in use by a live one leaves it alone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from topology.launch.impaird import die_with_parent, run_cleanup
from topology.netns.enter import in_namespace_argv
from topology.netns.impair import (
    QUEUE_BASE,
    ImpairError,
    LineImpairment,
    free_queue,
    impairments,
    netem_args,
    plan_impairments,
    tbf_args,
)
from topology.netns.plan import NetPlan
from topology.policy.nft import compile_impair_ruleset, compile_queue_rules, impair_names
from topology.spec.model import Impairment, Mode, Topology

RUN_ROOT = Path("/run/konbini/impair")  # netns runs, by namespace prefix (the state dir may differ per command)
APPLY_TIMEOUT = 1.0  # `link set` returns once the daemon runs the new config, at most this later
READ_RATE = 10_000  # line directions a second the daemon reads its config at, at least (docs/performance.md)
DAEMON_MARK = b"topology.launch.impaird"
log = logging.getLogger("konbini.impair")


class LineError(Exception):
    """Impairments cannot be applied or changed (one line for the user)."""


def run_dir(mode: Mode, prefix: str | None = None, state_dir: Path | None = None) -> Path:
    if mode == Mode.NETNS:
        return RUN_ROOT / (prefix or "konbini-").rstrip("-")
    return Path(state_dir or ".konbini").resolve() / "impair"


def _run(cmd: list[str], stdin: str | None = None, check: bool = True) -> str:
    try:
        done = subprocess.run(cmd, input=stdin, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise LineError(
            f"{cmd[0]} not found; line impairments need nftables, iproute2 and iptables (Debian's iptables package)"
        ) from None
    if check and done.returncode != 0:
        first = (done.stderr.strip() or done.stdout.strip() or f"exit {done.returncode}").splitlines()[0]
        raise LineError(f"{' '.join(cmd[:6])}…: {first}")
    return done.stdout


def _in(namespace: str | None, cmd: list[str]) -> list[str]:
    return [*in_namespace_argv(namespace), *cmd] if namespace else cmd


QUEUE_TRIES = 3  # loopback runs starting together may pick one queue number; the one that loses the bind moves on
APPLY_WORKERS = 8  # namespaces configured at once: one after another was too slow (docs/national.md)


def kernel_has_netem(namespace: str | None) -> bool:
    """Try a netem qdisc on the namespace's own lo and remove it again. KONBINI_IMPAIR=daemon skips it."""
    if os.environ.get("KONBINI_IMPAIR") == "daemon" or namespace is None:
        return False
    done = subprocess.run(
        ["tc", "-n", namespace, "qdisc", "add", "dev", "lo", "root", "handle", "9:", "netem", "delay", "1ms"],
        capture_output=True,
        check=False,
    )
    if done.returncode == 0:
        subprocess.run(["tc", "-n", namespace, "qdisc", "del", "dev", "lo", "root"], capture_output=True, check=False)
    return done.returncode == 0


def loopback_cleanup(table: str, chain: str) -> list[list[str]]:
    """Commands that remove one run's loopback-mode rules from this namespace, and no other run's
    (idempotent; run by the supervisor)."""
    return [
        ["nft", "delete", "table", "inet", table],
        ["iptables", "-t", "mangle", "-D", "PREROUTING", "-j", chain],
        ["iptables", "-t", "mangle", "-F", chain],
        ["iptables", "-t", "mangle", "-X", chain],
        # iptables-nft leaves its (now empty) `ip mangle` table behind; drop it when nothing else uses it
        [
            "sh",
            "-c",
            "nft -j list table ip mangle 2>/dev/null | grep -q '\"rule\"' || nft delete table ip mangle 2>/dev/null; true",
        ],
    ]


def _pid_alive(pid: int | None, mark: bytes = DAEMON_MARK) -> bool:
    if not pid:
        return False
    try:
        return mark in Path(f"/proc/{pid}/cmdline").read_bytes() and not Path(f"/proc/{pid}/stat").read_text().split(
            ") ", 1
        )[1].startswith("Z")
    except (OSError, IndexError):
        return False


def taken_queues(namespace: str | None = None) -> set[int]:
    """Queue numbers other runs hold here: bound by a process, or named by an iptables rule (a
    run whose daemon is restarting still owns its number)."""
    bound = _run(_in(namespace, ["cat", "/proc/net/netfilter/nfnetlink_queue"]), check=False)
    rules = _run(_in(namespace, ["iptables-save", "-t", "mangle"]), check=False)
    named = re.findall(r"--queue-num (\d+)", rules)
    return {int(row.split()[0]) for row in bound.splitlines() if row.strip()} | {int(n) for n in named}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, data: dict, indent: int | None = 1) -> None:
    """`indent` None: on one line, by json's C encoder (an indent takes its Python one, 2 s for the
    daemon config of national.yaml's 117,000 line directions)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=indent))
    os.replace(tmp, path)


class Impairments:
    """One running topology's line impairments: its plan, its rules and its daemon."""

    def __init__(
        self,
        topo: Topology,
        mode: Mode,
        plan: NetPlan | None = None,
        state_dir: Path | None = None,
        overrides: dict[str, Impairment] | None = None,
        netem: bool = False,
    ) -> None:
        self.topo, self.mode, self.plan = topo, mode, plan
        self.dir = run_dir(mode, plan.prefix if plan else None, state_dir)
        self.overrides = dict(overrides or {})
        self.netem = netem
        self.config = self.dir / "daemon.json"
        self.status_file = self.dir / "status.json"
        self.run = hashlib.sha256(str(self.dir).encode()).hexdigest()[:8]  # names this run's rules
        self.table, self.chain = impair_names(self.run)
        self.queue = QUEUE_BASE[mode]  # loopback: the next free one, chosen at start
        self.started = False  # stop() removes only what this object started

    # -- state ---------------------------------------------------------------------------------

    @classmethod
    def attach(
        cls, topo: Topology, mode: Mode, plan: NetPlan | None = None, state_dir: Path | None = None
    ) -> Impairments:
        """The impairments of a running topology (for `konbini link …`)."""
        run = cls(topo, mode, plan, state_dir)
        saved = _read_json(run.dir / "state.json")
        if not saved:
            where = f"--netns with namespaces {plan.prefix}*" if plan else f"loopback, state {run.dir.parent}"
            raise LineError(f"no running topology with line impairments ({where}); start `konbini up` first")
        run.overrides = {k: Impairment(**v) for k, v in saved.get("overrides", {}).items()}
        run.netem = saved.get("netem", False)
        run.queue = saved.get("queue", run.queue)
        return run

    def _save(self) -> None:
        _write_json(
            self.dir / "state.json",
            {
                "mode": self.mode,
                "prefix": self.plan.prefix if self.plan else None,
                "topology": self.topo.source,
                "netem": self.netem,
                "queue": self.queue,
                "table": self.table,
                "chain": self.chain,
                "launcher": os.getpid(),
                "overrides": {k: {f: getattr(v, f) for f in v.__struct_fields__} for k, v in self.overrides.items()},
                "queued_namespaces": sorted(self._queued_namespaces, key=str),
            },
        )

    def lines(self, impaired_only: bool = False) -> list[LineImpairment]:
        """Every line's plan, or with `impaired_only` the lines with an impairment (all a start applies)."""
        try:
            return plan_impairments(
                self.topo,
                self.mode,
                impairments(self.topo, self.overrides),
                self.plan,
                self.netem,
                self.queue,
                impaired_only,
            )
        except ImpairError as exc:
            raise LineError(str(exc)) from None

    def namespaces(self) -> list[str | None]:
        return [s.namespace for s in self.plan.sites.values()] if self.plan else [None]

    # -- applying ------------------------------------------------------------------------------

    def _daemon_config(self, lines: list[LineImpairment]) -> None:
        queues = [q for li in lines for q in li.daemon_queues()]
        on_exit = (
            loopback_cleanup(self.table, self.chain) if self.mode == Mode.LOOPBACK else []
        )  # netns: the namespaces take them along
        _write_json(self.config, {"queues": queues, "on_exit": on_exit}, indent=None)

    def _apply_namespace(self, lines: list[LineImpairment], namespace: str | None) -> None:
        nft = compile_impair_ruleset(lines, namespace, self.table, self.queue)
        if nft:
            _run(_in(namespace, ["nft", "-f", "-"]), nft)
        else:
            _run(_in(namespace, ["nft", "delete", "table", "inet", self.table]), check=False)
        queued = any(h.namespace == namespace for li in lines if li.queued for h in li.hops)
        if queued:
            _run(
                _in(namespace, ["iptables-restore", "-w", "--noflush"]),
                compile_queue_rules(lines, namespace, self.chain, self.queue),
            )
            jump = ["iptables", "-w", "-t", "mangle", "-C", "PREROUTING", "-j", self.chain]
            if subprocess.run(_in(namespace, jump), capture_output=True, check=False).returncode != 0:
                _run(_in(namespace, ["iptables", "-w", "-t", "mangle", "-I", "PREROUTING", "1", "-j", self.chain]))
            self._queued_namespaces.add(namespace)
        elif namespace in self._queued_namespaces:
            for cmd in loopback_cleanup(self.table, self.chain)[1:]:
                subprocess.run(_in(namespace, cmd), capture_output=True, check=False)
            self._queued_namespaces.discard(namespace)

    def _apply_qdiscs(self, li: LineImpairment, changed: bool) -> None:
        """tbf (or netem) on both veth ends; `changed`: also clear a qdisc the line no longer needs."""
        if li.veth is None:
            return
        ns_a, ns_b, dev = li.veth
        for ns in (ns_a, ns_b):
            if li.netem and not li.shape.empty:
                imp = impairments(self.topo, self.overrides)[li.line]
                _run(["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "netem", *netem_args(imp)])
            elif li.tbf:
                _run(["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", *tbf_args(li.shape.rate_bps)])
            elif changed:
                subprocess.run(["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"], capture_output=True, check=False)

    def _wait_daemon(self, lines: list[LineImpairment], timeout: float = APPLY_TIMEOUT) -> bool:
        """Until the daemon runs the config just written (its status echoes the file's mtime); a
        large config takes it longer to read."""
        timeout += sum(2 for li in lines if li.queued) / READ_RATE
        want = os.stat(self.config).st_mtime_ns
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if _read_json(self.status_file).get("config_mtime_ns") == want:
                return True
            time.sleep(0.02)
        return False

    def start(self) -> list[str]:
        """Apply every line's impairment and start the daemon; returns notes for the user."""
        if os.geteuid() != 0:
            n = len(self.lines(impaired_only=True))
            return (
                [
                    f"lines are not impaired: {n} lines declare impairments, applying them needs root "
                    f"(run `sudo konbini up`, or `konbini up --netns`)"
                ]
                if n
                else []
            )
        self.stop_stale()
        self.dir.mkdir(parents=True, exist_ok=True)
        self._queued_namespaces: set[str | None] = set()
        taken = taken_queues() if self.mode == Mode.LOOPBACK else set()  # other runs may share this lo
        self.queue = self._free_queue(taken)
        if self.plan is not None and os.environ.get("KONBINI_IMPAIR") != "daemon":
            self.netem = kernel_has_netem(self.plan.namespace(next(iter(self.plan.sites))))
        lines = self.lines(impaired_only=True)
        self._daemon_config(lines)
        self._save()
        self._start_supervisor()
        self.started = True
        for _ in range(QUEUE_TRIES):
            if not any(li.queued for li in lines):
                break
            if not self._wait_daemon(lines, 5.0):
                raise LineError(f"impairment daemon has not read its config (see {self.dir / 'impaird.log'})")
            if not self.queue_refused():
                break
            # another run took the number between our look and our bind: the next free one
            taken.add(self.queue)
            self.queue = self._free_queue(taken)
            lines = self.lines(impaired_only=True)
            self._daemon_config(lines)
            self._save()
        else:
            raise LineError(
                f"impairment daemon could not bind a queue in {QUEUE_TRIES} tries (see {self.dir / 'impaird.log'})"
            )
        with ThreadPoolExecutor(APPLY_WORKERS) as pool:  # each waits on its commands, not on Python
            for _ in pool.map(lambda ns: self._apply_namespace(lines, ns), self.namespaces()):
                pass
        for li in lines:
            self._apply_qdiscs(li, changed=False)
        self._save()
        return self.notes(lines)

    def _free_queue(self, taken: set[int]) -> int:
        if self.mode != Mode.LOOPBACK:
            return self.queue  # the run's own namespaces
        try:
            return free_queue(taken)
        except ImpairError as exc:
            raise LineError(str(exc)) from None

    def queue_refused(self) -> bool:
        """Did the daemon fail to bind this run's queue (another process holds it)?"""
        return any(e.startswith(f"queue {self.queue}:") for e in _read_json(self.status_file).get("errors", []))

    def notes(self, lines: list[LineImpairment]) -> list[str]:
        impaired = [li for li in lines if not li.shape.empty]
        if not impaired:
            return []
        how = (
            "netem on the veth ends (the kernel has sch_netem), the daemon for lines on one lo"
            if self.netem
            else "delay/jitter: NFQUEUE + impairment daemon on the receiving side; loss: nft numgen; "
            + ("rate: tbf on the veth ends" if self.mode == Mode.NETNS else "rate: the daemon's clock")
        )
        return [f"{len(impaired)} lines impaired ({how}); `konbini link show` for counters"]

    def change(self, line_id: str, impair: Impairment | None, reset: bool = False) -> str:
        """`link set` (impair), `link set --clear` (None) or `link reset` (back to the file's value)."""
        if line_id not in {li.id for li in self.topo.lines}:
            raise LineError(f"unknown line {line_id!r}; lines: {', '.join(li.id for li in self.topo.lines)}")
        saved = _read_json(self.dir / "state.json")
        self._queued_namespaces = set(saved.get("queued_namespaces", []))
        before = {li.line: li for li in self.lines()}[line_id]
        if reset:
            self.overrides.pop(line_id, None)
        else:
            self.overrides[line_id] = impair or Impairment()
        lines = self.lines()
        after = {li.line: li for li in lines}[line_id]
        self._daemon_config(lines)
        applied = self._wait_daemon(lines) if (before.queued or after.queued) else True
        for ns in {h.namespace for h in after.hops}:
            self._apply_namespace(lines, ns)
        self._apply_qdiscs(after, changed=True)
        self._save()
        what = "reset to the file's value" if reset else "set"
        entry = f"line {line_id} {what}: {before.shape.describe()} -> {after.shape.describe()} ({after.mechanism or 'none'})"
        if not applied:
            entry += "; the daemon has not confirmed it yet (is it down? `konbini link show`)"
        with open(self.dir / "changes.log", "a") as f:
            f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} pid {os.getpid()} {entry}\n")
        log.info(entry)
        return entry

    # -- the daemon ----------------------------------------------------------------------------

    def _start_supervisor(self) -> None:
        logf = open(self.dir / "impaird.log", "a")
        try:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "topology.launch.impaird",
                    "--supervise",
                    str(self.config),
                    str(self.status_file),
                ],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=logf,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        finally:
            logf.close()
        (self.dir / "supervisor.pid").write_text(f"{proc.pid}\n")
        self._proc = proc

    def daemon(self) -> dict:
        """The supervisor's and the daemon's state, for `link show` and the launchers' watch loops."""
        sup = _read_json(self.status_file.with_name(self.status_file.name + ".supervisor"))
        status = _read_json(self.status_file)
        alive = _pid_alive(sup.get("pid"))
        return {
            "supervisor_alive": alive,
            "daemon_alive": alive and _pid_alive(sup.get("daemon_pid")),
            "down": sup.get("down", False) or not alive,
            **{k: sup.get(k) for k in ("daemon_pid", "restarts", "last_exit", "note")},
            "cpu_s": status.get("cpu_s"),
            "queues": status.get("queues", []),
            "updated": status.get("updated"),
            "status_pid": status.get("pid"),
        }  # == daemon_pid once a restarted daemon has bound its queues

    def stop(self) -> None:
        """Stop the daemon this object started (its supervisor runs the loopback cleanup) and forget
        the run; a run someone else started is left alone."""
        if not self.started:
            return
        stop_run(self.dir)
        if self.mode == Mode.LOOPBACK and os.geteuid() == 0:
            for cmd in loopback_cleanup(self.table, self.chain):  # also when the supervisor was gone already
                subprocess.run(cmd, capture_output=True, check=False)
        proc = getattr(self, "_proc", None)
        if proc is not None:
            proc.poll()
        self.started = False

    def stop_stale(self) -> None:
        """A previous run of the same topology that was never stopped (its launcher SIGKILLed: its
        supervisor died with it). A live supervisor means its launcher runs: refuse, touch nothing."""
        try:
            pid = int((self.dir / "supervisor.pid").read_text().strip())
        except (OSError, ValueError):
            pid = None
        if _pid_alive(pid):
            launcher = _read_json(self.dir / "state.json").get("launcher")
            raise LineError(
                f"a topology with these line impairments is running (launcher pid {launcher or '?'}, "
                f"run {self.dir}); its lines are left as they are"
            )
        stop_run(self.dir)

    # -- show ------------------------------------------------------------------------------------

    def kernel(self) -> dict[str | None, dict]:
        """What the kernel holds of this run, per namespace: loss rules with their counters, the
        queued hops' set, the mark rule, the NFQUEUE rule and its jump, and the bound queues."""
        out: dict[str | None, dict] = {}
        for ns in self.namespaces():
            held = out[ns] = {
                "loss": {},
                "queued": set(),
                "mark": False,
                "queue_rule": False,
                "jump": False,
                "bound": set(),
            }
            text = _run(_in(ns, ["nft", "-j", "list", "table", "inet", self.table]), check=False)
            try:
                items = json.loads(text).get("nftables", []) if text else []
            except ValueError:
                items = []
            for item in items:
                if "set" in item and item["set"].get("name") == "queued":
                    held["queued"] = {
                        tuple(e["concat"]) for e in item["set"].get("elem", []) if isinstance(e, dict) and "concat" in e
                    }
                rule = item.get("rule")
                if not rule:
                    continue
                comment = str(rule.get("comment", ""))
                if comment.startswith("queued lines"):
                    held["mark"] = True
                elif comment.startswith("line "):
                    line, direction = comment.split()[1], comment.split()[2].rstrip(":")
                    held["loss"][(line, direction)] = sum(
                        e["counter"]["packets"] for e in rule.get("expr", []) if "counter" in e
                    )
            rules = _run(_in(ns, ["iptables", "-w", "-t", "mangle", "-S", self.chain]), check=False)
            held["queue_rule"] = f"--queue-num {self.queue} " in rules
            jump = subprocess.run(
                _in(ns, ["iptables", "-w", "-t", "mangle", "-C", "PREROUTING", "-j", self.chain]),
                capture_output=True,
                check=False,
            )
            held["jump"] = jump.returncode == 0
            bound = _run(_in(ns, ["cat", "/proc/net/netfilter/nfnetlink_queue"]), check=False)
            held["bound"] = {int(row.split()[0]) for row in bound.splitlines() if row.strip()}
        return out

    def loss_counters(self) -> dict[tuple[str, str], int]:
        """(line, direction) -> packets dropped by the numgen rules, from nft's counters."""
        out: dict[tuple[str, str], int] = {}
        for held in self.kernel().values():
            for key, n in held["loss"].items():
                out[key] = out.get(key, 0) + n
        return out

    @staticmethod
    def missing(li: LineImpairment, hop, held: dict) -> list[str]:
        """What the kernel lacks of one hop's impairment (empty: all of it is in force)."""
        gone = []
        if li.shape.loss and not li.netem and (li.line, hop.direction) not in held["loss"]:
            gone.append("loss rule")
        if li.queued:
            if (hop.iif, hop.saddr, hop.daddr) not in held["queued"] or not held["mark"]:
                gone.append("queued-set entry")
            if not (held["queue_rule"] and held["jump"]):
                gone.append("NFQUEUE rule")
            elif hop.queue not in held["bound"]:
                gone.append("daemon (queue unbound: packets pass)")
        return gone

    def show(self) -> list[dict]:
        """One row per line direction: what is in force, by which mechanism, and its counters;
        `kernel` says whether the kernel holds the rules (a row's plan alone proves nothing)."""
        daemon = self.daemon()
        queues = {(q["line"], q["dir"]): q for q in daemon["queues"]}
        kernel = self.kernel()
        if self.queue_refused():  # bound, but by another process: this run's packets are not held
            for held in kernel.values():
                held["bound"].discard(self.queue)
        rows = []
        for li in self.lines():
            for h in li.hops:
                q = queues.get((li.line, h.direction), {})
                held = kernel.get(h.namespace, {})
                gone = self.missing(li, h, held) if held else ["namespace"]
                rows.append(
                    {
                        "line": li.line,
                        "dir": f"{h.src} -> {h.dst}",
                        "kind": li.kind,
                        "impair": li.shape.describe(),
                        "from": "link set" if li.line in self.overrides else "file",
                        "mechanism": li.mechanism,
                        "kernel": "-" if li.shape.empty else ("in force" if not gone else "MISSING " + ", ".join(gone)),
                        "packets": q.get("packets", 0 if li.queued else None),
                        "held_now": q.get("held_now"),
                        "dropped": held.get("loss", {}).get((li.line, h.direction), 0) + (q.get("dropped") or 0),
                        "lag_mean_ms": q.get("lag_mean_ms"),
                        "lag_max_ms": q.get("lag_max_ms"),
                    }
                )
        return rows


def stop_run(directory: Path, grace: float = 2.0) -> None:
    """SIGTERM a run's supervisor (it stops the daemon and cleans up), SIGKILL after `grace`; remove the run's state."""
    pid_file = directory / "supervisor.pid"
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        pid = None
    if _pid_alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        if _pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
    sup = _read_json(directory / "status.json.supervisor")
    if _pid_alive(sup.get("daemon_pid")):  # the supervisor was killed before its daemon
        os.kill(sup["daemon_pid"], signal.SIGKILL)
    if (directory / "daemon.json").exists() and pid is not None:
        run_cleanup(str(directory / "daemon.json"))
    for name in ("state.json", "supervisor.pid", "daemon.json", "status.json", "status.json.supervisor"):
        (directory / name).unlink(missing_ok=True)


def stop_netns_runs(prefix: str, spare: set[str] = frozenset()) -> None:
    """Every netns run whose namespaces `konbini down` removes (prefix), but those of `spare` prefixes."""
    if not RUN_ROOT.exists():
        return
    for d in RUN_ROOT.iterdir():
        p = d.name + "-"
        if d.is_dir() and p.startswith(prefix) and not any(p.startswith(s) for s in spare):
            stop_run(d)
