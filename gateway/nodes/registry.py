"""Node kind -> the App that serves it, as containerlab keeps one `nodes/<kind>` per kind.

Every factory takes the same `NodeEnv`, so the launcher builds any server node with one call
and a new kind is one line here (and a module beside this one).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from gateway.node.server import App, NodeContext
from gateway.nodes.issuance import IssuanceCenter
from gateway.nodes.kiosk_maintenance import KioskMaintenance
from gateway.nodes.municipality import MunicipalityServer
from gateway.nodes.ocsp_responder import OcspNode
from gateway.nodes.relay import Relay
from gateway.nodes.store_controller import StoreController, StoreControllerAdmin
from topology.spec.model import RELAY_KINDS


@dataclass(frozen=True)
class NodeEnv:
    """What a node may need beyond its own context: the task nursery it runs in, the state
    directory (the center's ledger) and where revocations are read (the OCSP responder)."""

    nursery: trio.Nursery
    state_dir: Path | None
    revocations: Callable[[], dict]


Factory = Callable[[NodeContext, NodeEnv], App]

FACTORIES: dict[str, Factory] = {
    **{kind: (lambda ctx, env: Relay(ctx)) for kind in RELAY_KINDS},
    "issuance-center": lambda ctx, env: IssuanceCenter(ctx, env.nursery, env.state_dir),
    "municipality": lambda ctx, env: MunicipalityServer(ctx),
    "ocsp": lambda ctx, env: OcspNode(ctx, env.revocations),
    "store-controller": lambda ctx, env: StoreController(ctx, env.nursery),
}


# Node kind -> the App behind its admin_port (gateway/nodes/admin_server.py); it gets the node's main
# App too (None for a kiosk, which has no server of its own).
AdminFactory = Callable[[NodeContext, NodeEnv, App | None], App]

ADMIN_FACTORIES: dict[str, AdminFactory] = {
    "store-controller": lambda ctx, env, app: StoreControllerAdmin(app),
    "kiosk": lambda ctx, env, app: KioskMaintenance(ctx, env.state_dir),
}


def make_admin_app(ctx: NodeContext, env: NodeEnv, main: App | None) -> App:
    try:
        factory = ADMIN_FACTORIES[ctx.node.kind]
    except KeyError:
        raise ValueError(f"no admin surface for node kind {ctx.node.kind}") from None
    return factory(ctx, env, main)


def make_app(ctx: NodeContext, env: NodeEnv) -> App:
    try:
        factory = FACTORIES[ctx.node.kind]
    except KeyError:
        raise ValueError(f"no server for node kind {ctx.node.kind}") from None
    return factory(ctx, env)
