"""A relay's pooled upstream connections: which one takes the next request, when another is
dialled, when one is closed (Envoy's HTTP/2 connection pool, HAProxy's `http-reuse`). Four rules:
1. a request goes to the oldest connection with room (fewer than `streams` streams, and fewer
   than its peer's max_concurrent_streams), so that surplus connections fall idle and close;
   with `spread` (the "balance" policy), to the next connection with room in turn instead;
2. once no connection has room, another is dialled at once (ahead of the next request), up to
   `connections` per next hop; while none has room, requests wait in `parked` for it;
3. a connection that carried nothing for `idle_timeout` seconds is closed;
4. a connection that dies leaves the pool with exactly its own streams (`Carrier.close`); the
   next request finds room elsewhere or dials a replacement (rule 2).

Sans-IO: the relay dials, runs and closes the connections and tells the pool what happened
(`dialled`, `lost`); the pool keeps the book and says what to do.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from gateway.protocol.splice import Carrier
from gateway.transport.keepalive import Keepalive


@dataclass(eq=False)
class Member:
    """One pooled connection: the next hop it goes to, its streams (`carrier`), and the driver's
    connection object (`conn`, opaque here)."""

    hop: str
    carrier: Carrier
    conn: Any = None
    scope: Any = None  # the driver's cancel scope around the connection's run
    idle_since: float | None = None  # when it last carried a stream (the pool's clock); None: busy
    keepalive: Keepalive | None = None

    @property
    def streams(self) -> int:
        return len(self.carrier.pairs)


@dataclass
class UpstreamPool:
    streams: int = 100  # per connection, at most (the peer's max_concurrent_streams may say fewer)
    connections: int = 8  # per next hop, at most
    idle_timeout: float = 60.0
    spread: bool = False  # rule 1's "balance" variant
    members: list[Member] = field(default_factory=list)
    dialling: bool = False  # one connection is dialled at a time (rule 2)
    parked: deque[Any] = field(default_factory=deque)  # requests waiting for room, oldest first (rule 2)
    _turn: int = 0

    def has_room(self, m: Member) -> bool:
        core = m.carrier.core
        return not core.closed and len(core.streams) < self.streams and core.can_open_stream()

    def pick(self) -> Member | None:
        """The connection to carry the next request (rule 1); None: none has room."""
        if not self.spread:
            for m in self.members:
                if self.has_room(m):
                    m.idle_since = None
                    return m
            return None
        n = len(self.members)
        for k in range(n):
            m = self.members[(self._turn + k) % n]
            if self.has_room(m):
                self._turn = (self._turn + k + 1) % n
                m.idle_since = None
                return m
        return None

    def wants_dial(self) -> bool:
        """Rule 2: no connection has room and none is being dialled. The caller dials a next hop
        `may_dial` allows (setting `dialling` until `dialled`), or turns the parked requests away."""
        return not self.dialling and not any(self.has_room(m) for m in self.members)

    def may_dial(self, hop: str) -> bool:
        """`hop` has fewer than `connections` connections."""
        return sum(1 for m in self.members if m.hop == hop) < self.connections

    def dialled(self, member: Member | None, now: float) -> None:
        """The dial ended: `member` is up and takes requests from now on (None: every hop failed)."""
        self.dialling = False
        if member is not None:
            member.idle_since = now
            self.members.append(member)

    def lost(self, member: Member) -> None:
        """The connection ended (closed by either side, or hung): it leaves the pool (rule 4). Its
        streams are the caller's to reset (`Carrier.close`)."""
        if member in self.members:
            self.members.remove(member)

    def expired(self, now: float) -> list[Member]:
        """Rule 3: the connections idle for `idle_timeout`, taken out of the pool for the caller to close."""
        out = []
        for m in self.members:
            if m.carrier.pairs or m.carrier.core.streams:
                m.idle_since = None
            elif m.idle_since is None:
                m.idle_since = now
            elif now - m.idle_since >= self.idle_timeout:
                out.append(m)
        for m in out:
            self.members.remove(m)
        return out

    def next_expiry(self) -> float:
        """When `expired` may next have one to close (inf: none is idle now)."""
        return min(
            (m.idle_since + self.idle_timeout for m in self.members if m.idle_since is not None), default=float("inf")
        )
