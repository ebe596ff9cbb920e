"""A bench server process for any nodes (the center side, a failover target), as `bench.serve`
but launched through `run_topology`, which loads the PKI and the card store:
`python -m bench.serve_any FD`."""

from __future__ import annotations

import sys
from pathlib import Path

from bench.serve import main
from gateway.business.clock import Clock
from topology.launch.loopback import run_topology
from topology.spec.model import Topology


async def launch_any(
    topo: Topology, state_dir: Path, only: list[str], clock: Clock, reuse_port: bool, task_status
) -> None:
    await run_topology(topo, state_dir, clock=clock, only=only, reuse_port=reuse_port, task_status=task_status)


if __name__ == "__main__":
    main(int(sys.argv[1]), launch_any)
