"""The body of a bench server process: some nodes of a topology, served until the parent stops it.

Run as `python -m bench.serve FD` (relays only) or `python -m bench.serve_any FD` (anything
else) by `bench.processes.NodeProcess`: a fresh interpreter that imports that module and what its
nodes need, nothing else. (A multiprocessing "spawn" child re-imports the parent's main module,
here the whole `konbini` CLI with the load generator, HAProxy, reports and the netns launcher:
megabytes of RSS in every relay process that serves none of them.) Relays need only the paths of
the PKI the parent made, so this module never imports `cryptography` or the card store (~9 MiB
of a relay process's RSS); `bench.serve_any` launches through `run_topology`, which loads them.
FD is one end of a `multiprocessing.Pipe`: the parent sends the arguments on it, the child
answers there, and the child stops when the parent's end closes, so a parent that dies does not
leave its servers behind."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Awaitable, Callable
from datetime import datetime
from multiprocessing.connection import Connection
from pathlib import Path

import trio

from gateway.business.clock import Clock
from gateway.node.server import NodeStartError
from topology.launch.servers import run_servers
from topology.pkifiles import PKIFiles
from topology.spec.model import Topology

# (topology, state directory, node ids, clock, reuse_port, task_status)
Launch = Callable[[Topology, Path, list[str], Clock, bool, object], Awaitable[None]]


async def launch_relays(
    topo: Topology, state_dir: Path, only: list[str], clock: Clock, reuse_port: bool, task_status
) -> None:
    await run_servers(
        topo,
        state_dir,
        PKIFiles(state_dir, frozenset(topo.nodes)),
        None,
        clock,
        only=only,
        reuse_port=reuse_port,
        task_status=task_status,
    )


def serve_nodes(
    launch: Launch, topo: Topology, state_dir: str, only: set[str], clock_start: str, conn, reuse_port: bool = False
) -> None:
    """Serve the nodes `only`; tell the parent ("ready", seconds) or ("error", one line) on `conn`.
    `reuse_port`: one of several workers serving the same nodes on the same addresses."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us
    logging.basicConfig(level=logging.ERROR)
    clock = Clock(datetime.fromisoformat(clock_start))

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            running = await nursery.start(
                lambda task_status: launch(topo, Path(state_dir), sorted(only), clock, reuse_port, task_status)
            )
            conn.send(("ready", running.ready_s))

    try:
        trio.run(main)
    except Exception as exc:  # noqa: BLE001 - one line for the parent
        while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
            exc = exc.exceptions[0]
        conn.send(("error", str(exc) if isinstance(exc, NodeStartError) else f"{type(exc).__name__}: {exc}"))


def _stop_with_parent(conn: Connection) -> None:
    """Block on the pipe; the parent's end closing (it stopped or died) ends this process."""
    try:
        while True:
            conn.recv()
    except (EOFError, OSError):
        os.kill(os.getpid(), signal.SIGTERM)


def main(fd: int, launch: Launch) -> None:
    conn = Connection(fd)
    topo, state_dir, only, clock_start, reuse_port = conn.recv()
    threading.Thread(target=_stop_with_parent, args=(conn,), daemon=True).start()
    serve_nodes(launch, topo, state_dir, only, clock_start, conn, reuse_port)


if __name__ == "__main__":
    main(int(sys.argv[1]), launch_relays)
