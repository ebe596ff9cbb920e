"""The relays: store router, EC-center router and DMZ relay (SEC-EC-1, SEC-EC-3, SEC-ST-2).

Each downstream connection gets its own upstream connection (paired), so one peer's streams
never queue behind another's and a peer going away takes exactly its own upstream with it.
Bodies stream both ways: a chunk is acknowledged to its sender only after it was handed to
the other side, so memory per stream stays bounded by the HTTP/2 windows whatever the size
of the document. Any reset or timeout on one side resets the other: a request is cancelled
whole (INT-1).
"""

from __future__ import annotations

import logging
import ssl
import time
from functools import partial

import h2.errors
import trio

from gateway.node.server import App, NodeContext, NodeServer, Peer
from gateway.protocol.h2core import ConnectionClosed, Headers
from gateway.protocol.h2trio import Stream, StreamReset, TrioH2
from gateway.protocol.http import refuse, timing

log = logging.getLogger("konbini.relay")

CONNECT_TIMEOUT = 5.0  # TCP + TLS to one next hop; then the next one is tried
RESPONSE_TIMEOUT = 30.0  # upstream must answer with headers within this; then the request is cancelled whole

# Headers a kiosk may not set itself: the store router vouches for who asked (INT-1 binding).
ATTESTED = (b"konbini-kiosk", b"konbini-store")


class Relay(App):
    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx
        self.upstream = ctx.topo.node(ctx.node.upstream or "")
        self.hops = [ctx.topo.node(h) for h in ctx.node.hops] or [self.upstream]  # redundancy: several next hops
        self._turn = -1
        self.first_hop = ctx.node.kind == "store-router"
        self.streams_forwarded = 0
        self.max_buffered = 0  # high-water mark of bytes held for one stream (tests check the bound)

    async def serve_connection(self, conn: TrioH2, peer: Peer, server: NodeServer) -> None:
        up = await self._connect_upstream()
        async with trio.open_nursery() as nursery:
            if up is not None:
                nursery.start_soon(self._run_upstream, up, conn)
            await conn.run(lambda s: server.dispatch(s, peer, partial(self.forward, up=up)))
            if up is not None:
                up.close()

    async def _connect_upstream(self) -> TrioH2 | None:
        """The first next hop that answers, tried in the declared order ("failover") or starting one
        further along for each connection ("balance"); None when none does (the peer gets 502s and
        reconnects, and the hops are tried again)."""
        hops = self.hops
        if self.ctx.node.upstream_policy == "balance" and len(hops) > 1:
            self._turn = (self._turn + 1) % len(hops)
            hops = hops[self._turn :] + hops[: self._turn]
        for hop in hops:
            try:
                with trio.fail_after(CONNECT_TIMEOUT):  # a hop that drops SYNs must not hold the failover for minutes
                    return await self.ctx.connect(hop)
            except (OSError, ssl.SSLError, trio.TooSlowError, trio.BrokenResourceError, ConnectionError) as exc:
                log.warning("node=%s upstream=%s unreachable: %s", self.ctx.node.id, hop.id, exc)
                self.metrics.upstream_failures.labels("unreachable").inc()
        return None

    @staticmethod
    async def _run_upstream(up: TrioH2, conn: TrioH2) -> None:
        try:
            await up.run()
        finally:
            # Paired both ways: once the upstream is gone (the next hop restarted), the downstream is
            # closed too, so its peer reconnects and gets a fresh upstream instead of 502s for ever.
            conn.close()

    def _rewrite(self, headers: Headers, peer: Peer) -> Headers:
        if not self.first_hop:
            return headers
        out = [(k, v) for k, v in headers if k not in ATTESTED]
        out.append((b"konbini-kiosk", peer.identity.encode()))
        out.append((b"konbini-store", self.ctx.node.site.encode()))
        return out

    async def forward(self, ds: Stream, peer: Peer, up: TrioH2 | None) -> None:
        t0 = time.perf_counter()
        if up is None or up.core.closed:
            self.metrics.upstream_failures.labels("unavailable").inc()
            await refuse(ds, 502, "upstream-unavailable", "The service is temporarily unavailable.")
            ds.conn.close()  # no upstream on this connection: the peer reconnects, and we try the next hop again
            return
        request_done = ds.st.ended and not ds.st.chunks
        try:
            us = await up.open_stream(self._rewrite(ds.headers or [], peer), end_stream=request_done)
        except ConnectionClosed:
            self.metrics.upstream_failures.labels("unavailable").inc()
            await refuse(ds, 502, "upstream-unavailable", "The service is temporarily unavailable.")
            ds.conn.close()
            return
        own = time.perf_counter() - t0
        self.streams_forwarded += 1
        try:
            if request_done:  # most requests: no body to pump, so no nursery to open
                await self._answer(ds, us, t0, own)
            else:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, ds, us, "request")
                    await self._answer(ds, us, t0, own, request_body=nursery.cancel_scope)
        except* (StreamReset, ConnectionClosed):
            ds.reset(h2.errors.ErrorCodes.CANCEL)  # one side cancelled or died: cancel the other too
        finally:
            up.release(us)  # resets upstream if unfinished (downstream cancelled or timed out)

    async def _answer(self, ds: Stream, us: Stream, t0: float, own: float, request_body: trio.CancelScope | None = None) -> None:
        """The next hop's answer back to the peer, with this hop's server-timing. No headers within
        RESPONSE_TIMEOUT: the request body stops (`request_body`, the scope of its pump), the peer
        gets a 504 and the caller's release resets the upstream stream, so the request ends whole."""
        with trio.move_on_after(RESPONSE_TIMEOUT) as timeout:
            headers = await us.receive_headers()
        if timeout.cancelled_caught:
            if request_body is not None:
                request_body.cancel()
            self.metrics.upstream_failures.labels("timeout").inc()
            await refuse(ds, 504, "upstream-timeout", "The service did not answer in time.")
            return
        t2 = time.perf_counter()
        end = us.st.ended and not us.st.chunks and us.st.trailers is None
        ds.send_headers([*headers, timing(self.ctx.node.id, t2 - own, upstream=t2 - t0 - own, queue=t0 - ds.st.received_at)], end_stream=end)
        if not end:
            await self._pump(us, ds, "response")

    async def _pump(self, src: Stream, dst: Stream, direction: str) -> None:
        """Move one direction's body; each chunk is acked to its sender only once the other side took it."""
        relayed = self.metrics.bytes_relayed.labels(direction)

        def observe(chunk: bytes) -> None:
            held = len(chunk) + src.st.buffered
            if held > self.max_buffered:
                self.max_buffered = held
            relayed.inc(len(chunk))

        await src.forward_body(dst, observe)
        dst.end(src.trailers)
