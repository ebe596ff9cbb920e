"""Whether the next hop on a busy connection is still there: an HTTP/2 PING with a deadline
(gRPC keepalive, Envoy's connection keepalive `interval` and `timeout`).

A hung next hop (a process stopped, not dead) keeps its socket: the kernel takes our bytes and
nothing comes back, so the requests on it would wait for their response timeout. Sans-IO: the
caller says when it last received anything and whether requests are in flight; `check` says when
to send a PING and when the peer is hung. Two rules:
1. an idle connection is never pinged (nothing waits on it);
2. anything received after the PING (its ACK, or any other frame) shows the peer alive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum


class Verdict(Enum):
    PING = "ping"  # silent for `interval` with requests in flight: send a PING now
    HUNG = "hung"  # nothing received within `timeout` of the PING


@dataclass
class Keepalive:
    interval: float = 1.0  # silence on a busy connection before a PING goes out
    timeout: float = 2.0  # how long the PING may go unanswered
    pinged_at: float | None = None

    def check(self, now: float, last_received: float, busy: bool) -> Verdict | None:
        if not busy:  # rule 1
            self.pinged_at = None
            return None
        if self.pinged_at is not None:
            if last_received >= self.pinged_at:  # rule 2
                self.pinged_at = None
            elif now - self.pinged_at >= self.timeout:
                return Verdict.HUNG
            else:
                return None
        if now - last_received >= self.interval:
            self.pinged_at = now
            return Verdict.PING
        return None

    def next_check(self, last_received: float, busy: bool) -> float:
        """When `check` may next have something to say (for the caller's timer)."""
        if not busy:
            return math.inf
        if self.pinged_at is not None:
            return self.pinged_at + self.timeout
        return last_received + self.interval
