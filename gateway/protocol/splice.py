"""The relay fast path: HTTP/2 connections spliced stream by stream, inside their readers.

Theory of operation: a relay joins each request's downstream stream (on a connection it serves)
to an upstream stream (on a connection it opened, a `Carrier`). Paired, each downstream
connection has a carrier of its own; pooled, many downstream connections share a few carriers
(`gateway.transport.pool` picks one per request). A request's HEADERS open a stream upstream at
once, in the downstream reader; after that, whatever either reader receives for a pair is moved
to the other side before that reader reads again: the response HEADERS (stamped with this hop's
server-timing), DATA as far as the other side's windows allow, trailers, the end, a reset. There
is no task, event or cancel scope per request: on a relay, the per-request scheduling cost more
CPU than the frames themselves (py-spy, relay-64k), and a reset now crosses the hop in the same
pass that read it.

Three rules:
1. a chunk is acknowledged to its sender only once the other side took it; what the other
   side's windows do not take waits in this core's buffer (the sender is then out of window),
   so a stream holds at most one receive window here, whatever the body's size;
2. a reset on either side, a response that does not start in time, or the end of either
   connection resets the stream on the other side too: a request is cancelled whole (INT-1);
3. a connection's end touches its own pairs only: a downstream connection that dies resets its
   streams on a shared carrier and no other, a carrier that dies resets exactly the downstream
   streams it carried.

The response timeout runs from the end of the request: while its body is still coming, it runs
from the body's last progress instead, so an upload of any length at any steady pace goes
through, and one that stalls (or that the next hop stops taking) is still cut off.

Time is the caller's: `overdue(now)` hands back the requests whose answer is late (the driver
answers them 504), `stalled(now)` says a downstream peer has kept its window shut on a waiting
response past `slow_read` (the driver closes it, as for any slow reader). Like the cores, this
never touches a socket; drivers flush the connections after every call.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from gateway.protocol.errors import ConnectionClosed
from gateway.protocol.frames import CANCEL
from gateway.protocol.interfaces import Core
from gateway.protocol.streams import Headers, StreamState

# What a send on a stream or connection the peer just ended raises: the pair is reset whole.
GONE = ConnectionClosed


@dataclass(eq=False, slots=True)
class Pair:
    """One request as it crosses this hop: its downstream and upstream stream."""

    splice: Splice  # its downstream connection's side
    carrier: Carrier  # the upstream connection that carries it
    down: StreamState
    up: StreamState
    opened: float  # time.perf_counter() when the HEADERS went upstream
    own: float  # seconds this hop spent on the request before that
    queue: float  # seconds from reading the HEADERS to deciding on them
    due: float  # clock(): the response must have started by then (or the request body moved again)
    answered: bool = False  # response HEADERS sent downstream
    request: memoryview | None = None  # the part of a request chunk upstream's windows have not taken yet
    response: memoryview | None = None
    request_done: bool = False  # the request's end went upstream
    response_done: bool = False
    stalled_since: float | None = None  # clock(): response bytes waiting on a shut downstream window
    over: bool = False


# observe(direction, nbytes, held): a chunk moved; `held` is what this stream held with it
Observe = Callable[[str, int, int], None]


class Carrier:
    """One upstream connection as the splice sees it: the pairs whose upstream stream it carries,
    from one downstream connection (paired) or many (pooled)."""

    __slots__ = ("core", "pairs")

    def __init__(self, core: Core) -> None:
        self.core = core
        self.pairs: dict[int, Pair] = {}  # by upstream stream id

    def events(self, woken: set[int]) -> set[Splice]:
        """After the upstream core took bytes: `woken` as `Core.receive_data` returned it.
        Returns the splices whose downstream connection has something to send now."""
        pairs = self.pairs
        touched: set[Splice] = set()
        if 0 in woken:  # a connection window or the settings changed: every stream may move
            for pair in list(pairs.values()):
                touched.add(pair.splice)
                pair.splice._service(pair)
            return touched
        for sid in woken:
            if (woke := pairs.get(sid)) is not None:
                touched.add(woke.splice)
                woke.splice._service(woke)
        return touched

    def close(self) -> set[Splice]:
        """The upstream connection is gone: the downstream stream of every pair it carried is
        reset, and no other. Returns the splices touched."""
        touched: set[Splice] = set()
        for pair in list(self.pairs.values()):
            touched.add(pair.splice)
            pair.splice.down.reset(pair.down.id, CANCEL)
            pair.splice._finish(pair)
        return touched


class Splice:
    """The streams of one downstream connection, each paired with a stream on a carrier: its own
    one (paired) or the one `open` is given (pooled)."""

    def __init__(
        self,
        down: Core,
        up: Core | None = None,
        *,
        stamp: Callable[[Pair, Headers], Headers],
        observe: Observe | None = None,
        on_done: Callable[[Pair], None] | None = None,
        on_stall: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        response_timeout: float = 30.0,
        slow_read: float | None = None,
        room: Callable[[], int] | None = None,
        flush: Callable[[], None] | None = None,
    ) -> None:
        self.down = down
        self.flush = flush  # the driver's: write what the downstream core queued (pooled carriers call it)
        self.carrier = Carrier(up) if up is not None else None  # paired: this connection's own upstream
        self.stamp, self.observe, self.on_done, self.on_stall = stamp, observe, on_done, on_stall
        self.clock = clock
        self.response_timeout = response_timeout
        self.slow_read = slow_read  # None: the downstream peer is trusted to read (no bound)
        # room(): how many more response bytes the downstream connection may queue for its socket;
        # what does not fit stays in the upstream core, unacked, until `drained` (None: no bound)
        self.room = room
        self.roomless: set[Pair] = set()
        self.by_down: dict[int, Pair] = {}
        self.unanswered: deque[Pair] = deque()  # requests whole, in the order of their `due` (one timeout for all)
        self.uploading: set[Pair] = set()  # requests whose body is still coming: `due` moves with it
        self.stalls: set[Pair] = set()

    # -- requests in -------------------------------------------------------------------------

    def open(self, st: StreamState, headers: Headers, read_at: float, carrier: Carrier | None = None) -> Pair | None:
        """Forward a request's HEADERS (and whatever of its body is here) upstream, on `carrier`
        (pooled) or this connection's own. `read_at`: time.perf_counter() when this hop began on
        the request (its own time runs from there). None when that upstream cannot take another
        stream now (the caller refuses it)."""
        carrier = carrier or self.carrier
        assert carrier is not None, "a pooled splice is told its carrier"
        up = carrier.core
        if up.closed or not up.can_open_stream():
            return None
        end = st.body_ends_here
        ust = up.send_request(headers, end)
        now = time.perf_counter()
        pair = Pair(
            self,
            carrier,
            st,
            ust,
            opened=now,
            own=now - read_at,
            queue=read_at - (st.received_at or read_at),
            due=self.clock() + self.response_timeout,
            request_done=end,
        )
        self.by_down[st.id] = pair
        carrier.pairs[ust.id] = pair
        if end:
            self._await_response(pair)
        else:
            self.uploading.add(pair)
            self._service(pair)
        return pair

    def _await_response(self, pair: Pair) -> None:
        """The request went upstream whole: its response timeout starts now."""
        self.uploading.discard(pair)
        pair.due = self.clock() + self.response_timeout
        q = self.unanswered
        if len(q) > 4 * len(self.by_down) + 64:  # answered pairs behind a slow one: drop them, keep the order
            self.unanswered = q = deque(p for p in q if not (p.answered or p.over))
        q.append(pair)

    # -- what either reader received -------------------------------------------------------

    def down_events(self, woken: set[int]) -> None:
        """After the downstream core took bytes: `woken` as `Core.receive_data` returned it."""
        pairs = self.by_down
        if 0 in woken:  # a connection window or the settings changed: every stream may move
            for pair in list(pairs.values()):
                self._service(pair)
            return
        for sid in woken:
            if (woke := pairs.get(sid)) is not None:
                self._service(woke)

    def up_events(self, woken: set[int]) -> None:
        """Paired: after this connection's own upstream core took bytes."""
        assert self.carrier is not None
        self.carrier.events(woken)

    def _service(self, pair: Pair) -> None:
        down, up = pair.down, pair.up
        ucore = pair.carrier.core
        try:
            if down.reset_code is not None:  # the peer cancelled: so does the next hop
                ucore.reset(up.id, CANCEL)
            elif up.reset_code is not None:  # the next hop cancelled or died: tell the peer
                self.down.reset(down.id, CANCEL)
            else:
                if not pair.request_done:
                    pair.request, pair.request_done, moved = self._move(
                        self.down, down, ucore, up.id, pair.request, "request"
                    )
                    if pair.request_done:
                        self._await_response(pair)
                    elif moved:
                        pair.due = self.clock() + self.response_timeout
                if not pair.response_done:
                    self._respond(pair)
                if not (pair.request_done and pair.response_done):
                    return
        except GONE:
            ucore.reset(up.id, CANCEL)
            self.down.reset(down.id, CANCEL)
        self._finish(pair)

    def _respond(self, pair: Pair) -> None:
        ust = pair.up
        if not pair.answered:
            if ust.headers is None:
                return
            pair.answered = True
            end = ust.body_ends_here
            self.down.send_headers(pair.down.id, self.stamp(pair, ust.headers), end)
            if end:
                pair.response_done = True
                return
        budget = None if self.room is None else self.room()
        pair.response, pair.response_done, moved = self._move(
            pair.carrier.core, ust, self.down, pair.down.id, pair.response, "response", budget
        )
        if pair.response is not None and budget is not None and budget - moved <= 0:
            self.roomless.add(pair)  # our own queue is full, not the peer's window: `drained` goes on
            return
        if pair.response is None:
            if pair.stalled_since is not None:
                pair.stalled_since = None
                self.stalls.discard(pair)
        elif self.slow_read is not None and (moved or pair.stalled_since is None):
            pair.stalled_since = self.clock()  # the window is shut from now on
            if pair not in self.stalls:
                self.stalls.add(pair)
                if self.on_stall is not None:
                    self.on_stall()

    def _move(
        self,
        src: Core,
        sst: StreamState,
        dst: Core,
        did: int,
        pending: memoryview | None,
        direction: str,
        budget: int | None = None,
    ) -> tuple[memoryview | None, bool, int]:
        """Move what `sst` holds to stream `did` of `dst`, as far as dst's windows (and `budget`
        bytes) allow, acking each byte to its sender once dst took it. Returns what is left of a
        chunk, whether the end (or the trailers) went too, and how many bytes moved."""
        moved = 0
        while True:
            if pending is None:
                chunk = src.take_chunk(sst)
                if chunk is None:
                    break
                if not chunk:
                    continue
                if self.observe is not None:
                    self.observe(direction, len(chunk), len(chunk) + sst.buffered)
                pending = memoryview(chunk)
            last = sst.body_ends_here
            part = pending if budget is None or budget - moved >= len(pending) else pending[: max(0, budget - moved)]
            if not part:
                return pending, False, moved
            n = dst.send_data(did, part, end_stream=last and len(part) == len(pending))
            if n:
                src.ack(sst.id, n)
                moved += n
            if n < len(pending):
                return pending[n:], False, moved
            pending = None
            if last:
                return None, True, moved
        if sst.ended:  # the body is all across: trailers, or an empty end
            dst.end_stream(did, sst.trailers)
            return None, True, moved
        return None, False, moved

    def drained(self) -> None:
        """The downstream socket took a write: the responses that waited for room go on."""
        if not self.roomless:
            return
        waiting, self.roomless = self.roomless, set()
        for pair in waiting:
            if not pair.over:
                self._service(pair)

    def _finish(self, pair: Pair) -> None:
        if pair.over:
            return
        self._leave(pair)
        self.down.forget(pair.down.id)
        pair.carrier.core.forget(pair.up.id)

    def _leave(self, pair: Pair) -> None:
        """The pair leaves the splice. A chunk it held half-sent was taken from its sender's
        buffer and never acked: ack the rest now, or every reset racing a chunk would shrink that
        connection's window for good (about 230 cancelled downloads stalled a kiosk's connection)."""
        pair.over = True
        self.by_down.pop(pair.down.id, None)
        pair.carrier.pairs.pop(pair.up.id, None)
        self.stalls.discard(pair)
        self.roomless.discard(pair)
        self.uploading.discard(pair)
        if pair.request is not None:
            self.down.ack(pair.down.id, len(pair.request))
            pair.request = None
        if pair.response is not None:
            pair.carrier.core.ack(pair.up.id, len(pair.response))
            pair.response = None
        if self.on_done is not None:
            self.on_done(pair)

    # -- time --------------------------------------------------------------------------------

    def next_deadline(self) -> float:
        """The clock() at which `overdue` or `stalled` next has something to say."""
        q = self.unanswered
        while q and (q[0].answered or q[0].over):
            q.popleft()
        due = q[0].due if q else math.inf
        if self.uploading:
            due = min(due, min(p.due for p in self.uploading))
        if self.stalls and self.slow_read is not None:
            stalled = min(p.stalled_since or 0.0 for p in self.stalls)  # a stalled pair has its time
            due = min(due, stalled + self.slow_read)
        return due

    def overdue(self, now: float) -> list[StreamState]:
        """Requests with no answer by their `due`: each is reset upstream and leaves the splice;
        its downstream stream is handed back for the caller to refuse (504)."""
        late: list[StreamState] = []
        q = self.unanswered
        while q and (q[0].answered or q[0].over or q[0].due <= now):
            pair = q.popleft()
            if pair.answered or pair.over:
                continue
            self._cut(pair, late)
        for pair in [p for p in self.uploading if p.due <= now or p.answered]:
            if pair.answered:  # the next hop answered before the body ended: the response moves it on
                self.uploading.discard(pair)
            else:
                self._cut(pair, late)
        return late

    def _cut(self, pair: Pair, late: list[StreamState]) -> None:
        self._leave(pair)
        pair.carrier.core.reset(pair.up.id, CANCEL)
        pair.carrier.core.forget(pair.up.id)
        late.append(pair.down)

    def stalled(self, now: float) -> bool:
        """A downstream peer has kept its window shut on a waiting response for `slow_read`."""
        if self.slow_read is None:
            return False
        return any(p.stalled_since is not None and now - p.stalled_since >= self.slow_read for p in self.stalls)

    def close(self) -> None:
        """The downstream connection (or, paired, its upstream) is gone: every request of this
        connection still crossing is reset on both sides; other connections' pairs on a shared
        carrier are not touched."""
        for pair in list(self.by_down.values()):
            pair.carrier.core.reset(pair.up.id, CANCEL)
            self.down.reset(pair.down.id, CANCEL)
            self._finish(pair)
