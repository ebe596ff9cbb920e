"""A node's administration / maintenance surface: the store controller's admin API, a kiosk's
maintenance endpoint (SEC-ST-3/KI-6, SEC-KI-4).

The same `NodeServer` checks (console address before TLS, principal certificate after it, each
request), compiled from the node's `admin:` rules (`compiler.AdminAllowList`), on the node's
`admin_port` only: the node's main server already owns its scrape port.
"""

from __future__ import annotations

import errno

import msgspec
import trio

from gateway.node.metrics import NodeMetrics
from gateway.node.server import NodeContext, NodeServer, NodeStartError, listening_socket


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

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self.ctx.check_tls_files()  # the context is made at the first connection
        try:
            sock = listening_socket(
                self.ctx.address,
                self.ctx.node.port or 0,
                backlog=64,
                netns=self.ctx.netns,
                reuse_port=self.ctx.reuse_port,
            )
        except OSError as exc:
            what = "is taken" if exc.errno == errno.EADDRINUSE else f"cannot be used ({exc.strerror})"
            raise NodeStartError(
                f"{self.ctx.node.id}: admin address {self.ctx.address}:{self.ctx.node.port} {what}"
            ) from None
        listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(sock))]
        await trio.serve_listeners(self._connection, listeners, task_status=task_status)
