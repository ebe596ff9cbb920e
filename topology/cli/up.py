"""`konbini up`: launch every server node of a topology in loopback mode and run until Ctrl-C."""

from __future__ import annotations

import signal

import trio
from rich.console import Console

from gateway.business.clock import Clock
from gateway.node.metrics import ImpairmentStatus
from topology.cli.common import UserError, load, state_dir
from topology.cli.netns import cmd_up_netns
from topology.cli.render import show
from topology.launch import preflight
from topology.launch.impair import Impairments, LineError
from topology.launch.loopback import Running, run_topology
from topology.policy.monitoring import METRICS_PORT, monitoring_address

PLANNED_CONNECTIONS = 512  # concurrent connections `up` plans for (a bench's in-flight requests x hops)


def run_preflight(topo, console: Console, *, connections: int = PLANNED_CONNECTIONS, enforce: bool = True) -> None:
    """Name every limit too low for this topology before anything starts (topology/launch/preflight.py)."""
    needs, notes = preflight.check(topo, connections=connections)
    for note in notes:
        console.print(f"[yellow]pre-flight[/] {note}")
    for need in needs:
        if not need.ok:
            console.print(f"[yellow]pre-flight[/] {need.line()}", soft_wrap=True)
    stop = preflight.refusals(needs)
    if stop and enforce:
        raise UserError(f"pre-flight: {len(stop)} limit(s) too low for {topo.name!r} (above); raise them, "
                        "or start anyway with --no-preflight")


def cmd_preflight(args) -> int:
    topo = load(args.file)
    console = Console()
    needs, notes = preflight.check(topo, connections=args.connections, raise_soft=False)
    for need in needs:
        console.print(("[green]ok[/]   " if need.ok else "[red]LOW[/]  ") + need.line(), soft_wrap=True)
    stop = preflight.refusals(needs)
    console.print(f"{topo.name}: {len(topo.nodes):,} nodes, {preflight.listeners(topo):,} listeners; "
                  + (f"{len(stop)} limit(s) would stop `konbini up`" if stop else "`konbini up` fits this machine"))
    return 1 if stop else 0


def cmd_up(args) -> int:
    if getattr(args, "netns", False):
        return cmd_up_netns(args)  # a process per site there: the one-process figures do not apply
    topo = load(args.file)
    console = Console()
    run_preflight(topo, console, enforce=not getattr(args, "no_preflight", False))
    clock = Clock.parse(args.clock, args.clock_speed)
    lines = Impairments(topo, "loopback", state_dir=state_dir(args, topo))  # root: per address pair on lo
    try:
        notes = lines.start()
    except LineError as exc:
        notes = [f"line impairments not applied: {exc}"]

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            running = await nursery.start(lambda task_status: run_topology(topo, state_dir(args, topo), clock=clock, task_status=task_status))
            show(console, f"konbini topology {topo.name!r} ({running.mode})", ("node", "kind", "site", "address", "ready"), [
                (node.id, node.kind, node.site, f"{node.address}:{node.port}" if node.port else node.address,
                 "listening" if node.id in running.servers else "client")
                for node in topo.nodes.values()
            ])
            for note in notes:
                console.print(f"[yellow]lines[/] {note}")
            console.print(scrape_hint(running, lines.status_file), soft_wrap=True)
            console.print(f"[bold green]ready[/] in {running.ready_s * 1000:.0f} ms; clock {clock.now().isoformat()}; Ctrl-C stops.")
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    break  # shutdown is a cancel: every node's nursery unwinds
            nursery.cancel_scope.cancel()
        console.print("stopped; every node shut down.")

    try:
        trio.run(main)
    finally:
        lines.stop()
    return 0


def scrape_hint(running: Running, impair_status) -> str:
    """Where to scrape, and the curl line that does it with the monitoring certificate. Also hands
    each node the impairment daemon's counters for its own lines."""
    for node_id, server in running.servers.items():
        line_ids = {line.id for line in running.topo.lines if node_id in (line.a, line.b)}
        server.metrics.registry.register(ImpairmentStatus(impair_status, line_ids))
    cert, key = running.pki.principal_paths("monitoring")
    source = monitoring_address(running.mode)
    first = next(iter(running.servers.values())).ctx.address if running.servers else "ADDRESS"
    return (
        f"[bold]metrics[/] https://<node address>:{METRICS_PORT}/metrics on every listening node, only for the "
        f"monitoring certificate from {source}:\n"
        f"  curl --cacert {running.pki.network_ca_path} --cert {cert} --key {key} --interface {source} "
        f"https://{first}:{METRICS_PORT}/metrics"
    )
