"""`konbini node list|kill|stop|start|restart`: faults injected into a running topology, one node's
process at a time, in both modes; and the supervision `up` runs them under (`--restart`).

The running launcher does the work (topology/launch/supervisor.py): this command hands it a
request and prints the event it answers with, as `up` prints it and events.log keeps it.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from topology.cli.common import UserError, load, state_dir
from topology.cli.render import show
from topology.launch.netns import net_dir
from topology.launch.supervisor import ACTIONS, POLICIES, RestartPolicy, Supervisor, ask, launcher_pid
from topology.spec.model import Mode

ANSWER_TIMEOUT = 120.0  # a restart waits for the process to be ready: seconds, minutes for a large part


def supervise(hosts, run_dir: Path, args, mode: Mode, console: Console) -> Supervisor:
    """`up`'s supervisor over its node processes: `--restart`'s policy, `konbini node`'s requests,
    every event printed as it happens."""
    policy = RestartPolicy(getattr(args, "restart", None) or POLICIES[0])
    return Supervisor(
        hosts, run_dir, policy, mode, lambda line: console.print(line, markup=False, highlight=False, soft_wrap=True)
    )


def _run_dir(args) -> Path:
    """The supervised run these arguments name: --netns, --loopback, or the only one running."""
    sdir = state_dir(args, load(args.topology))
    runs = {Mode.LOOPBACK: sdir / "processes", Mode.NETNS: net_dir(sdir) / "processes"}
    live = {mode: d for mode, d in runs.items() if launcher_pid(d) is not None}
    if args.netns or args.loopback:
        mode = Mode.NETNS if args.netns else Mode.LOOPBACK
        if mode not in live:
            raise UserError(
                f"no {mode} topology with node processes runs on state {sdir} "
                f"(start one with `konbini up {'--netns' if args.netns else '--processes N'}`)"
            )
        return live[mode]
    if len(live) > 1:
        raise UserError("a netns and a loopback topology both run on this state; say --netns or --loopback")
    if not live:
        raise UserError(
            f"no topology with node processes runs on state {sdir} (start one with "
            "`konbini up --processes N` or `konbini up --netns`; a one-process `konbini up` has "
            "no process per node to act on)"
        )
    return next(iter(live.values()))


def cmd_node(args) -> int:
    run_dir = _run_dir(args)
    if args.node_cmd == "list":
        return _list(run_dir, args.json)
    answer = ask(run_dir, args.node_cmd, args.node, ANSWER_TIMEOUT)
    if answer is None:
        raise UserError(f"the launcher did not answer within {ANSWER_TIMEOUT:.0f} s (see {run_dir / 'events.log'})")
    rc, line = answer
    if rc == 2:
        raise UserError(line)
    print(line)
    return rc


def _list(run_dir: Path, as_json: bool) -> int:
    status = json.loads((run_dir / "status.json").read_text())
    if as_json:
        print(json.dumps(status))
        return 0
    show(
        Console(),
        f"node processes ({status['mode']}, restart policy {status['policy']}; events: {run_dir / 'events.log'})",
        ("process", "state", "pid", "restarts", "since", "nodes"),
        [
            (p["process"], p["state"], str(p["pid"] or "-"), str(p["restarts"]), p["since"], ", ".join(p["nodes"]))
            for p in status["processes"]
        ],
    )
    return 0


def register(sub) -> None:
    """`konbini node …` on the `konbini` subparsers."""
    n = sub.add_parser(
        "node", help="inject a fault into a running topology: kill, stop, start or restart one node's process"
    )
    nsub = n.add_subparsers(dest="node_cmd", required=True)
    helps = {
        "list": "the node processes: state, pid, restarts and the nodes each serves",
        "kill": "SIGKILL the process serving NODE, as a crash; the restart policy of `up` brings it back",
        "stop": "stop the process serving NODE; it stays down until `konbini node start`",
        "start": "start the process serving NODE again",
        "restart": "stop the process serving NODE and start it again",
    }
    for action in ("list", *ACTIONS):
        q = nsub.add_parser(action, help=helps[action])
        if action == "list":
            q.add_argument("--json", action="store_true", help="print the status as one JSON object")
        else:
            q.add_argument("node", help="node id (e.g. dmz-relay-a1); its whole process is acted on, and named")
        q.add_argument("--topology", help="topology file (for its state directory)")
        q.add_argument("--state", help="state directory of the running topology")
        m = q.add_mutually_exclusive_group()
        m.add_argument("--netns", action="store_true", help="the running netns topology")
        m.add_argument("--loopback", action="store_true", help="the running loopback topology (`up --processes N`)")
        q.set_defaults(func=cmd_node)


def add_restart_option(up) -> None:
    """`up --restart`: what happens to a node process that dies."""
    up.add_argument(
        "--restart",
        choices=POLICIES,
        default=POLICIES[0],
        help="a node process that dies unasked: on-failure restarts it (at once, then backing off up to "
        "30 s while it keeps dying), no leaves it down while the rest serve (default %(default)s)",
    )
