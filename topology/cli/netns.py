"""The netns-mode commands of `konbini`: up --netns, down, policy show/check, link set, issue --netns.

The same error style as every command: one line `konbini: <what>`, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import sys
import time
from pathlib import Path

from topology.check import outside
from topology.check import policy as policycheck
from topology.check import report as policyreport
from topology.check.mutate import run_mutations
from topology.cli.common import UserError, load, state_dir
from topology.cli.expand import write_expanded
from topology.cli.node import supervise
from topology.cli.render import show, show_nodes
from topology.launch import impair, netns
from topology.netns.impair import ImpairError, Shape
from topology.netns.plan import PlanError, build_plan, namespace_prefix
from topology.pki import PKI
from topology.policy.nft import compile_ruleset
from topology.spec.model import Impairment, Mode
from topology.spec.part import PartError, part

NETNS_NODE_LIMIT = 20_000  # a namespace per site; past this, `up --netns` asks for --sites (docs/national.md)


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

    netns.require_root("`konbini up --netns`")
    topo = load(args.file)
    console = Console()
    sites = [p.strip() for p in args.sites.split(",") if p.strip()] if getattr(args, "sites", None) else None
    if sites:
        try:
            topo, notes = part(topo, sites)
        except PartError as exc:
            raise UserError(str(exc)) from None
        for note in notes:
            console.print(f"[yellow]sites[/] {note}")
        topo = _write_part(topo, state_dir(args, topo))
    elif len(topo.nodes) > NETNS_NODE_LIMIT:
        raise UserError(
            f"{topo.name!r} has {len(topo.nodes):,} nodes, too many for a namespace per site; bring up a "
            f"part with --sites (e.g. --sites 'store-a0000[1-9]'), or run it in loopback mode "
            f"(`konbini up {args.file or ''} --processes N`)"
        )
    processes = getattr(args, "processes", None)
    if processes is not None and processes < 1:
        raise UserError(f"--processes must be at least 1, not {processes}")
    plan = _plan(topo, getattr(args, "tag", None))
    sdir = state_dir(args, topo)
    t0 = time.perf_counter()
    sdir.mkdir(parents=True, exist_ok=True)
    pki = PKI.ensure(sdir.resolve(), topo)  # once here: the node processes inherit it
    net_s = netns.create_network(plan, sdir, sites)
    netns.register_launcher(plan.prefix)
    hosts, supervisor = [], None
    try:
        warnings = netns.apply_impairments(plan, sdir)
        lines = impair.Impairments(topo, Mode.NETNS, plan, sdir)
        hosts = netns.start_nodehosts(
            plan, topo.source, sdir, args.clock, args.clock_speed, pki=pki, processes=processes
        )
        up_s = time.perf_counter() - t0
        supervisor = supervise(hosts, netns.net_dir(sdir) / "processes", args, Mode.NETNS, console)
        show_nodes(
            console,
            topo,
            f"konbini topology {topo.name!r} (netns, {len(plan.sites):,} namespaces {plan.prefix}SITE)",
            {n for n in topo.nodes if topo.nodes[n].is_server},
            processes=[(h.job[0], h.pid, h.job[2]) for h in hosts],
            address=lambda node: node.address_in(Mode.NETNS),
        )
        for w in warnings:
            console.print(f"[yellow]lines[/] {w}")
        console.print(
            f"[bold green]ready[/] in {up_s * 1000:.0f} ms ({len(plan.sites)} namespaces, {len(plan.veths)} veths, "
            f"network {net_s * 1000:.0f} ms, {len(hosts)} node processes); e.g. `ip netns exec {plan.namespace(topo.of_kind('kiosk')[0].site) if topo.of_kind('kiosk') else plan.prefix + '…'} "
            f"konbini issue --netns`; `konbini node kill|stop|start|restart NODE --netns` injects a fault; "
            f"Ctrl-C or `konbini down` stops.",
            soft_wrap=True,
        )
        if plan.monitoring is not None:  # issue 14: where to scrape (only from the monitoring namespace)
            cert, key = pki.principal_paths("monitoring")
            first = next((n for n in topo.nodes.values() if n.is_server), None)
            console.print(
                f"[bold]metrics[/] https://<node address>:9464/metrics on every listening node, only from namespace "
                f"{plan.monitoring.namespace} ({plan.monitoring.address}) with the monitoring certificate:\n"
                f"  ip netns exec {plan.monitoring.namespace} curl --cacert {pki.network_ca_path} --cert {cert} "
                f"--key {key} --resolve {first.id}:9464:{first.address_in('netns')} https://{first.id}:9464/metrics"
                if first
                else "",
                soft_wrap=True,
            )
        stop = {"now": False}

        def on_signal(signum, frame):
            stop["now"] = True

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        restarts, reported_down = 0, False
        watch = (lines.dir / "supervisor.pid").exists()  # a daemon runs: say when it restarts or goes down
        while not stop["now"]:
            daemon = lines.daemon() if watch else {}
            if daemon and (daemon["restarts"] or 0) > restarts:
                restarts = daemon["restarts"]
                console.print(
                    f"[yellow]impairment daemon restarted[/] ({restarts} so far; see {lines.dir / 'impaird.log'})"
                )
            if daemon and daemon["down"] and not reported_down:
                reported_down = True
                console.print(
                    f"[red]impairment daemon down[/]: {daemon.get('note') or 'supervisor gone'}; lines pass unimpaired"
                )
            supervisor.tick()
            time.sleep(0.2)
    finally:
        t1 = time.perf_counter()
        if supervisor is not None:
            hosts = supervisor.hosts
            supervisor.close()
        netns.stop_nodehosts(hosts)
        netns.teardown(plan.prefix, sdir)
        console.print(f"stopped; namespaces removed in {(time.perf_counter() - t1) * 1000:.0f} ms.")
    return 0


def _write_part(topo, sdir: Path):
    """The part, written out in full as net/part.yaml and loaded back from there: the node
    processes, the policy check's probes in every namespace and `issue --netns` all read that file
    (`netns.running_part`), so they agree on its nodes and netns addresses."""
    path = netns.net_dir(sdir) / "part.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as out:
        write_expanded(topo, out)
    return load(str(path))


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
    print(
        f"removed {len(removed)} namespaces, stopped {killed} processes in {(time.perf_counter() - t0) * 1000:.0f} ms"
    )
    return 0


# -- policy show / check -------------------------------------------------------------------------


def cmd_policy_show(args) -> int:
    topo = load(args.file)
    plan = _plan(topo, args.tag)
    if args.site and args.site not in plan.sites:
        raise UserError(f"unknown site {args.site!r}; sites: {', '.join(plan.sites)}")
    for site in [args.site] if args.site else list(plan.sites):
        ruleset = compile_ruleset(topo, site, plan)
        print(ruleset)
        for line in rule_origin_lines(topo, ruleset):
            print(line)
    return 0


def rule_origin_lines(topo, ruleset: str) -> list[str]:
    """For a compact file: the template line each allow entry named in `ruleset` came from (an
    auditor reads the expanded rule and where it was written). Explicit files: none to add, the
    entry is where its name says."""
    if not topo.rule_origins:
        return []
    named = dict.fromkeys(re.findall(r"nodes\.[\w.-]+\.allow\[\d+\]", ruleset))
    return [f"# {rule} <- {topo.rule_origins[rule]}" for rule in named if rule in topo.rule_origins]


def _running_plan(topo, tag, what: str, sdir: Path):
    """The plan of the running netns topology (root; its namespaces must exist): of `topo`, or of
    the part of it that `up --netns --sites` started (its `plan.topo`)."""
    netns.require_root(what)
    plan = _plan(netns.running_part(topo, sdir), tag)
    missing = sorted(set(netns.all_namespaces(plan)) - set(netns.list_namespaces(plan.prefix)))
    if missing:
        raise UserError(f"namespace {missing[0]} does not exist; start `konbini up --netns` first")
    return plan


@_user_errors
def cmd_policy_check(args) -> int:
    topo = load(args.file)
    sdir = state_dir(args, topo)
    plan = _running_plan(topo, args.tag, "`konbini policy check --netns`", sdir) if args.netns else None
    topo = plan.topo if plan is not None else topo
    extra = None
    if args.netns and not args.no_outside_tools:
        extra = outside.run_outside_tools(topo, plan, sdir)
    report = policycheck.check(topo, sdir, netns=args.netns, plan=plan, timeout=args.timeout, extra=extra)
    if args.report:
        md, js = policyreport.write_report(report, Path(args.report))
    if args.json:
        print(json.dumps({k: v for k, v in report.items() if k != "results"}))
    else:
        print(policyreport.render_markdown(report), end="")
        if args.report:
            print(f"report: {md} and {js}")
    return 0 if report["ok"] else 1


@_user_errors
def cmd_policy_mutate(args) -> int:
    topo = load(args.file)
    plan = (
        _running_plan(topo, args.tag, "`konbini policy mutate --netns`", state_dir(args, topo)) if args.netns else None
    )
    topo = plan.topo if plan is not None else topo
    try:
        result = run_mutations(topo, Mode.NETNS if args.netns else Mode.LOOPBACK, plan, args.timeout)
    except (ValueError, RuntimeError) as exc:
        raise UserError(str(exc)) from None
    if args.report:
        Path(args.report).mkdir(parents=True, exist_ok=True)
        (Path(args.report) / "mutation.json").write_text(json.dumps(result, indent=1))
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"mutation score {result['score']} %: {result['caught']} of {result['mutants']} mutants caught "
            f"({result['pairs_checked']} pairs checked per mutant, {result['elapsed_s']} s)"
        )
        for kind, k in result["by_kind"].items():
            print(f"  {kind}: {k['caught']}/{k['mutants']}")
        if "netns" in result:
            live = result["netns"]
            print(
                f"  nft-rule-dropped: {len(live['mutants'])} accept rules in {live['namespaces']} namespaces, each probed and "
                f"restored, {live['elapsed_s']} s; full probe plan ({live['probes_full_run']} probes) before: pass, "
                f"after: {'pass' if live['after_ok'] else 'FAIL'}; differences off the dropped rule's connection: {live['unexplained']} "
                f"(after {live['reruns']} reruns)"
            )
        for m in result["survivors"]:
            print(f"  SURVIVED {m['kind']}: {m['description']}")
    return 0 if result["caught"] == result["mutants"] and result.get("netns", {}).get("after_ok", True) else 1


# -- link set / reset / show ----------------------------------------------------------------------


def _running_lines(args) -> impair.Impairments:
    """The impairments of the running topology these arguments name: netns (--netns/--tag, or the
    only run there is) or loopback (--loopback, or the state directory's run)."""
    topo = load(args.topology)
    sdir = state_dir(args, topo)
    netns_run = impair.run_dir(Mode.NETNS, namespace_prefix(args.tag)) / "state.json"
    loop_run = impair.run_dir(Mode.LOOPBACK, state_dir=sdir) / "state.json"
    if args.netns or args.tag:
        mode = Mode.NETNS
    elif args.loopback:
        mode = Mode.LOOPBACK
    elif netns_run.exists() and loop_run.exists():
        raise UserError("a netns and a loopback topology are both running; say --netns or --loopback")
    else:
        mode = Mode.NETNS if netns_run.exists() else Mode.LOOPBACK
    if os.geteuid() != 0:
        raise UserError("`konbini link` needs root (line impairments are kernel rules); run it with sudo")
    plan = (
        _plan(netns.running_part(topo, sdir), args.tag) if mode == Mode.NETNS else None
    )  # a part's lines, as `up --sites` ran them
    return impair.Impairments.attach(plan.topo if plan else topo, mode, plan, sdir)


def _link_errors(fn):
    def wrapper(args):
        try:
            return fn(args)
        except (impair.LineError, ImpairError, PlanError) as exc:
            raise UserError(str(exc)) from None

    return wrapper


@_link_errors
def cmd_link_set(args) -> int:
    value = Impairment(delay=args.delay, jitter=args.jitter, loss=args.loss, rate=args.rate)
    if not args.clear and Shape.of(value).empty:
        raise UserError("give --delay (and --jitter), --loss or --rate, or --clear")
    lines = _running_lines(args)
    print(lines.change(args.line, None if args.clear else value))
    return 0


@_link_errors
def cmd_link_reset(args) -> int:
    lines = _running_lines(args)
    print(lines.change(args.line, None, reset=True))
    return 0


@_link_errors
def cmd_link_show(args) -> int:
    from rich.console import Console

    lines = _running_lines(args)
    rows = lines.show()
    daemon = lines.daemon()
    if args.json:
        print(
            json.dumps(
                {
                    "mode": lines.mode,
                    "netem": lines.netem,
                    "daemon": {k: v for k, v in daemon.items() if k != "queues"},
                    "lines": rows,
                }
            )
        )
        return 0
    if not args.all:
        rows = [r for r in rows if r["impair"] != "-"]
    fmt = lambda v, spec="": "-" if v is None else format(v, spec)  # noqa: E731
    show(
        Console(),
        f"lines of {lines.topo.name!r} ({lines.mode})",
        (
            "line",
            "direction",
            "kind",
            "in force",
            "from",
            "by",
            "kernel",
            "packets",
            "held",
            "dropped",
            "lag mean/max ms",
        ),
        [
            (
                r["line"],
                r["dir"],
                r["kind"],
                r["impair"],
                r["from"],
                r["mechanism"],
                r["kernel"],
                fmt(r["packets"]),
                fmt(r["held_now"]),
                fmt(r["dropped"]),
                "-" if r["lag_mean_ms"] is None else f"{r['lag_mean_ms']:.2f}/{r['lag_max_ms']:.2f}",
            )
            for r in rows
        ],
    )
    missing = [r for r in rows if r["kernel"].startswith("MISSING")]
    if missing:
        print(f"{len(missing)} line directions are not in force: the kernel lacks their rules (kernel column)")
    if daemon["down"]:
        print(
            f"impairment daemon DOWN: {daemon.get('note') or 'its supervisor is gone'}; queued lines pass unimpaired (queue bypass)"
        )
    else:
        print(
            f"impairment daemon pid {daemon['daemon_pid']}, restarts {daemon['restarts']}, CPU {fmt(daemon['cpu_s'], '.2f')} s"
            f"; changes: {lines.dir / 'changes.log'}"
        )
    return 0


# -- issue --netns -------------------------------------------------------------------------------


def enter_kiosk_namespace(topo, kiosk_id: str, tag: str | None) -> None:
    """Re-run this `konbini issue` inside the kiosk's namespace unless we are already there
    (its netns address is bindable here). Returns only when already inside."""
    addr = topo.node(kiosk_id).address_in(Mode.NETNS)
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
    pc.add_argument(
        "--netns", action="store_true", help="probe the running netns topology from inside each namespace (root)"
    )
    pc.add_argument("--state", help="state directory")
    pc.add_argument("--tag", help="namespaces konbini-TAG-* (as given to `up --netns --tag`)")
    pc.add_argument("--json", action="store_true", help="print the report summary as one JSON object")
    pc.add_argument("--report", help="write report.md and report.json into this directory")
    pc.add_argument("--timeout", type=float, default=0.5, help="seconds to wait for replies (default 0.5)")
    pc.add_argument(
        "--no-outside-tools", action="store_true", help="with --netns: skip the testssl.sh and nmap evidence"
    )
    pc.set_defaults(func=cmd_policy_check)

    pm = psub.add_parser(
        "mutate", help="every single-rule mutation of the compiled policy; exit 1 unless the check catches all"
    )
    pm.add_argument("file", nargs="?", help="topology file")
    pm.add_argument("--json", action="store_true", help="print the result as one JSON object")
    pm.add_argument("--report", help="write mutation.json into this directory")
    pm.add_argument(
        "--netns",
        action="store_true",
        help="also drop each nftables accept rule of the running netns topology in turn (root)",
    )
    pm.add_argument("--tag", help="namespaces konbini-TAG-* (as given to `up --netns --tag`)")
    pm.add_argument(
        "--timeout",
        type=float,
        default=0.3,
        help="with --netns: seconds to wait for probe replies, per mutant (default 0.3; replies take well under 1 ms)",
    )
    pm.set_defaults(func=cmd_policy_mutate)

    lk = sub.add_parser(
        "link", help="line impairments (delay, jitter, loss, rate) of a running topology, both modes (root)"
    )
    lsub = lk.add_subparsers(dest="link_cmd", required=True)

    def target(q):
        q.add_argument("--topology", help="topology file")
        q.add_argument("--state", help="state directory (loopback mode)")
        q.add_argument("--tag", help="netns namespaces konbini-TAG-*")
        m = q.add_mutually_exclusive_group()
        m.add_argument("--netns", action="store_true", help="the running netns topology")
        m.add_argument("--loopback", action="store_true", help="the running loopback topology (root)")

    ls = lsub.add_parser(
        "set", help="give LINE exactly these values, e.g. --delay 20ms --jitter 5ms --loss 0.5%% --rate 10mbit"
    )
    ls.add_argument("line")
    target(ls)
    ls.add_argument("--delay", help="one way, e.g. 20ms")
    ls.add_argument("--jitter", help="± around the delay, e.g. 5ms (packets keep their order)")
    ls.add_argument("--loss", help="per direction, e.g. 0.5%%")
    ls.add_argument("--rate", help="e.g. 10mbit (tc units)")
    ls.add_argument("--clear", action="store_true", help="no impairment at all")
    ls.set_defaults(func=cmd_link_set)
    lr = lsub.add_parser("reset", help="LINE back to the topology file's values")
    lr.add_argument("line")
    target(lr)
    lr.set_defaults(func=cmd_link_reset)
    lw = lsub.add_parser("show", help="impaired lines: values in force, mechanism, counters, the daemon")
    target(lw)
    lw.add_argument("--all", action="store_true", help="lines without impairment too")
    lw.add_argument("--json", action="store_true")
    lw.set_defaults(func=cmd_link_show)
