"""Keep a running topology's node processes up, and act on one of them when a user asks.

Theory of operation. The launcher (`konbini up --processes N`, `konbini up --netns`) forked every
nodehost and is the only process that can fork one again (the children inherit its topology and
PKI), so it supervises them: each tick it reaps the ones that exited, reports them, and restarts
them under a restart policy (`RestartPolicy`), as Docker and systemd do. A user's fault (`konbini
node kill|stop|start|restart NODE`, topology/cli/node.py) reaches it as a request file under
RUN_DIR/requests; the tick carries it out on the process serving NODE and answers in a `.done`
file once the asked-for state is reached. Two rules: only a process that exited without being
asked to (a crash, or `node kill`) is restarted by the policy; a stopped one stays down until
`node start`. Every event goes to RUN_DIR/events.log with the time, and the processes' state to
RUN_DIR/status.json (`konbini node list`).
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from topology.launch.netns import NetnsError, Nodehost
from topology.spec.model import Mode

ACTIONS = ("kill", "stop", "start", "restart")
POLICIES = ("on-failure", "no")


@dataclass(frozen=True)
class RestartPolicy:
    """When a process that exited unasked starts again: at once, then after 1, 2, 4 … s (at most
    `max_delay_s`) while it keeps dying within `steady_s` of its start; "no": it stays down and
    the others keep serving."""

    name: str = "on-failure"
    max_delay_s: float = 30.0
    steady_s: float = 60.0

    def delay(self, crashes: int) -> float | None:
        """Seconds before the restart after `crashes` quick crashes in a row; None: no restart."""
        if self.name == "no":
            return None
        return 0.0 if crashes <= 1 else min(self.max_delay_s, 2.0 ** (crashes - 2))


@dataclass
class Slot:
    """One node process as the supervisor sees it. `state`: up, restarting (at `due`), stopped
    (a user's `node stop`) or down (died under policy "no")."""

    host: Nodehost
    started: float
    state: str = "up"
    due: float = 0.0
    restarts: int = 0
    crashes: int = 0  # quick crashes in a row (`RestartPolicy.delay`)
    asked: str | None = None  # the exit a user asked for: kill, stop or restart
    waiting: list[Path] = field(default_factory=list)  # requests answered when the asked-for state is reached

    @property
    def name(self) -> str:
        return self.host.job[0]

    @property
    def nodes(self) -> list[str]:
        return self.host.job[2]


def nodes_text(nodes: list[str], most: int = 3) -> str:
    return ", ".join(nodes[:most]) + (f" and {len(nodes) - most:,} more" if len(nodes) > most else "")


def stamp(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def launcher_pid(run_dir: Path) -> int | None:
    """The pid of the live launcher supervising `run_dir`, else None."""
    try:
        pid = json.loads((run_dir / "status.json").read_text())["launcher"]
        os.kill(pid, 0)
        state = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1]
    except (OSError, ValueError, KeyError, IndexError):
        return None
    return None if state.startswith("Z") else pid


class Supervisor:
    """The launcher's view of its nodehosts; `tick()` from its wait loop, `hosts` to stop them all."""

    def __init__(
        self, hosts: list[Nodehost], run_dir: Path, policy: RestartPolicy, mode: Mode, say: Callable[[str], None]
    ) -> None:
        self.slots = {h.job[0]: Slot(h, time.time()) for h in hosts}
        self.serving = {n: name for name, slot in self.slots.items() for n in slot.nodes}
        self.policy, self.mode, self.say = policy, mode, say
        self.run_dir = run_dir
        self.requests = run_dir / "requests"
        self.requests.mkdir(parents=True, exist_ok=True)
        for old in self.requests.iterdir():  # a previous run's, never to be answered
            old.unlink(missing_ok=True)
        self.events = (run_dir / "events.log").open("a", buffering=1)
        self._write_status()

    @property
    def hosts(self) -> list[Nodehost]:
        return [slot.host for slot in self.slots.values()]

    def close(self) -> None:
        self.events.close()
        (self.run_dir / "status.json").unlink(missing_ok=True)  # no launcher answers any more

    # -- the tick ------------------------------------------------------------------------------

    def tick(self) -> None:
        changed = self._take_requests()
        now = time.time()
        for slot in self.slots.values():
            if slot.state == "up" and slot.host.poll() is not None:
                self._exited(slot, now)
                changed = True
            if slot.state == "restarting" and slot.due <= time.time():
                self._start(slot)
                changed = True
        if changed:
            self._write_status()

    def _exited(self, slot: Slot, now: float) -> None:
        code, asked, slot.asked = slot.host.returncode, slot.asked, None
        slot.host.close()
        what = f"{slot.name} ({nodes_text(slot.nodes)}) pid {slot.host.pid} exited ({_status(code)})"
        if asked == "stop":
            slot.state = "stopped"
            self._answer(
                slot, self._event(f"{what}: stopped by `konbini node stop`; stays down until `konbini node start`")
            )
            return
        if asked == "restart":
            self._event(f"{what}: restarting (`konbini node restart`)")
            slot.state, slot.due = "restarting", now
            return
        slot.crashes = slot.crashes + 1 if now - slot.started < self.policy.steady_s else 1
        delay = self.policy.delay(slot.crashes)
        why = " (`konbini node kill`)" if asked == "kill" else ""
        if delay is None:
            slot.state = "down"
            self._answer(slot, self._event(f"{what}{why}; stays down (--restart no); the other processes keep serving"))
            return
        slot.state, slot.due = "restarting", now + delay
        self._answer(
            slot,
            self._event(
                f"{what}{why}; restarting {'now' if not delay else f'in {delay:.0f} s'} "
                f"(--restart {self.policy.name}, crash {slot.crashes} in a row)"
            ),
        )

    def _start(self, slot: Slot) -> None:
        t0 = time.time()
        others = [s.host for s in self.slots.values() if s is not slot and s.state == "up"]
        try:
            slot.host = slot.host.again(siblings=others)
        except NetnsError as exc:
            slot.crashes += 1
            delay = self.policy.delay(slot.crashes)
            slot.state, slot.due = ("down", 0.0) if delay is None else ("restarting", time.time() + delay)
            self._answer(
                slot,
                self._event(
                    f"{slot.name} did not start: {exc}" + ("" if delay is None else f"; next try in {delay:.0f} s")
                ),
            )
            return
        slot.state, slot.started, slot.restarts = "up", time.time(), slot.restarts + 1
        self._answer(
            slot,
            self._event(
                f"{slot.name} ({nodes_text(slot.nodes)}) up again: pid {slot.host.pid}, "
                f"ready in {time.time() - t0:.1f} s (restart {slot.restarts})"
            ),
        )

    # -- requests from `konbini node` ----------------------------------------------------------

    def _take_requests(self) -> bool:
        taken = False
        for path in sorted(self.requests.glob("*.json")):
            try:
                req = json.loads(path.read_text())
                action, node = req["action"], req["node"]
            except (OSError, ValueError, KeyError):
                continue  # still being written (the client renames it in whole) or not ours
            taken = True
            reply = path.with_suffix(".done")
            path.unlink(missing_ok=True)
            name = self.serving.get(node)
            if name is None:
                _reply(
                    reply,
                    2,
                    f"{node!r} is served by no process here (client nodes have no process; "
                    f"`konbini node list` shows which serve what)",
                )
                continue
            self._act(self.slots[name], action, node, reply)
        return taken

    def _act(self, slot: Slot, action: str, node: str, reply: Path) -> None:
        shared = [n for n in slot.nodes if n != node]
        also = f"; it also serves {nodes_text(shared)}" if shared else ""
        if action not in ACTIONS:
            _reply(reply, 2, f"unknown action {action!r}; one of {', '.join(ACTIONS)}")
            return
        if action in ("kill", "stop") and slot.state != "up":
            if action == "stop" and slot.state in ("restarting", "down"):
                was, slot.state = slot.state, "stopped"
                _reply(
                    reply,
                    0,
                    self._event(
                        f"{slot.name} ({nodes_text(slot.nodes)}) was {was}: held down until `konbini node start`"
                    ),
                )
            else:
                _reply(
                    reply,
                    1,
                    f"{slot.name} ({node}) is not running ({slot.state}); `konbini node start {node}` starts it",
                )
            return
        if action == "start" and slot.state == "up":
            _reply(reply, 1, f"{slot.name} ({node}) is already up, pid {slot.host.pid}")
            return
        slot.waiting.append(reply)
        if action == "start" or (action == "restart" and slot.state != "up"):
            self._event(f"{slot.name} starting (`konbini node {action} {node}`){also}")
            slot.state, slot.due, slot.crashes = "restarting", 0.0, 0
            return
        sig = signal.SIGKILL if action == "kill" else signal.SIGTERM
        self._event(f"{slot.name} pid {slot.host.pid}: {sig.name} (`konbini node {action} {node}`){also}")
        slot.asked = action
        try:
            os.kill(slot.host.pid, sig)
        except ProcessLookupError:
            pass  # it died on its own just now: the tick reaps it as asked

    def _answer(self, slot: Slot, line: str) -> None:
        for reply in slot.waiting:
            _reply(reply, 0, line)
        slot.waiting.clear()

    # -- what the user and `konbini node list` see -----------------------------------------------

    def _event(self, text: str) -> str:
        line = f"{stamp(time.time())} {text}"
        self.events.write(line + "\n")
        self.say(line)
        return line

    def _write_status(self) -> None:
        status = {
            "launcher": os.getpid(),
            "mode": self.mode,
            "policy": self.policy.name,
            "processes": [
                {
                    "process": s.name,
                    "pid": s.host.pid if s.state == "up" else None,
                    "state": s.state,
                    "restarts": s.restarts,
                    "since": stamp(s.started),
                    "nodes": s.nodes,
                }
                for s in self.slots.values()
            ],
        }
        tmp = self.run_dir / "status.json.tmp"
        tmp.write_text(json.dumps(status))
        tmp.replace(self.run_dir / "status.json")


def _status(code: int | None) -> str:
    if code is not None and code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit status {code}"


def _reply(path: Path, rc: int, line: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"rc": rc, "line": line}))
    tmp.replace(path)


def ask(run_dir: Path, action: str, node: str, timeout: float) -> tuple[int, str] | None:
    """Hand `action` on `node` to the launcher supervising `run_dir` and wait (at most `timeout`
    seconds, polling) for its answer: (exit status, the event line); None if it never came."""
    requests = run_dir / "requests"
    rid = f"{time.time_ns()}-{os.getpid()}"
    tmp = requests / f"{rid}.new"
    tmp.write_text(json.dumps({"action": action, "node": node}))
    tmp.replace(requests / f"{rid}.json")  # whole, or not at all, when the launcher looks
    done = requests / f"{rid}.done"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and launcher_pid(run_dir) is not None:
        if done.exists():
            answer = json.loads(done.read_text())
            done.unlink(missing_ok=True)
            return answer["rc"], answer["line"]
        time.sleep(0.05)
    return None
