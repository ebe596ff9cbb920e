"""Node kind -> the App that serves it, as containerlab keeps one `nodes/<kind>` per kind.

Every factory takes the same `NodeEnv`, so the launcher builds any server node with one call
and a new kind is its entry in topology/spec/kinds.py, one line here and a module beside this one. Each factory imports its own
module when called: a process serving relays only never loads the center's code or its holiday
calendar (docs/performance.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from gateway.node.server import App, NodeContext
from topology.spec.kinds import KINDS
from topology.spec.model import Topology


@dataclass(frozen=True)
class NodeEnv:
    """What a node may need beyond its own context: the task nursery it runs in, the state
    directory (the center's ledger) and where revocations are read (the OCSP responder)."""

    nursery: trio.Nursery
    state_dir: Path | None
    revocations: Callable[[], dict]


Factory = Callable[[NodeContext, NodeEnv], App]


def _relay(ctx: NodeContext, env: NodeEnv) -> App:
    from gateway.nodes.relay import Relay

    return Relay(ctx, env.nursery)


def _issuance_center(ctx: NodeContext, env: NodeEnv) -> App:
    from gateway.nodes.issuance import IssuanceCenter

    return IssuanceCenter(ctx, env.nursery, env.state_dir)


def _municipality(ctx: NodeContext, env: NodeEnv) -> App:
    from gateway.nodes.municipality import MunicipalityServer

    return MunicipalityServer(ctx, env.state_dir)


def _ocsp(ctx: NodeContext, env: NodeEnv) -> App:
    from gateway.nodes.ocsp_responder import OcspNode

    return OcspNode(ctx, env.revocations)


def _store_controller(ctx: NodeContext, env: NodeEnv) -> App:
    from gateway.nodes.store_controller import StoreController

    return StoreController(ctx, env.nursery)


FACTORIES: dict[str, Factory] = {
    **{kind.name: _relay for kind in KINDS.values() if kind.relays},
    "issuance-center": _issuance_center,
    "municipality": _municipality,
    "ocsp": _ocsp,
    "store-controller": _store_controller,
}


# Node kind -> the App behind its admin_port (gateway/nodes/admin_server.py); it gets the node's main
# App too (None for a kiosk, which has no server of its own).
AdminFactory = Callable[[NodeContext, NodeEnv, App | None], App]


def _store_controller_admin(ctx: NodeContext, env: NodeEnv, app: App | None) -> App:
    from gateway.nodes.store_controller import StoreControllerAdmin

    return StoreControllerAdmin(app)


def _kiosk_maintenance(ctx: NodeContext, env: NodeEnv, app: App | None) -> App:
    from gateway.nodes.kiosk_maintenance import KioskMaintenance

    return KioskMaintenance(ctx, env.state_dir)


ADMIN_FACTORIES: dict[str, AdminFactory] = {
    "store-controller": _store_controller_admin,
    "kiosk": _kiosk_maintenance,
}


def make_admin_app(ctx: NodeContext, env: NodeEnv, main: App | None) -> App:
    try:
        factory = ADMIN_FACTORIES[ctx.node.kind]
    except KeyError:
        raise ValueError(f"no admin surface for node kind {ctx.node.kind}") from None
    return factory(ctx, env, main)


def make_shared(topo: Topology, state_dir: Path, kinds: set[str]) -> None:
    """What the node processes serving nodes of `kinds` would each make alike, made here once:
    a launcher calls it before it forks them, and they inherit it (the municipalities' font)."""
    if "municipality" in kinds:
        from gateway.nodes.municipality import municipalities_font

        municipalities_font(topo, state_dir)


def make_app(ctx: NodeContext, env: NodeEnv) -> App:
    try:
        factory = FACTORIES[ctx.node.kind]
    except KeyError:
        raise ValueError(f"no server for node kind {ctx.node.kind}") from None
    return factory(ctx, env)
