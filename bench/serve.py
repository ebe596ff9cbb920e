"""The body of a bench server process: some nodes of a topology, served until the parent stops it.

Kept apart from `bench.runner` on purpose: a spawned child imports the module of its target, and
the runner pulls in the load generator, HAProxy, reports and the netns launcher, about 6 MiB of
RSS in every relay process that serves none of them."""

from __future__ import annotations

import logging
import signal
from datetime import datetime
from pathlib import Path

import trio

from gateway.business.clock import Clock
from gateway.node.server import NodeStartError
from topology.launch.loopback import run_topology
from topology.spec.model import Topology


def serve_nodes(topo: Topology, state_dir: str, only: set[str], clock_start: str, conn, reuse_port: bool = False) -> None:
    """Serve the nodes `only`; tell the parent ("ready", seconds) or ("error", one line) on `conn`.
    `reuse_port`: one of several workers serving the same nodes on the same addresses."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us
    logging.basicConfig(level=logging.ERROR)
    clock = Clock(datetime.fromisoformat(clock_start))

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            running = await nursery.start(
                lambda task_status: run_topology(topo, Path(state_dir), clock=clock, only=only, reuse_port=reuse_port,
                                             task_status=task_status)
            )
            conn.send(("ready", running.ready_s))

    try:
        trio.run(main)
    except Exception as exc:  # noqa: BLE001 - one line for the parent
        while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
            exc = exc.exceptions[0]
        conn.send(("error", str(exc) if isinstance(exc, NodeStartError) else f"{type(exc).__name__}: {exc}"))
