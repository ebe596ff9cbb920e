"""Every server node of a topology (or some), in the caller's Trio run, given its PKI.

`run_servers` binds each node's listener and its admin surface and reports a `Running` handle
through task_status once every listener is bound. It takes the PKI as made elsewhere:
`topology.launch.loopback.run_topology` makes or reads it (the one way tests, the CLI and the
benchmarks launch), and a bench process serving relays only passes `topology.pkifiles.PKIFiles`,
the paths alone, so it never loads `cryptography` or the card store.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from gateway.business.clock import Clock
from gateway.node.acceptor import Acceptor
from gateway.node.cluster import CLUSTER, node_allowlists, scrape_allowlist
from gateway.node.heap import give_back_forever
from gateway.node.server import App, NodeContext, NodeServer, check_identities
from gateway.nodes.admin_server import AdminServer, admin_context
from gateway.nodes.registry import NodeEnv, make_admin_app, make_app, make_shared
from topology.launch.clockfile import write_running_clock
from topology.policy.compiler import admin_allowlists_on_first_check
from topology.spec.model import Mode, Topology

if TYPE_CHECKING:
    from kiosk_emu.card import CardStore
    from topology.pki import PKI
    from topology.pkifiles import PKIFiles


@dataclass
class Running:
    topo: Topology
    state_dir: Path
    pki: PKI | PKIFiles
    cards: CardStore | None  # None in a process serving relays only
    clock: Clock
    mode: Mode
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


def before_fork(topo: Topology, state_dir: Path, node_ids: list[str]) -> None:
    """What the node processes serving `node_ids` would each make alike, made once by the launcher
    before it forks them, so that they inherit it: the topology's lookups by address and kind, and
    the municipalities' font (fontTools and the cut: 0.5 s in each of a national file's 20)."""
    topo.build_indexes()
    make_shared(topo, state_dir, {topo.nodes[i].kind for i in node_ids})


def _no_revocations() -> dict:
    return {}


async def run_servers(
    topo: Topology,
    state_dir: Path,
    pki: PKI | PKIFiles,
    cards: CardStore | None,
    clock: Clock,
    *,
    mode: Mode = Mode.LOOPBACK,
    only: list[str] | None = None,
    bind: str | None = None,
    namespaces: dict[str, str] | None = None,
    reuse_port: bool = False,
    t0: float | None = None,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """The arguments are `run_topology`'s (see there); `cards` None: no node here reads
    revocations (an OCSP responder does). `t0`: when the launch began, for `ready_s`."""
    t0 = time.perf_counter() if t0 is None else t0
    running = Running(topo, state_dir, pki, cards, clock, mode)
    revocations: Callable[[], dict] = cards.revocations if cards is not None else _no_revocations
    # this process's nodes only, looked up by id: walking the file's nodes would touch every one
    # (each touch copies an inherited page; each allow-list costs a pass over its entries)
    chosen = list(topo.nodes.values()) if only is None else [topo.nodes[i] for i in only]
    allow = node_allowlists(topo, mode, [n.id for n in chosen])
    admin_allow = admin_allowlists_on_first_check(topo, mode, [n.id for n in chosen]) if mode != CLUSTER else {}
    check_identities(pki, [n.id for n in chosen if n.is_server or n.id in admin_allow])
    scrape_allow = scrape_allowlist(topo, mode)  # the same for every node
    acceptor = Acceptor()  # every listener of this process, in one task (gateway/node/acceptor.py)
    with trio.CancelScope() as scope:
        running.cancel_scope = scope
        async with trio.open_nursery() as nursery:
            env = NodeEnv(nursery, state_dir, revocations)
            try:
                for node in chosen:
                    if not node.is_server:
                        continue
                    netns = namespaces.get(node.site) if namespaces else None
                    ctx = NodeContext(topo, node, pki, mode, running.clock, bind, netns=netns, reuse_port=reuse_port)
                    server = NodeServer(ctx, allow[node.id], make_app(ctx, env), scrape_allow)
                    server.bind(acceptor)  # listening once bound: the kernel queues connections until accept
                    running.servers[node.id] = server
                for node in chosen:  # admin / maintenance surfaces (a kiosk's too)
                    if node.id not in admin_allow:
                        continue
                    netns = namespaces.get(node.site) if namespaces else None
                    ctx = admin_context(
                        NodeContext(topo, node, pki, mode, running.clock, netns=netns, reuse_port=reuse_port)
                    )
                    main = running.servers[node.id].app if node.id in running.servers else None
                    shared = running.servers[node.id].metrics if main is not None else None  # one scrape per node
                    server = AdminServer(ctx, admin_allow[node.id], make_admin_app(ctx, env, main), metrics=shared)
                    server.bind(acceptor)
                    running.admin_servers[node.id] = server
            except BaseException:
                acceptor.close()  # the sockets bound so far; `run` closes them once it runs
                raise
            nursery.start_soon(acceptor.run, nursery)
            for server in running.servers.values():
                await server.app.prepare()
            nursery.start_soon(give_back_forever)  # freed heap back to the system (a soak's RSS stays flat)
            running.ready_s = time.perf_counter() - t0
            if only is None and mode != CLUSTER:  # bound, the whole topology: later commands join it in its time
                write_running_clock(state_dir, clock)
            task_status.started(running)
