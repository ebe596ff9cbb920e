"""The relays: store router, EC-center router and DMZ relay (SEC-EC-1, SEC-EC-3, SEC-ST-2).

A relay connects upstream in one of two ways (the topology's `upstream_connections`, docs/pooling.md).
Paired (the store router's default): each downstream connection gets its own upstream
connection, so one peer's streams never queue behind another's and a peer going away takes
exactly its own upstream with it. Pooled (the EC routers' and DMZ relays' default): the streams
of every downstream connection share a few upstream connections per next hop
(`gateway.transport.pool`), so a thousand stores cost the next hop a handful of connections and
handshakes. Either way the streams are spliced (`gateway.protocol.splice`): each request is
checked against the allow-list and forwarded in the reader that read it, and everything after
that moves between the connections' readers with no task per request. Bodies stream both ways: a chunk is
acknowledged to its sender only after it was handed to the other side, so memory per stream
stays bounded by the HTTP/2 windows whatever the size of the document. Any reset or timeout on
one side resets the other: a request is cancelled whole (INT-1).

A next hop that stops answering (hung, not dead) is found by a PING with a deadline on the busy
upstream (`gateway.transport.keepalive`): the pair is closed (its requests reset whole, the peer
reconnects) and the hop is set aside (`gateway.transport.outliers`) until a probe's handshake
with it succeeds, so new connections go straight to the other hops. Pooled, the PING goes on
each pooled connection and a hung one resets exactly the requests it carried.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator
from functools import partial

import trio
from prometheus_client.core import GaugeMetricFamily

from gateway.node.server import App, NodeContext, NodeServer, Peer
from gateway.protocol.driver import Stream
from gateway.protocol.errors import LinkError
from gateway.protocol.frames import REFUSED_STREAM
from gateway.protocol.h2trio import Handler, TrioH2
from gateway.protocol.http import refuse, timing
from gateway.protocol.splice import Carrier, Pair, Splice
from gateway.protocol.streams import Headers, StreamState, header_list_size
from gateway.transport.keepalive import Keepalive, Verdict
from gateway.transport.outliers import Outliers
from gateway.transport.pool import Member, UpstreamPool

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
        self.paired_upstreams: Counter[str] = Counter()  # next hop -> paired upstream connections open
        way = ctx.topo.upstream_connections_for(ctx.node)
        # pooled connections outlive the downstream connections that use them: they run in the
        # node's nursery, so a relay made without one pairs
        self.pool = (
            UpstreamPool(way.streams, way.connections, way.idle_timeout, spread=ctx.node.upstream_policy == "balance")
            if way.mode == "pooled" and nursery is not None
            else None
        )
        self._dialled = trio.Event()  # set (and renewed) whenever a pooled dial ends
        self._tending = False

    async def serve_connection(self, conn: TrioH2, peer: Peer, server: NodeServer) -> None:
        if self.pool is not None:
            await self._serve_pooled(conn, peer, server)
        else:
            await self._serve_paired(conn, peer, server)

    def _splice(self, conn: TrioH2, up: TrioH2 | None, alarm: Alarm) -> Splice:
        metrics = self.metrics
        relayed = metrics.bytes_relayed
        in_flight = metrics.streams_in_flight

        def observe(direction: str, nbytes: int, held: int) -> None:
            if held > self.max_buffered:
                self.max_buffered = held
            metrics.labelled(relayed, direction).inc(nbytes)

        return Splice(
            conn.core,
            up.core if up is not None else None,
            stamp=self._stamp,
            observe=observe,
            on_done=lambda pair: in_flight.dec(),
            on_stall=alarm.set,
            clock=trio.current_time,
            response_timeout=RESPONSE_TIMEOUT,
            slow_read=conn.limits.slow_read_timeout if conn.limits else None,
            room=lambda: OUTPUT_ROOM - conn.unsent,
            flush=conn.flush,
        )

    async def _serve_paired(self, conn: TrioH2, peer: Peer, server: NodeServer) -> None:
        up = await self._connect_upstream()
        if up is None:  # every request gets 502 and the connection closes: the peer reconnects, we try the hops again
            await conn.run(lambda s: server.dispatch(s, peer, self._unavailable))
            return
        alarm = Alarm()
        splice = self._splice(conn, up, alarm)
        conn.take_request = partial(self._take, splice, server, peer, conn, up)
        conn.on_events = lambda woken: (splice.down_events(woken), up.flush())
        up.on_events = lambda woken: (splice.up_events(woken), conn.flush())
        conn.on_drained = lambda: (splice.drained(), up.flush())
        hop = up.peer
        self.paired_upstreams[hop] += 1
        try:
            async with trio.open_nursery() as nursery:
                upstream = trio.CancelScope()
                nursery.start_soon(self._run_upstream, up, conn, splice, upstream)
                deadlines = trio.CancelScope()
                hung = partial(self._hung, up, upstream)
                nursery.start_soon(self._deadlines, splice, conn, up, deadlines, alarm, hung)
                try:
                    await conn.run(lambda s: server.dispatch(s, peer, self._unavailable))
                finally:
                    splice.close()  # the peer is gone: every request still crossing is reset upstream
                    deadlines.cancel()
                    up.close()
        finally:
            self.paired_upstreams[hop] -= 1

    async def _serve_pooled(self, conn: TrioH2, peer: Peer, server: NodeServer) -> None:
        """Pooled: this connection's requests go out on the relay's shared upstream connections.
        As paired, it is served only once an upstream is there (else 502s, and the peer reconnects)."""
        if not await self._pool_ready():
            await conn.run(lambda s: server.dispatch(s, peer, self._unavailable))
            return
        alarm = Alarm()
        splice = self._splice(conn, None, alarm)
        conn.take_request = partial(self._take, splice, server, peer, conn, None)
        conn.on_events = lambda woken: (splice.down_events(woken), self._flush_pool())
        conn.on_drained = lambda: (splice.drained(), self._flush_pool())
        async with trio.open_nursery() as nursery:
            deadlines = trio.CancelScope()
            nursery.start_soon(self._deadlines, splice, conn, None, deadlines, alarm, None)
            try:
                await conn.run(lambda s: server.dispatch(s, peer, self._unavailable))
            finally:
                splice.close()  # the peer is gone: its requests are reset upstream, no one else's
                deadlines.cancel()
                self._flush_pool()

    def _take(
        self, splice: Splice, server: NodeServer, peer: Peer, conn: TrioH2, up: TrioH2 | None, st: StreamState
    ) -> Handler | None:
        """A request, in the downstream reader: the allow-list, then forwarded at once (None), or
        the handler that refuses it. `up`: the paired upstream (None: pooled)."""
        read_at = time.perf_counter()
        refused = server.admit(st.headers, peer)
        if refused is not None:
            return refused
        if up is not None and up.core.closed:
            return self._unavailable_handler(peer)
        headers = self._rewrite(st.headers or [], peer)
        continues = any(k == b"expect" and v.lower() == b"100-continue" for k, v in headers)
        if continues:  # answered here (below): the hops behind need not wait on one another's 100
            headers = [(k, v) for k, v in headers if k != b"expect"]
        request = (splice, server, peer, conn, st, headers, continues, read_at)
        if up is not None:
            return self._forward(request, up, None)
        assert self.pool is not None
        member = self.pool.pick()
        if member is None:  # no pooled connection has room: wait for the one being dialled
            if self.pool.wants_dial() and not self._start_dial():
                # every next hop has its `connections`, each at its stream limit: refused
                # unprocessed, so the peer may retry
                self._refuse_stream(conn, st)
                return None
            self.pool.parked.append(request)
            return None
        return self._forward(request, member.conn, member)

    def _forward(self, request: tuple, up: TrioH2, member: Member | None) -> Handler | None:
        """Open the request on `up` (the paired upstream, or a pooled `member`'s): None, or the
        handler that refuses it."""
        splice, server, peer, conn, st, headers, continues, read_at = request
        limit = up.core.peer_max_header_list
        if limit is not None and header_list_size(headers) > limit:
            # the next hop would take it for an HPACK bomb and close the connection every request
            # on it shares: this one request is refused here instead
            server.deny("header-list-too-large", peer.address, peer.identity)
            return self._too_large
        if splice.open(st, headers, read_at, member.carrier if member is not None else None) is None:
            # upstream is at its concurrent-stream limit: refused unprocessed, so the peer may retry
            self._refuse_stream(conn, st)
            return None
        if continues and not st.ended:
            # RFC 9110 §10.1.1: the client waits for this before it sends the body; we already
            # chose to forward the request, so the body is welcome
            conn.core.send_headers(st.id, [(b":status", b"100")])
        self.streams_forwarded += 1
        self.metrics.streams_in_flight.inc()
        up.flush()
        if member is not None and self.pool is not None and self.pool.wants_dial():
            self._start_dial()  # that was the last room: the next connection is dialled ahead of need
        return None

    @staticmethod
    def _refuse_stream(conn: TrioH2, st: StreamState) -> None:
        conn.core.reset(st.id, REFUSED_STREAM)
        conn.core.forget(st.id)
        conn.flush()

    # -- the pool ---------------------------------------------------------------------------

    def _flush_pool(self) -> None:
        """After a downstream reader pass: write whatever it queued on the pooled connections."""
        assert self.pool is not None
        for m in self.pool.members:
            if m.conn.core.pending_output:
                m.conn.flush()

    async def _pool_ready(self) -> bool:
        """At least one pooled connection is up (dialled now if none is): False when no next hop answers."""
        assert self.pool is not None
        while not self.pool.members:
            if not self.pool.dialling and not self._start_dial():
                return False
            dialled = self._dialled
            await dialled.wait()
            if not self.pool.members and not self.pool.dialling:
                return False
        return True

    def _start_dial(self) -> bool:
        """Dial one more pooled connection (rule 2), in the node's nursery; False when every next
        hop already has its `connections`."""
        pool = self.pool
        assert pool is not None and self._nursery is not None
        order = self._hop_order()
        order = [i for i in order if pool.may_dial(self.hops[i].id)]
        if not order:
            return False
        pool.dialling = True
        self._nursery.start_soon(self._dial, order)
        if not self._tending:
            self._tending = True
            self._nursery.start_soon(self._tend)
        return True

    async def _dial(self, order: list[int]) -> None:
        pool = self.pool
        assert pool is not None and self._nursery is not None
        member = None
        try:
            for i in order:
                up = await self._try_hop(i)
                if up is not None:
                    keepalive = Keepalive(KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT) if len(self.hops) > 1 else None
                    member = Member(self.hops[i].id, Carrier(up.core), up, trio.CancelScope(), keepalive=keepalive)
                    break
        finally:
            pool.dialled(member, trio.current_time())
            self._dialled.set()
            self._dialled = trio.Event()
        if member is None:
            self._turn_away_parked()
            return
        up = member.conn
        up.on_events = lambda woken: self._flush_splices(member.carrier.events(woken))
        self._nursery.start_soon(self._run_member, member)
        self._unpark()

    def _unpark(self) -> None:
        """Requests that waited for room go out, oldest first, as far as the room goes."""
        pool = self.pool
        assert pool is not None
        while pool.parked:
            request = pool.parked[0]
            splice, server, peer, conn, st, *_ = request
            if conn.core.closed or st.reset_code is not None:  # the peer went, or cancelled it
                pool.parked.popleft()
                conn.core.forget(st.id)
                continue
            member = pool.pick()
            if member is None:
                if pool.wants_dial() and not self._start_dial():
                    for request in pool.parked:
                        self._refuse_stream(request[3], request[4])
                    pool.parked.clear()
                return
            pool.parked.popleft()
            handler = self._forward(request, member.conn, member)
            if handler is not None:
                conn.serve(st, handler)
            conn.flush()

    def _turn_away_parked(self) -> None:
        """No next hop answered: each waiting request gets 502, as an unpaired connection's would."""
        pool = self.pool
        assert pool is not None
        while pool.parked:
            splice, server, peer, conn, st, *_ = pool.parked.popleft()
            if conn.core.closed or st.reset_code is not None:
                conn.core.forget(st.id)
                continue
            conn.serve(st, self._unavailable_handler(peer))

    @staticmethod
    def _flush_splices(touched: set[Splice]) -> None:
        for splice in touched:
            if splice.flush is not None:
                splice.flush()

    async def _run_member(self, member: Member) -> None:
        """Run one pooled connection until it ends; then it leaves the pool and every request it
        carried is reset downstream, and no other (rule 4)."""
        assert self.pool is not None
        try:
            with member.scope:
                await member.conn.run()
        finally:
            self.pool.lost(member)
            self._flush_splices(member.carrier.close())
            if self.pool.parked and self.pool.wants_dial():
                self._start_dial()

    async def _tend(self) -> None:
        """The pool's clock: idle connections closed (rule 3), busy ones pinged where another
        hop could take over (a hung one is cut off and its hop set aside)."""
        pool = self.pool
        assert pool is not None
        while True:
            now = trio.current_time()
            wake = min(pool.next_expiry(), now + POLL)
            for m in pool.members:
                if m.keepalive is not None:
                    wake = min(wake, m.keepalive.next_check(m.conn.last_read, bool(m.carrier.pairs)))
            await trio.sleep_until(max(wake, now))  # a timer's period, not a wait for an event
            now = trio.current_time()
            for m in pool.expired(now):
                m.conn.close()  # GOAWAY: its run ends once the peer has it
            for m in list(pool.members):
                verdict = m.keepalive.check(now, m.conn.last_read, bool(m.carrier.pairs)) if m.keepalive else None
                if verdict is Verdict.HUNG:
                    pool.lost(m)
                    self._hung(m.conn, m.scope)
                elif verdict is Verdict.PING:
                    m.conn.core.ping()
                    m.conn.flush()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """Scrape time: upstream connections per next hop, and the streams each carries now."""
        conns = GaugeMetricFamily(
            "konbini_upstream_connections", "Upstream connections open, by next hop and mode.", labels=["hop", "mode"]
        )
        streams = GaugeMetricFamily(
            "konbini_upstream_connection_streams",
            "Streams a pooled upstream connection carries now, by next hop and connection.",
            labels=["hop", "connection"],
        )
        for hop, n in sorted(self.paired_upstreams.items()):
            conns.add_metric([hop, "paired"], n)
        if self.pool is not None:
            per_hop = Counter(m.hop for m in self.pool.members)
            for hop, n in sorted(per_hop.items()):
                conns.add_metric([hop, "pooled"], n)
            for index, m in enumerate(self.pool.members):
                streams.add_metric([m.hop, str(index)], m.streams)
        yield conns
        yield streams

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
        self,
        splice: Splice,
        conn: TrioH2,
        up: TrioH2 | None,
        scope: trio.CancelScope,
        alarm: Alarm,
        hung: Callable[[], None] | None,
    ) -> None:
        """Late answers get 504 (the upstream stream reset, INT-1); a peer that keeps its window
        shut on a waiting response past slow_read_timeout is closed, as any slow reader is; a
        paired upstream (`up`) that does not answer a PING is hung (`hung`). Pooled (no `up`),
        the pool's own task pings its connections."""
        # Only where there is another hop to pass over to: with one, a slow next hop would only turn
        # slow issuances into failed ones.
        keepalive = Keepalive(KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT) if len(self.hops) > 1 and up else None
        with scope:
            while True:
                alive_by = keepalive.next_check(up.last_read, bool(up.core.streams)) if keepalive and up else math.inf
                await alarm.wait(min(splice.next_deadline(), alive_by, trio.current_time() + POLL))
                if conn.core.closed:  # the connection is ending: its requests are reset, not answered
                    return
                now = trio.current_time()
                verdict = keepalive.check(now, up.last_read, bool(up.core.streams)) if keepalive and up else None
                if verdict is Verdict.HUNG and hung is not None:
                    splice.close()  # its requests are reset downstream whole (INT-1); the kiosk retries
                    conn.close()
                    hung()
                    return
                if verdict is Verdict.PING and up is not None:
                    up.core.ping()
                for st in splice.overdue(now):
                    self.metrics.upstream_failures.labels("timeout").inc()
                    conn.serve(st, self._late)
                if splice.stalled(now):
                    conn.abort("slow-read")
                if up is not None:
                    up.flush()
                else:
                    self._flush_pool()
                conn.flush()

    @staticmethod
    async def _too_large(ds: Stream) -> None:
        await refuse(ds, 431, "header-list-too-large", "The request's headers are too large to pass on.")

    async def _late(self, ds: Stream) -> None:
        await refuse(ds, 504, "upstream-timeout", "The service did not answer in time.")

    def _hop_order(self) -> list[int]:
        """The next hops to try for a new connection: in the declared order ("failover") or starting
        one further along each time ("balance"), those set aside last."""
        order = list(range(len(self.hops)))
        if self.ctx.node.upstream_policy == "balance" and len(order) > 1:
            self._turn = (self._turn + 1) % len(order)
            order = order[self._turn :] + order[: self._turn]
        return sorted(order, key=self.outliers.is_set_aside)  # stable: the policy's order otherwise

    async def _connect_upstream(self) -> TrioH2 | None:
        """The first next hop that answers, in `_hop_order`; None when none does (the peer gets
        502s and reconnects, and the hops are tried again)."""
        for i in self._hop_order():
            up = await self._try_hop(i)
            if up is not None:
                return up
        return None

    async def _try_hop(self, i: int) -> TrioH2 | None:
        hop = self.hops[i]
        try:
            with trio.fail_after(CONNECT_TIMEOUT):  # a hop that drops SYNs must not hold the failover for minutes
                up = await self.ctx.connect(hop)
        except (LinkError, trio.TooSlowError) as exc:
            log.warning("node=%s upstream=%s unreachable: %s", self.ctx.node.id, hop.id, exc)
            self.metrics.upstream_failures.labels("unreachable").inc()
            self._set_aside(i)
            return None
        self.outliers.answered(i)  # tried as a last resort, and it answered
        return up

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
