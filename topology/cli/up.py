"""`konbini up`: launch every server node of a topology in loopback mode and run until Ctrl-C."""

from __future__ import annotations

import signal

import trio
from rich.console import Console

from gateway.business.clock import Clock
from gateway.node.metrics import ImpairmentStatus
from topology.cli.common import load, state_dir
from topology.cli.netns import cmd_up_netns
from topology.cli.render import show
from topology.launch.impair import Impairments, LineError
from topology.launch.loopback import Running, run_topology
from topology.policy.monitoring import METRICS_PORT, monitoring_address


def cmd_up(args) -> int:
    if getattr(args, "netns", False):
        return cmd_up_netns(args)
    topo = load(args.file)
    console = Console()
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
