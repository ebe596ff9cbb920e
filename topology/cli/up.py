"""`konbini up`: launch every server node of a topology in loopback mode and run until Ctrl-C."""

from __future__ import annotations

import gc
import signal
import time

import trio
from rich.console import Console

from gateway.business.clock import Clock
from gateway.node.metrics import ImpairmentStatus
from topology.cli.common import UserError, clock_option, load, state_dir
from topology.cli.netns import cmd_up_netns
from topology.cli.node import supervise
from topology.cli.render import show_nodes
from topology.launch import preflight, spread
from topology.launch.impair import Impairments, LineError
from topology.launch.loopback import Running, run_topology
from topology.launch.netns import NetnsError, stop_nodehosts
from topology.policy.monitoring import METRICS_PORT, monitoring_address
from topology.spec.model import Mode

PLANNED_CONNECTIONS = 512  # concurrent connections `up` plans for (a bench's in-flight requests x hops)


def run_preflight(
    topo, console: Console, *, connections: int = PLANNED_CONNECTIONS, processes: int = 1, enforce: bool = True
) -> None:
    """Name every limit too low for this topology before anything starts (topology/launch/preflight.py)."""
    needs, notes = preflight.check(topo, connections=connections, processes=processes)
    for note in notes:
        console.print(f"[yellow]pre-flight[/] {note}")
    for need in needs:
        if not need.ok:
            console.print(f"[yellow]pre-flight[/] {need.line()}", soft_wrap=True)
    stop = preflight.refusals(needs)
    if stop and enforce:
        raise UserError(
            f"pre-flight: {len(stop)} limit(s) too low for {topo.name!r} (above); raise them, "
            "or start anyway with --no-preflight"
        )


def cmd_preflight(args) -> int:
    topo = load(args.file)
    console = Console()
    processes = args.processes or preflight.processes_for(topo, connections=args.connections)
    needs, notes = preflight.check(topo, connections=args.connections, processes=processes, raise_soft=False)
    for need in needs:
        console.print(("[green]ok[/]   " if need.ok else "[red]LOW[/]  ") + need.line(), soft_wrap=True)
    stop = preflight.refusals(needs)
    console.print(
        f"{topo.name}: {len(topo.nodes):,} nodes, {preflight.listeners(topo):,} listeners; "
        + (f"{len(stop)} limit(s) would stop `konbini up`" if stop else "`konbini up` fits this machine")
    )
    return 1 if stop else 0


def cmd_up(args) -> int:
    speed = getattr(args, "clock_speed", 1.0)
    if not speed > 0:  # zero or less would stop or reverse time: hours, fees and expiries stop making sense
        raise UserError(f"--clock-speed must be above 0 (emulated seconds per real second), not {speed:g}")
    args.clock = clock_option(args.clock)  # both modes pass it on as text, to their node processes
    if getattr(args, "netns", False):
        return cmd_up_netns(args)  # a process per site there: the one-process figures do not apply
    if getattr(args, "sites", None):
        raise UserError(
            "--sites chooses the part of a file that netns mode brings up; with --netns only "
            "(loopback mode runs the whole file: `--processes N` for a large one)"
        )
    topo = load(args.file)
    # The model is read, never changed, from here on: out of the collector's reach, no collection
    # walks its objects again (national: a million, 1.4 s a full collection, three before the fork)
    gc.freeze()
    console = Console()
    processes = getattr(args, "processes", None)
    if processes is None:
        processes = preflight.processes_for(topo)
        if processes > 1:
            console.print(
                f"{len(topo.nodes):,} nodes, {preflight.listeners(topo):,} listeners: spread over "
                f"{processes} processes (the cores, and the open-files limit per process); --processes N to choose"
            )
    if processes < 1:
        raise UserError(f"--processes must be at least 1, not {processes}")
    run_preflight(topo, console, processes=processes, enforce=not getattr(args, "no_preflight", False))
    clock = Clock.parse(args.clock, args.clock_speed)
    lines = Impairments(topo, Mode.LOOPBACK, state_dir=state_dir(args, topo))  # root: per address pair on lo
    notes: list[str] = []

    def impair() -> None:
        try:
            notes.extend(lines.start())
        except LineError as exc:
            notes.append(f"line impairments not applied: {exc}")

    if processes > 1:
        try:  # the lines set up while the node processes start (national: 7 s of one core's work)
            return _up_spread(args, topo, console, processes, notes, impair)
        finally:
            lines.stop()
    impair()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            running = await nursery.start(
                lambda task_status: run_topology(topo, state_dir(args, topo), clock=clock, task_status=task_status)
            )
            show_nodes(console, topo, f"konbini topology {topo.name!r} ({running.mode})", running.servers)
            for note in notes:
                console.print(f"[yellow]lines[/] {note}")
            console.print(scrape_hint(running, lines.status_file), soft_wrap=True)
            console.print(
                f"[bold green]ready[/] in {running.ready_s * 1000:.0f} ms; clock {clock.now().isoformat()}; Ctrl-C stops."
            )
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


def _up_spread(args, topo, console: Console, processes: int, notes: list[str], meanwhile) -> int:
    """`up --processes N`: the nodes in N forked nodehosts (topology/launch/spread.py) until Ctrl-C;
    `meanwhile()` once they are forked, while they start (it adds to `notes`)."""
    t0 = time.perf_counter()
    sdir = state_dir(args, topo)
    parts = spread.partition(topo, processes)
    console.print(
        f"starting {len(topo.nodes):,} nodes in {len(parts)} processes "
        f"({', '.join(f'{len(p):,}' for p in parts)} nodes each)"
    )

    def progress(done: int, total: int) -> None:
        console.print(f"  {done}/{total} processes ready ({time.perf_counter() - t0:.1f} s)")

    try:  # Ctrl-C while starting (minutes, for a national file) stops the processes started so far
        hosts = spread.start(
            topo, sdir, processes, args.clock, args.clock_speed, progress, meanwhile=meanwhile, parts=parts
        )
    except NetnsError as exc:
        raise UserError(str(exc)) from None
    except KeyboardInterrupt:
        console.print("interrupted while starting; every process stopped.")
        return 130
    stop = {"now": False}

    def on_signal(signum, frame):
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    supervisor = supervise(hosts, sdir / "processes", args, Mode.LOOPBACK, console)
    try:
        ready_s = time.perf_counter() - t0
        show_nodes(
            console,
            topo,
            f"konbini topology {topo.name!r} (loopback, {len(hosts)} processes)",
            {n for n in topo.nodes if topo.nodes[n].is_server},
            processes=[(h.job[0], h.pid, h.job[2]) for h in hosts],
        )
        for note in notes:
            console.print(f"[yellow]lines[/] {note}")
        console.print(
            f"[bold green]ready[/] in {ready_s * 1000:.0f} ms; {len(hosts)} processes "
            f"(logs {sdir / 'processes'}; restart policy {supervisor.policy.name}); "
            "`konbini node kill|stop|start|restart NODE` injects a fault; Ctrl-C stops.",
            soft_wrap=True,
        )
        while not stop["now"]:
            supervisor.tick()
            time.sleep(0.2)
    finally:
        stop_nodehosts(supervisor.hosts)
        supervisor.close()
    console.print("stopped; every node shut down.")
    return 0


def scrape_hint(running: Running, impair_status) -> str:
    """Where to scrape, and the curl line that does it with the monitoring certificate. Also hands
    each node the impairment daemon's counters for its own lines."""
    for node_id, server in running.servers.items():
        line_ids = {line.id for line in running.topo.lines if node_id in (line.a, line.b)}
        server.metrics.register(ImpairmentStatus(impair_status, line_ids))
    cert, key = running.pki.principal_paths("monitoring")
    source = monitoring_address(running.mode)
    first = next(iter(running.servers.values())).ctx.address if running.servers else "ADDRESS"
    return (
        f"[bold]metrics[/] https://<node address>:{METRICS_PORT}/metrics on every listening node, only for the "
        f"monitoring certificate from {source}:\n"
        f"  curl --cacert {running.pki.network_ca_path} --cert {cert} --key {key} --interface {source} "
        f"https://{first}:{METRICS_PORT}/metrics"
    )
