"""The per-node server: deny early and cheaply, then serve HTTP/2 over mutual TLS.

Order of checks (DESIGN §3): the peer address before the TLS handshake, the certificate
identity after it, method and path per request. Every denial closes promptly, is counted
by reason and logged with the peer's address and node id only (no personal data).
"""

from __future__ import annotations

import errno
import logging
import socket
import ssl
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import trio

from gateway.business.clock import Clock
from gateway.node import handshakes
from gateway.node.acceptor import Acceptor
from gateway.node.cluster import BIND_ALL, CLUSTER, ByCertificate, scrape_allowlist
from gateway.node.metrics import (
    CONTENT_TYPE,
    DETACHED,
    NodeMetrics,
    http_response,
    read_request_head,
)
from gateway.protocol.driver import Stream
from gateway.protocol.errors import TRANSPORT_ERRORS
from gateway.protocol.h2trio import Handler, LingeringSocket, TrioH2
from gateway.protocol.http import method_path, refuse
from gateway.protocol.streams import Headers
from gateway.transport.dial import connect_h2
from gateway.transport.tls import client_context, peer_identity, server_context
from topology.export.names import service_name
from topology.netns.enter import in_namespace
from topology.policy.compiler import AllowList
from topology.policy.monitoring import MetricsAllowList
from topology.spec.model import Limits, Mode, Node, Topology

log = logging.getLogger("konbini.node")

# close reasons that are no one's fault, so not denials
ORDINARY_CLOSE = (None, "eof", "goaway", "local-close", "write-failed", "idle")


class NodeStartError(Exception):
    """A node cannot start (address taken, no such address); one line for the user."""


def check_identities(pki, node_ids: list[str]) -> None:
    """At start, instead of making the TLS contexts: are these nodes' certificates and keys there?
    A context is made at a node's first connection (`NodeContext.server_tls`): `load_cert_chain`'s
    key decoding was most of a large topology's start (docs/national.md), for nodes most of which
    are never dialled. A node without an identity is still a start error, naming the node. One
    query for all of a process's nodes: a query each was a tenth of a national node process's start."""
    missing = pki.without_identity(node_ids)
    if missing:
        raise NodeStartError(
            f"{missing[0]}: no certificate or key for it in {pki.dir} (a state dir made for another topology?)"
        )


@dataclass(frozen=True)
class Peer:
    address: str
    identity: str


@dataclass
class NodeContext:
    """What a node needs from its surroundings: the topology, its PKI files, the mode and the clock.

    Mode "cluster" (a Kubernetes pod, gateway/node/cluster.py): bind `bind` (all addresses by
    default), dial upstreams by Service name, identify peers by certificate only."""

    topo: Topology
    node: Node
    pki: object  # topology.pki.PKI (duck-typed to keep gateway free of key generation)
    mode: Mode = Mode.LOOPBACK
    clock: Clock = field(default_factory=Clock)
    bind: str | None = None  # cluster mode: the address to listen on instead of all
    # netns mode, a process serving several namespaces: the one this node's sockets are made in
    netns: str | None = None
    # center workers: several processes serve this node on one address (SO_REUSEPORT); the
    # kernel spreads new connections over them
    reuse_port: bool = False
    # this node's TLS contexts by role, made once: tls.py's LRU holds 256, and a topology with
    # more server nodes in one process made a new context (files read, key parsed) per connection
    _tls: dict[str, ssl.SSLContext] = field(default_factory=dict, repr=False)

    @property
    def tls12_floor(self) -> bool:
        """TLS 1.3 only unless the topology asks for a 1.2 floor (`tls_min_version: "1.2"`)."""
        return self.topo.tls_min_version == "1.2"

    def address_of(self, node: Node) -> str:
        """Where to dial `node`: its address in this mode, or in cluster mode its Service name."""
        return service_name(node.id) if self.mode == CLUSTER else node.address_in(self.mode)

    @property
    def address(self) -> str:
        """Where this node listens (and dials from, outside cluster mode)."""
        if self.mode == CLUSTER:
            return self.bind or BIND_ALL
        return self.address_of(self.node)

    @property
    def limits(self) -> Limits:
        """What this node grants one peer: the topology's `limits:` for its kind, or the defaults."""
        return self.topo.limits_for(self.node.kind)

    def check_tls_files(self) -> None:
        """At start, instead of making the contexts: are this node's certificate and key there?
        (`check_identities`, for this node alone)."""
        check_identities(self.pki, [self.node.id])

    def server_tls(self, alpn: str = "h2") -> ssl.SSLContext:
        if (ctx := self._tls.get(alpn)) is None:
            chain, key = self.pki.node_paths(self.node.id)
            ctx = self._tls[alpn] = server_context(
                Path(chain), Path(key), Path(self.pki.network_ca_path), self.tls12_floor, alpn
            )
        return ctx

    def client_tls(self) -> ssl.SSLContext:
        if (ctx := self._tls.get("client")) is None:
            chain, key = self.pki.node_paths(self.node.id)
            ctx = self._tls["client"] = client_context(
                Path(chain), Path(key), Path(self.pki.network_ca_path), self.tls12_floor
            )
        return ctx

    async def connect(self, target: Node) -> TrioH2:
        """Open a mutual-TLS HTTP/2 connection from this node to `target` (not yet running)."""
        local = None if self.mode == CLUSTER else self.address  # a pod dials from whatever address it has
        return await connect_h2(
            self.address_of(target),
            target.port or 0,
            target.id,
            self.client_tls(),
            local_address=local,
            netns=self.netns,
        )


def listening_socket(
    address: str, port: int, backlog: int = 1024, netns: str | None = None, reuse_port: bool = False
) -> socket.socket:
    """A non-blocking TCP socket listening on `address:port` (SO_REUSEADDR, as Trio's listeners),
    made in namespace `netns` if given; with `reuse_port`, shared with the other processes that
    bind it so (SO_REUSEPORT: the kernel hashes each new connection to one of them)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    kind = socket.SOCK_STREAM | socket.SOCK_NONBLOCK
    if netns is None:
        sock = socket.socket(family, kind)
    else:
        with in_namespace(netns):
            sock = socket.socket(family, kind)
    # what socket.create_server does, without its checks per call: a node process binds 18,000
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address, port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


class App:
    """What runs behind a NodeServer: override `handle` (per request) or `serve_connection`."""

    metrics: NodeMetrics = DETACHED  # the NodeServer's own, bound when it takes this app

    async def serve_connection(self, conn: TrioH2, peer: Peer, server: NodeServer) -> None:
        await conn.run(lambda stream: server.dispatch(stream, peer, self.handle))

    async def handle(self, stream: Stream, peer: Peer) -> None:
        raise NotImplementedError

    async def prepare(self) -> None:
        """Work done once before the node says it is ready (the launch awaits it)."""


class NodeServer:
    """`scrape_allow`: the scrape port's checks, the same for every node of a process (the
    launcher makes them once); made here if not given."""

    def __init__(
        self, ctx: NodeContext, allowlist: AllowList, app: App, scrape_allow: MetricsAllowList | None = None
    ) -> None:
        self.ctx = ctx
        self.allow = allowlist
        self.app = app
        self.metrics = app.metrics = NodeMetrics(ctx.node.id, ctx.node.kind)
        if callable(getattr(app, "collect", None)):  # an app with state to read at scrape time
            self.metrics.register(app)
        self._scrape_allow = scrape_allow
        self.denials: Counter[str] = Counter()
        self.connections = 0
        self.resumed = 0  # TLS handshakes that resumed a session (a ticket) instead of a full one
        self.limits = ctx.limits
        self._per_peer: Counter[str] = Counter()  # open connections by peer address
        self._denied = trio.Event()  # set (and renewed) at every denial, for `until_denied`

    @property
    def scrape_allow(self) -> MetricsAllowList | ByCertificate:
        if self._scrape_allow is None:
            self._scrape_allow = scrape_allowlist(self.ctx.topo, self.ctx.mode)
        return self._scrape_allow

    def deny(self, reason: str, peer: str, identity: str | None = None) -> None:
        self.denials[reason] += 1
        self.metrics.denials.labels(reason).inc()
        self._denied, denied = trio.Event(), self._denied
        denied.set()
        log.warning("deny node=%s peer=%s id=%s reason=%s", self.ctx.node.id, peer, identity or "-", reason)

    async def until_denied(self, reason: str, count: int = 1) -> None:
        """Wait until `reason` has been counted `count` times (tests and checks wait on it, never sleep)."""
        while self.denials[reason] < count:
            await self._denied.wait()

    def bind(self, acceptor: Acceptor) -> None:
        """Open this node's listening sockets (service, scrape) into `acceptor`, synchronously: a
        launcher binds node after node without a task round trip each, its identities checked
        beforehand (`check_identities`); `NodeStartError` names the node."""
        acceptor.add(self._listen(self.ctx.node.port), self._connection)
        acceptor.add(self._listen(self.scrape_allow.port), self._scrape)

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """This node alone: check its identity, bind, report ready, then serve each connection in its own task."""
        self.ctx.check_tls_files()  # the context itself is made at the first connection
        acceptor = Acceptor()
        try:
            self.bind(acceptor)
        except BaseException:
            acceptor.close()
            raise
        async with trio.open_nursery() as nursery:
            task_status.started()
            await acceptor.run(nursery)

    def _listen(self, port: int | None, backlog: int = 1024, what: str = "address") -> socket.socket:
        address = self.ctx.address
        try:
            return listening_socket(
                address, port or 0, backlog=backlog, netns=self.ctx.netns, reuse_port=self.ctx.reuse_port
            )
        except OSError as exc:
            why = "is taken" if exc.errno == errno.EADDRINUSE else f"cannot be used ({exc.strerror})"
            raise NodeStartError(f"{self.ctx.node.id}: {what} {address}:{port} {why}") from None

    async def _connection(self, tcp: trio.SocketStream) -> None:
        """One accepted connection: the peer address before the TLS handshake, the certificate
        identity after it, then HTTP/2. Whichever way it ends, the `finally` closes it."""
        try:
            try:
                ip = tcp.socket.getpeername()[0]
            except OSError:
                return  # the peer left before we looked
            decision = self.allow.check_address(ip)
            if not decision.allowed:
                self.deny(decision.reason or "peer-address", ip)
                return
            if self._per_peer[ip] >= self.limits.max_connections_per_peer:
                self.deny("too-many-connections", ip)
                return
            self._per_peer[ip] += 1
            try:
                await self._admitted(tcp, ip)
            finally:
                self._per_peer[ip] -= 1
                if not self._per_peer[ip]:
                    del self._per_peer[ip]
        finally:
            await trio.aclose_forcefully(tcp)  # a no-op once TrioH2.run closed TLS politely

    async def _admitted(self, tcp: trio.SocketStream, ip: str) -> None:
        """An allowed address within its connection limit: TLS, the certificate, then HTTP/2."""
        tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            ctx = self.ctx.server_tls()  # made at the node's first connection, then cached
        except OSError:  # no descriptor free to read the PKI files (ssl.SSLError is an OSError too)
            self.deny("tls-context", ip)
            return
        tls = trio.SSLStream(LingeringSocket(tcp), ctx, server_side=True)
        try:
            with trio.fail_after(self.limits.handshake_timeout):
                await tls.do_handshake()
        except trio.TooSlowError:
            self.metrics.tls_handshakes.labels("timeout").inc()
            self.deny("handshake-timeout", ip)  # slow handshake: TCP open, TLS never finished
            return
        except TRANSPORT_ERRORS as exc:
            self.metrics.tls_handshakes.labels("failed").inc()
            await _send_alert(tls, tcp)
            cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else exc
            # no protocol in common (the no_application_protocol alert): counted as ALPN, as before
            alpn = getattr(cause, "reason", None) == "NO_APPLICATION_PROTOCOL"
            self.deny("alpn" if alpn else "tls-handshake", ip)
            return
        self.metrics.tls_handshakes.labels("ok").inc()
        handshakes.count(self.ctx.node.kind, tls.session_reused)
        if tls.session_reused:  # the identity is the one the ticket's full handshake verified
            self.resumed += 1
            self.metrics.tls_resumed.inc()
        identity = peer_identity(tls.getpeercert())
        decision = self.allow.check_identity(ip, identity or "")
        if not decision.allowed or tls.selected_alpn_protocol() != "h2":
            self.deny(decision.reason or "alpn", ip, identity)
            return
        self.connections += 1
        self.metrics.connections.inc()

        def ended(reason: str | None) -> None:  # counted before the (lingering) close, as the peer sees it
            if reason not in ORDINARY_CLOSE:
                self.deny(reason, ip, identity)

        conn = TrioH2(tls, client_side=False, peer=identity or ip, limits=self.limits, on_end=ended)
        with self.metrics.connections_open.track_inprogress():
            await self.app.serve_connection(conn, Peer(ip, identity or ""), self)

    def admit(self, headers: Headers | None, peer: Peer) -> Handler | None:
        """Per request: method and path against the allow-list. None: allowed; else the handler
        that answers the refusal (the denial is already counted)."""
        method, path = method_path(headers)
        self.metrics.request(method)
        decision = self.allow.check_request(peer.identity, method, path)
        if decision.allowed:
            return None
        reason = decision.reason or "request-not-allowed"
        self.deny(reason, peer.address, peer.identity)
        return lambda stream: refuse(stream, 403, reason, "This request is not allowed on this line.")

    async def dispatch(self, stream: Stream, peer: Peer, handle) -> None:
        """Per request: the allow-list (`admit`), then the app."""
        refused = self.admit(stream.headers, peer)
        if refused is not None:
            await refused(stream)
            return
        with self.metrics.streams_in_flight.track_inprogress():
            await handle(stream, peer)

    async def _scrape(self, tcp: trio.SocketStream) -> None:
        """One connection to the scrape port: the monitoring address before TLS, the monitoring
        principal after it, then one HTTP/1.1 `GET /metrics` answered with this node's counters.
        Nothing here forwards, so the scrape port is never a path (topology/policy/monitoring.py)."""
        try:
            try:
                ip = tcp.socket.getpeername()[0]
            except OSError:
                return
            decision = self.scrape_allow.check_address(ip)
            if not decision.allowed:
                self.deny(decision.reason or "peer-address", ip)
                return
            # Prometheus and curl speak HTTP/1.1 to the scrape port. Its context is made at the first
            # scrape (then cached by server_context): half of `up`'s start time on a large file
            # went to contexts, and most nodes of a large topology are never scraped.
            try:
                ctx = self.ctx.server_tls("http/1.1")
            except OSError:
                self.deny("tls-context", ip)
                return
            tls = trio.SSLStream(tcp, ctx, server_side=True)
            with trio.move_on_after(self.limits.handshake_timeout) as late:
                try:
                    await tls.do_handshake()
                    identity = peer_identity(tls.getpeercert())
                    decision = self.scrape_allow.check_identity(ip, identity or "")
                    if not decision.allowed:
                        self.deny(decision.reason or "peer-identity", ip, identity)
                        return
                    head = await read_request_head(tls)
                    decision = self.scrape_allow.check_request(*head) if head else None
                    if decision is None or not decision.allowed:
                        self.deny("request-not-allowed", ip, identity)
                        answer = http_response(400 if head is None else 403, b"request-not-allowed\n")
                    else:
                        self.metrics.scrapes.inc()
                        answer = http_response(200, self.metrics.exposition(), CONTENT_TYPE)
                    await tls.send_all(answer)
                    await tls.aclose()  # close_notify: the client reads the whole answer, then EOF
                except TRANSPORT_ERRORS:
                    self.deny("tls-handshake", ip)
            if late.cancelled_caught:
                self.deny("handshake-timeout", ip)
        finally:
            await trio.aclose_forcefully(tcp)


async def _send_alert(tls: trio.SSLStream, tcp: trio.SocketStream) -> None:
    """Tell a refused client why (protocol version, certificate required, unknown CA …): RFC 8446
    §6.2 says a server SHOULD. OpenSSL has queued the alert, but trio's SSLStream marks itself
    broken on the handshake error before writing it, so the alert goes out from its buffer here."""
    alert = getattr(tls, "_outgoing", None)  # trio's outgoing MemoryBIO (private, hence getattr)
    data = alert.read() if alert is not None else b""
    if data:
        with trio.move_on_after(1):
            try:
                await tcp.send_all(data)
            except TRANSPORT_ERRORS:
                pass
