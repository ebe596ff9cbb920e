"""Bring a topology up: the test PKI, the compiled allow-lists and one Trio server per node.

`run_topology` runs every server node of the topology (or a subset) in the caller's Trio
run and reports a `Running` handle through task_status once every listener is bound, so
tests, the CLI and the benchmarks share one way to launch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import trio

from gateway.business.clock import Clock
from gateway.node.cluster import CLUSTER, node_allowlists
from gateway.node.server import App, NodeContext, NodeServer
from gateway.nodes.admin_server import AdminServer, admin_context
from gateway.nodes.registry import NodeEnv, make_admin_app, make_app
from kiosk_emu.card import CardStore
from topology.pki import PKI
from topology.policy.compiler import compile_admin_allowlists
from topology.spec.model import Topology


@dataclass
class Running:
    topo: Topology
    state_dir: Path
    pki: PKI
    cards: CardStore
    clock: Clock
    mode: str
    servers: dict[str, NodeServer] = field(default_factory=dict)
    admin_servers: dict[str, NodeServer] = field(default_factory=dict)  # admin API / maintenance endpoints, by node
    ready_s: float = 0.0
    cancel_scope: trio.CancelScope | None = None

    def app(self, node_id: str) -> App:
        return self.servers[node_id].app

    def context(self, node_id: str) -> NodeContext:
        """A context for a client node (a kiosk) of this topology."""
        return NodeContext(self.topo, self.topo.node(node_id), self.pki, self.mode, self.clock)

    def stop(self) -> None:
        if self.cancel_scope is not None:
            self.cancel_scope.cancel()


async def run_topology(
    topo: Topology,
    state_dir: Path,
    *,
    mode: str = "loopback",
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
    running = Running(topo, state_dir, pki, cards, clock, mode)
    # this process's nodes only, looked up by id: walking the file's nodes would touch every one
    # (each touch copies an inherited page; each allow-list costs a pass over its entries)
    chosen = list(topo.nodes.values()) if only is None else [topo.nodes[i] for i in only]
    allow = node_allowlists(topo, mode, [n.id for n in chosen])
    with trio.CancelScope() as scope:
        running.cancel_scope = scope
        async with trio.open_nursery() as nursery:
            env = NodeEnv(nursery, state_dir, cards.revocations)
            for node in chosen:
                if not node.is_server:
                    continue
                netns = namespaces.get(node.site) if namespaces else None
                ctx = NodeContext(topo, node, pki, mode, running.clock, bind, netns=netns, reuse_port=reuse_port)
                server = NodeServer(ctx, allow[node.id], make_app(ctx, env))
                server.bind()  # listening once bound: the kernel queues connections until accept
                nursery.start_soon(server.serve)
                running.servers[node.id] = server
            admin_allow = compile_admin_allowlists(topo, mode, [n.id for n in chosen]) if mode != CLUSTER else {}
            for node in chosen:  # admin / maintenance surfaces (a kiosk's too)
                if node.id not in admin_allow:
                    continue
                netns = namespaces.get(node.site) if namespaces else None
                ctx = admin_context(NodeContext(topo, node, pki, mode, running.clock, netns=netns, reuse_port=reuse_port))
                main = running.servers[node.id].app if node.id in running.servers else None
                shared = running.servers[node.id].metrics if main is not None else None  # one scrape per node
                server = AdminServer(ctx, admin_allow[node.id], make_admin_app(ctx, env, main), metrics=shared)
                await nursery.start(server.serve)
                running.admin_servers[node.id] = server
            running.ready_s = time.perf_counter() - t0
            task_status.started(running)
