"""The relays: store router, EC-center router and DMZ relay (SEC-EC-1, SEC-EC-3, SEC-ST-2).

Each downstream connection gets its own upstream connection (paired), so one peer's streams
never queue behind another's and a peer going away takes exactly its own upstream with it.
The two are spliced (`gateway.protocol.splice`): each request is checked against the
allow-list and forwarded in the reader that read it, and everything after that moves between
the two connections' readers with no task per request. Bodies stream both ways: a chunk is
acknowledged to its sender only after it was handed to the other side, so memory per stream
stays bounded by the HTTP/2 windows whatever the size of the document. Any reset or timeout on
one side resets the other: a request is cancelled whole (INT-1).

A next hop that stops answering (hung, not dead) is found by a PING with a deadline on the busy
upstream (`gateway.transport.keepalive`): the pair is closed (its requests reset whole, the peer
reconnects) and the hop is set aside (`gateway.transport.outliers`) until a probe's handshake
with it succeeds, so new connections go straight to the other hops.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from functools import partial

import trio

from gateway.node.server import App, NodeContext, NodeServer, Peer
from gateway.protocol.driver import Stream
from gateway.protocol.errors import LinkError
from gateway.protocol.frames import REFUSED_STREAM
from gateway.protocol.h2trio import Handler, TrioH2
from gateway.protocol.http import refuse, timing
from gateway.protocol.splice import Pair, Splice
from gateway.protocol.streams import Headers, StreamState, header_list_size
from gateway.transport.keepalive import Keepalive, Verdict
from gateway.transport.outliers import Outliers

log = logging.getLogger("konbini.relay")

CONNECT_TIMEOUT = 5.0  # TCP + TLS to one next hop; then the next one is tried
RESPONSE_TIMEOUT = 30.0  # upstream must answer with headers within this; then the request is cancelled whole
# Response bytes a downstream connection may have queued for its socket; the rest waits unacked in
# the upstream core, so a stream holds one window here, not also a second one in our output queue.
OUTPUT_ROOM = 256 * 1024
POLL = 1.0  # the deadline task looks at least this often (response timeouts need no finer grain)
KEEPALIVE_INTERVAL = 1.0  # a busy upstream silent this long is sent a PING
KEEPALIVE_TIMEOUT = 2.0  # no answer to it within this: the next hop is hung, the pair is closed
PROBE_INTERVAL = 1.0  # seconds between handshakes with a set-aside next hop

# Headers a kiosk may not set itself: the store router vouches for who asked (INT-1 binding).
ATTESTED = (b"konbini-kiosk", b"konbini-store")


class Alarm:
    """Wakes the deadline task early: a new stall may be due before the time it sleeps to."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = trio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait(self, deadline: float) -> None:
        with trio.move_on_at(deadline):
            await self._event.wait()
        self._event = trio.Event()


class Relay(App):
    def __init__(self, ctx: NodeContext, nursery: trio.Nursery | None = None) -> None:
        """`nursery`: where set-aside hops are probed; without one, no hop is set aside."""
        self.ctx = ctx
        self.upstream = ctx.topo.node(ctx.node.upstream or "")
        self.hops = [ctx.topo.node(h) for h in ctx.node.hops] or [self.upstream]  # redundancy: several next hops
        self.outliers = Outliers([hop.id for hop in self.hops])
        self._nursery = nursery
        self._turn = -1
        self.first_hop = ctx.node.kind == "store-router"
        self.streams_forwarded = 0
        self.max_buffered = 0  # high-water mark of bytes held for one stream (tests check the bound)

    async def serve_connection(self, conn: TrioH2, peer: Peer, server: NodeServer) -> None:
        up = await self._connect_upstream()
        if up is None:  # every request gets 502 and the connection closes: the peer reconnects, we try the hops again
            await conn.run(lambda s: server.dispatch(s, peer, self._unavailable))
            return
        metrics = self.metrics
        relayed = metrics.bytes_relayed
        in_flight = metrics.streams_in_flight

        def observe(direction: str, nbytes: int, held: int) -> None:
            if held > self.max_buffered:
                self.max_buffered = held
            metrics.labelled(relayed, direction).inc(nbytes)

        alarm = Alarm()
        splice = Splice(
            conn.core,
            up.core,
            stamp=self._stamp,
            observe=observe,
            on_done=lambda pair: in_flight.dec(),
            on_stall=alarm.set,
            clock=trio.current_time,
            response_timeout=RESPONSE_TIMEOUT,
            slow_read=conn.limits.slow_read_timeout if conn.limits else None,
            room=lambda: OUTPUT_ROOM - conn.unsent,
        )
        conn.take_request = partial(self._take, splice, server, peer, conn, up)
        conn.on_events = lambda woken: (splice.down_events(woken), up.flush())
        up.on_events = lambda woken: (splice.up_events(woken), conn.flush())
        conn.on_drained = lambda: (splice.drained(), up.flush())
        async with trio.open_nursery() as nursery:
            upstream = trio.CancelScope()
            nursery.start_soon(self._run_upstream, up, conn, splice, upstream)
            deadlines = trio.CancelScope()
            nursery.start_soon(self._deadlines, splice, conn, up, deadlines, alarm, partial(self._hung, up, upstream))
            try:
                await conn.run(lambda s: server.dispatch(s, peer, self._unavailable))
            finally:
                splice.close()  # the peer is gone: every request still crossing is reset upstream
                deadlines.cancel()
                up.close()

    def _take(
        self, splice: Splice, server: NodeServer, peer: Peer, conn: TrioH2, up: TrioH2, st: StreamState
    ) -> Handler | None:
        """A request, in the downstream reader: the allow-list, then forwarded at once (None), or
        the handler that refuses it."""
        read_at = time.perf_counter()
        refused = server.admit(st.headers, peer)
        if refused is not None:
            return refused
        if up.core.closed:
            return self._unavailable_handler(peer)
        headers = self._rewrite(st.headers or [], peer)
        continues = any(k == b"expect" and v.lower() == b"100-continue" for k, v in headers)
        if continues:  # answered here (below): the hops behind need not wait on one another's 100
            headers = [(k, v) for k, v in headers if k != b"expect"]
        limit = up.core.peer_max_header_list
        if limit is not None and header_list_size(headers) > limit:
            # the next hop would take it for an HPACK bomb and close the connection every request
            # of this peer shares: this one request is refused here instead
            server.deny("header-list-too-large", peer.address, peer.identity)
            return self._too_large
        if splice.open(st, headers, read_at) is None:
            # upstream is at its concurrent-stream limit: refused unprocessed, so the peer may retry
            conn.core.reset(st.id, REFUSED_STREAM)
            conn.core.forget(st.id)
            return None
        if continues and not st.ended:
            # RFC 9110 §10.1.1: the client waits for this before it sends the body; we already
            # chose to forward the request, so the body is welcome
            conn.core.send_headers(st.id, [(b":status", b"100")])
        self.streams_forwarded += 1
        self.metrics.streams_in_flight.inc()
        up.flush()
        return None

    def _unavailable_handler(self, peer: Peer) -> Handler:
        return lambda s: self._unavailable(s, peer)

    async def _unavailable(self, ds: Stream, peer: Peer) -> None:
        self.metrics.upstream_failures.labels("unavailable").inc()
        await refuse(ds, 502, "upstream-unavailable", "The service is temporarily unavailable.")
        ds.conn.close()  # no upstream on this connection: the peer reconnects, and we try the next hop again

    def _stamp(self, pair: Pair, headers: Headers) -> Headers:
        """The next hop's response headers with this hop's server-timing added."""
        now = time.perf_counter()
        return [*headers, timing(self.ctx.node.id, now - pair.own, upstream=now - pair.opened, queue=pair.queue)]

    async def _deadlines(
        self, splice: Splice, conn: TrioH2, up: TrioH2, scope: trio.CancelScope, alarm: Alarm, hung: Callable[[], None]
    ) -> None:
        """Late answers get 504 (the upstream stream reset, INT-1); a peer that keeps its window
        shut on a waiting response past slow_read_timeout is closed, as any slow reader is; an
        upstream that does not answer a PING is hung (`hung`)."""
        # Only where there is another hop to pass over to: with one, a slow next hop would only turn
        # slow issuances into failed ones.
        keepalive = Keepalive(KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT) if len(self.hops) > 1 else None
        with scope:
            while True:
                busy = bool(up.core.streams)
                alive_by = keepalive.next_check(up.last_read, busy) if keepalive else math.inf
                await alarm.wait(min(splice.next_deadline(), alive_by, trio.current_time() + POLL))
                if conn.core.closed:  # the connection is ending: its requests are reset, not answered
                    return
                now = trio.current_time()
                verdict = keepalive.check(now, up.last_read, bool(up.core.streams)) if keepalive else None
                if verdict is Verdict.HUNG:
                    splice.close()  # its requests are reset downstream whole (INT-1); the kiosk retries
                    conn.close()
                    hung()
                    return
                if verdict is Verdict.PING:
                    up.core.ping()
                for st in splice.overdue(now):
                    self.metrics.upstream_failures.labels("timeout").inc()
                    conn.serve(st, self._late)
                if splice.stalled(now):
                    conn.abort("slow-read")
                up.flush()
                conn.flush()

    @staticmethod
    async def _too_large(ds: Stream) -> None:
        await refuse(ds, 431, "header-list-too-large", "The request's headers are too large to pass on.")

    async def _late(self, ds: Stream) -> None:
        await refuse(ds, 504, "upstream-timeout", "The service did not answer in time.")

    async def _connect_upstream(self) -> TrioH2 | None:
        """The first next hop that answers, tried in the declared order ("failover") or starting one
        further along for each connection ("balance"), those set aside last; None when none does
        (the peer gets 502s and reconnects, and the hops are tried again)."""
        order = list(range(len(self.hops)))
        if self.ctx.node.upstream_policy == "balance" and len(order) > 1:
            self._turn = (self._turn + 1) % len(order)
            order = order[self._turn :] + order[: self._turn]
        for i in sorted(order, key=self.outliers.is_set_aside):  # stable: the policy's order otherwise
            hop = self.hops[i]
            try:
                with trio.fail_after(CONNECT_TIMEOUT):  # a hop that drops SYNs must not hold the failover for minutes
                    up = await self.ctx.connect(hop)
            except (LinkError, trio.TooSlowError) as exc:
                log.warning("node=%s upstream=%s unreachable: %s", self.ctx.node.id, hop.id, exc)
                self.metrics.upstream_failures.labels("unreachable").inc()
                self._set_aside(i)
                continue
            self.outliers.answered(i)  # tried as a last resort, and it answered
            return up
        return None

    def _hung(self, up: TrioH2, upstream: trio.CancelScope) -> None:
        """`up` did not answer a PING: its run is cancelled (a GOAWAY would wait on a peer that
        reads nothing) and its hop is set aside."""
        log.warning("node=%s upstream=%s hung: no answer to a PING", self.ctx.node.id, up.peer)
        self.metrics.upstream_failures.labels("hung").inc()
        upstream.cancel()
        self._set_aside(self.outliers.names.index(up.peer))  # a connection's peer is its hop's id

    def _set_aside(self, i: int) -> None:
        if self._nursery is not None and self.outliers.failed(i, trio.current_time()):
            self._nursery.start_soon(self._probe, i)

    async def _probe(self, i: int) -> None:
        """Handshake with a set-aside hop every PROBE_INTERVAL (HAProxy's `check-ssl` at `inter`)
        until one succeeds, then put it back in service."""
        hop = self.hops[i]
        while self.outliers.is_set_aside(i):
            await trio.sleep(PROBE_INTERVAL)  # a health check's period, not a wait for an event
            try:
                with trio.fail_after(CONNECT_TIMEOUT):
                    probe = await self.ctx.connect(hop)
            except (LinkError, trio.TooSlowError):
                continue
            await trio.aclose_forcefully(probe.transport)
            self.outliers.answered(i)
            log.info("node=%s upstream=%s answers again; back in service", self.ctx.node.id, hop.id)

    @staticmethod
    async def _run_upstream(up: TrioH2, conn: TrioH2, splice: Splice, scope: trio.CancelScope) -> None:
        try:
            with scope:
                await up.run()
        finally:
            # Paired both ways: once the upstream is gone (the next hop restarted), its requests are
            # reset downstream and the downstream is closed too, so its peer reconnects and gets a
            # fresh upstream instead of 502s for ever.
            splice.close()
            conn.close()

    def _rewrite(self, headers: Headers, peer: Peer) -> Headers:
        if not self.first_hop:
            return headers
        out = [(k, v) for k, v in headers if k not in ATTESTED]
        out.append((b"konbini-kiosk", peer.identity.encode()))
        out.append((b"konbini-store", self.ctx.node.site.encode()))
        return out
