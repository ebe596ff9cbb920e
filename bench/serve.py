"""The body of a bench server process: some nodes of a topology, served until the parent stops it.

Run as `python -m bench.serve FD` by `bench.runner.NodeProcess`: a fresh interpreter that imports
this module and what its nodes need, nothing else. (A multiprocessing "spawn" child re-imports
the parent's main module, here the whole `konbini` CLI with the load generator, HAProxy,
reports and the netns launcher: megabytes of RSS in every relay process that serves none of
them.) FD is one end of a `multiprocessing.Pipe`: the parent sends the arguments of
`serve_nodes` on it, the child answers there, and the child stops when the parent's end closes,
so a parent that dies does not leave its servers behind."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from datetime import datetime
from multiprocessing.connection import Connection
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


def _stop_with_parent(conn: Connection) -> None:
    """Block on the pipe; the parent's end closing (it stopped or died) ends this process."""
    try:
        while True:
            conn.recv()
    except (EOFError, OSError):
        os.kill(os.getpid(), signal.SIGTERM)


def main(fd: int) -> None:
    conn = Connection(fd)
    args = conn.recv()
    threading.Thread(target=_stop_with_parent, args=(conn,), daemon=True).start()
    serve_nodes(*args[:4], conn, *args[4:])


if __name__ == "__main__":
    main(int(sys.argv[1]))
