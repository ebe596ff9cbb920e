"""Bring a topology up: the test PKI, the compiled allow-lists and one Trio server per node.

`run_topology` runs every server node of the topology (or a subset) in the caller's Trio
run and reports a `Running` handle through task_status once every listener is bound, so
tests, the CLI and the benchmarks share one way to launch. It makes or reads the PKI and the
card store, then serves through `topology.launch.servers.run_servers`.
"""

from __future__ import annotations

import time
from pathlib import Path

import trio

from gateway.business.clock import Clock
from gateway.node.cluster import CLUSTER
from kiosk_emu.card import CardStore
from topology.launch.servers import Running, run_servers
from topology.pki import PKI
from topology.spec.model import Mode, Topology

__all__ = ["Running", "run_topology"]


async def run_topology(
    topo: Topology,
    state_dir: Path,
    *,
    mode: Mode = Mode.LOOPBACK,
    clock: Clock | None = None,
    only: list[str] | None = None,
    bind: str | None = None,
    pki: PKI | None = None,
    namespaces: dict[str, str] | None = None,
    reuse_port: bool = False,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """`mode` "cluster" (a pod, gateway/node/cluster.py): the PKI is read from the mounted Secret
    and never written, nodes listen on `bind` (all addresses by default), and admin surfaces,
    reached from in-store consoles by address, are not started. `pki`: a forked nodehost's,
    inherited from the parent that checked it (a large file's takes seconds, in every process).
    `only`: the ids of the nodes to run (a process serving some nodes of a large topology builds
    their allow-lists only: the parent no longer holds every node's, which each forked child's
    resident size counted again). `namespaces`: site -> netns namespace, for a process serving the
    nodes of several namespaces (each node's sockets are made in its site's). `reuse_port`: this
    process is one of several workers serving the same nodes on the same addresses (SO_REUSEPORT;
    the issuance center's workers share its ledger file)."""
    t0 = time.perf_counter()
    state_dir.mkdir(parents=True, exist_ok=True)
    if pki is None:
        pki = PKI.load(state_dir, topo) if mode == CLUSTER else PKI.ensure(state_dir, topo)
    clock = clock or Clock()
    cards = CardStore(state_dir, pki, clock.now)  # cards are issued at emulated time too
    await run_servers(
        topo,
        state_dir,
        pki,
        cards,
        clock,
        mode=mode,
        only=only,
        bind=bind,
        namespaces=namespaces,
        reuse_port=reuse_port,
        t0=t0,
        task_status=task_status,
    )
