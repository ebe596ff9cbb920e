"""The netns-mode commands of `konbini`: up --netns, down, policy show/check, link set, issue --netns.

The same error style as every command: one line `konbini: <what>`, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

from topology.check import policy as policycheck
from topology.cli.common import UserError, load, state_dir
from topology.launch import netns
from topology.netns.plan import PlanError, build_plan, namespace_prefix
from topology.pki import PKI
from topology.policy.nft import compile_ruleset
from topology.spec.model import Impairment


def _plan(topo, tag):
    try:
        return build_plan(topo, tag)
    except PlanError as exc:
        raise UserError(str(exc)) from None


def _user_errors(fn):
    """NetnsError/PlanError -> UserError (one line for the user)."""

    def wrapper(args):
        try:
            return fn(args)
        except (netns.NetnsError, PlanError) as exc:
            raise UserError(str(exc)) from None

    return wrapper


# -- up --netns ------------------------------------------------------------------------------------


@_user_errors
def cmd_up_netns(args) -> int:
    from rich.console import Console
    from rich.table import Table

    netns.require_root("`konbini up --netns`")
    topo = load(args.file)
    plan = _plan(topo, getattr(args, "tag", None))
    sdir = state_dir(args, topo)
    console = Console()
    t0 = time.perf_counter()
    sdir.mkdir(parents=True, exist_ok=True)
    PKI.ensure(sdir, topo)  # once here, so the node processes only load it
    net_s = netns.create_network(plan, sdir)
    netns.register_launcher(plan.prefix)
    hosts = []
    try:
        warnings = netns.apply_impairments(plan)
        hosts = netns.start_nodehosts(plan, topo.source, sdir, args.clock, args.clock_speed)
        up_s = time.perf_counter() - t0
        table = Table(title=f"konbini topology {topo.name!r} (netns)")
        for col in ("node", "kind", "namespace", "address", "ready"):
            table.add_column(col)
        for node in topo.nodes.values():
            addr = node.address_in("netns")
            table.add_row(node.id, node.kind, plan.namespace(node.site), f"{addr}:{node.port}" if node.port else addr,
                          "listening" if node.is_server else "client")
        console.print(table)
        for w in warnings:
            console.print(f"[yellow]warning[/] {w}")
        console.print(
            f"[bold green]ready[/] in {up_s * 1000:.0f} ms ({len(plan.sites)} namespaces, {len(plan.veths)} veths, "
            f"network {net_s * 1000:.0f} ms); e.g. `ip netns exec {plan.namespace(topo.of_kind('kiosk')[0].site) if topo.of_kind('kiosk') else plan.prefix + '…'} "
            f"konbini issue --netns`; Ctrl-C or `konbini down` stops."
        )
        stop = {"now": False}

        def on_signal(signum, frame):
            stop["now"] = True

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        while not stop["now"]:
            if any(h.poll() is not None for h in hosts):
                dead = next(h for h in hosts if h.poll() is not None)
                console.print(f"[red]nodes of {dead.site} exited[/] (see {netns.net_dir(sdir) / 'logs' / dead.site}.log); stopping.")
                break
            time.sleep(0.2)
    finally:
        t1 = time.perf_counter()
        netns.stop_nodehosts(hosts)
        netns.teardown(plan.prefix, sdir)
        console.print(f"stopped; namespaces removed in {(time.perf_counter() - t1) * 1000:.0f} ms.")
    return 0


# -- down ------------------------------------------------------------------------------------------


@_user_errors
def cmd_down(args) -> int:
    t0 = time.perf_counter()
    sdir = Path(args.state) if args.state else None
    if sdir is None:
        try:
            sdir = state_dir(args, load(args.topology))
        except UserError:
            sdir = None
    removed, killed = netns.teardown(namespace_prefix(args.tag), sdir)
    print(f"removed {len(removed)} namespaces, stopped {killed} processes in {(time.perf_counter() - t0) * 1000:.0f} ms")
    return 0


# -- policy show / check -------------------------------------------------------------------------


def cmd_policy_show(args) -> int:
    topo = load(args.file)
    plan = _plan(topo, args.tag)
    if args.site and args.site not in plan.sites:
        raise UserError(f"unknown site {args.site!r}; sites: {', '.join(plan.sites)}")
    for site in [args.site] if args.site else list(plan.sites):
        print(compile_ruleset(topo, site, plan))
    return 0


@_user_errors
def cmd_policy_check(args) -> int:
    topo = load(args.file)
    sdir = state_dir(args, topo)
    plan = None
    if args.netns:
        netns.require_root("`konbini policy check --netns`")
        plan = _plan(topo, args.tag)
        missing = sorted(set(s.namespace for s in plan.sites.values()) - set(netns.list_namespaces(plan.prefix)))
        if missing:
            raise UserError(f"namespace {missing[0]} does not exist; start `konbini up --netns` first")
    report = policycheck.check(topo, sdir, netns=args.netns, plan=plan, timeout=args.timeout)
    if args.report:
        md, js = policycheck.write_report(report, Path(args.report))
    if args.json:
        print(json.dumps({k: v for k, v in report.items() if k != "results"}))
    else:
        print(policycheck.render_markdown(report), end="")
        if args.report:
            print(f"report: {md} and {js}")
    return 0 if report["ok"] else 1


# -- link set --------------------------------------------------------------------------------------


@_user_errors
def cmd_link_set(args) -> int:
    topo = load(args.topology)
    plan = _plan(topo, args.tag)
    impair = None if args.clear else Impairment(delay=args.delay, jitter=args.jitter, loss=args.loss, rate=args.rate)
    if impair is not None and not netns.netem_args(impair):
        raise UserError("give --delay, --jitter with --delay, --loss or --rate (or --clear)")
    for cmd in netns.set_link(plan, args.line, impair):
        print(cmd)
    return 0


# -- issue --netns -------------------------------------------------------------------------------


def enter_kiosk_namespace(topo, kiosk_id: str, tag: str | None) -> None:
    """Re-run this `konbini issue` inside the kiosk's namespace unless we are already there
    (its netns address is bindable here). Returns only when already inside."""
    addr = topo.node(kiosk_id).address_in("netns")
    s = socket.socket()
    try:
        s.bind((addr, 0))
        return
    except OSError:
        pass
    finally:
        s.close()
    if os.environ.get("KONBINI_IN_NETNS"):
        raise UserError(f"{addr} ({kiosk_id}) is not an address of this namespace")
    try:
        netns.require_root("`konbini issue --netns`")
    except Exception as exc:
        raise UserError(str(exc)) from None
    ns = _plan(topo, tag).namespace(topo.node(kiosk_id).site)
    if not Path(f"/run/netns/{ns}").exists():
        raise UserError(f"namespace {ns} does not exist; start `konbini up --netns` first")
    os.environ["KONBINI_IN_NETNS"] = "1"
    sys.stdout.flush()
    # not `-m topology.cli`: that would load the CLI twice (as __main__ too) and split UserError
    entry = "import sys; from topology.cli.main import main; sys.exit(main(sys.argv[1:]))"
    os.execvp("ip", ["ip", "netns", "exec", ns, sys.executable, "-c", entry, *sys.argv[1:]])


# -- parser --------------------------------------------------------------------------------------


def register(sub) -> None:
    """Add down, policy and link to the `konbini` subparsers."""
    d = sub.add_parser("down", help="remove every konbini-* namespace and stop its node processes (root)")
    d.add_argument("--topology", help="topology file (for its state directory)")
    d.add_argument("--state", help="state directory (pid files under net/pids)")
    d.add_argument("--tag", help="only namespaces konbini-TAG-*")
    d.set_defaults(func=cmd_down)

    p = sub.add_parser("policy", help="the compiled policy: nftables rules, reachability probes")
    psub = p.add_subparsers(dest="policy_cmd", required=True)
    ps = psub.add_parser("show", help="print the nftables ruleset of every site (or one)")
    ps.add_argument("file", nargs="?", help="topology file")
    ps.add_argument("--site", help="only this site's namespace")
    ps.add_argument("--tag", help=argparse.SUPPRESS)
    ps.set_defaults(func=cmd_policy_show)
    pc = psub.add_parser("check", help="probe the expected reachability matrix; exit 1 on any difference")
    pc.add_argument("file", nargs="?", help="topology file")
    pc.add_argument("--netns", action="store_true", help="probe the running netns topology from inside each namespace (root)")
    pc.add_argument("--state", help="state directory")
    pc.add_argument("--tag", help="namespaces konbini-TAG-* (as given to `up --netns --tag`)")
    pc.add_argument("--json", action="store_true", help="print the report summary as one JSON object")
    pc.add_argument("--report", help="write report.md and report.json into this directory")
    pc.add_argument("--timeout", type=float, default=0.5, help="seconds to wait for replies (default 0.5)")
    pc.set_defaults(func=cmd_policy_check)

    lk = sub.add_parser("link", help="line impairments of a running netns topology (root)")
    lsub = lk.add_subparsers(dest="link_cmd", required=True)
    ls = lsub.add_parser("set", help="tc netem on both ends of LINE, e.g. --delay 20ms --loss 0.1%%")
    ls.add_argument("line")
    ls.add_argument("--topology", help="topology file")
    ls.add_argument("--tag", help="namespaces konbini-TAG-*")
    ls.add_argument("--delay")
    ls.add_argument("--jitter")
    ls.add_argument("--loss")
    ls.add_argument("--rate")
    ls.add_argument("--clear", action="store_true", help="remove the impairment")
    ls.set_defaults(func=cmd_link_set)
