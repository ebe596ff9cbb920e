"""A node's administration / maintenance surface: the store controller's admin API, a kiosk's
maintenance endpoint (SEC-ST-3/KI-6, SEC-KI-4).

The same `NodeServer` checks (console address before TLS, principal certificate after it, each
request), compiled from the node's `admin:` rules (`compiler.AdminAllowList`), on the node's
`admin_port` only: the node's main server already owns its scrape port.
"""

from __future__ import annotations

import msgspec

from gateway.node.acceptor import Acceptor
from gateway.node.metrics import NodeMetrics
from gateway.node.server import NodeContext, NodeServer


def admin_context(ctx: NodeContext) -> NodeContext:
    """The node's own context (address, certificate, clock), listening on its admin port."""
    if ctx.node.admin_port is None:
        raise ValueError(f"node {ctx.node.id!r} has no admin_port")
    node = msgspec.structs.replace(ctx.node, port=ctx.node.admin_port)
    return NodeContext(ctx.topo, node, ctx.pki, ctx.mode, ctx.clock, netns=ctx.netns, reuse_port=ctx.reuse_port)


class AdminServer(NodeServer):
    """`metrics`: the node's main server's, so its admin denials show in the node's one scrape
    (a store controller); None for a node without a main server (a kiosk): counted only here."""

    def __init__(self, ctx: NodeContext, allowlist, app, metrics: NodeMetrics | None = None) -> None:
        super().__init__(ctx, allowlist, app)
        if metrics is not None:
            self.metrics = app.metrics = metrics

    def bind(self, acceptor: Acceptor) -> None:
        """The admin port only (its scrape is the main server's), with a small backlog: a console
        or two, never a flood."""
        acceptor.add(self._listen(self.ctx.node.port, backlog=64, what="admin address"), self._connection)
