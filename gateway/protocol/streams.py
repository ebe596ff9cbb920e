"""A stream as those above the core see it: `StreamState`, the core's record of what arrived on
it, and the header-list helpers.

The core fills a `StreamState`; the splice and the drivers read it without a task. A task that
waits on a stream holds a `driver.Stream` over it; the core's own record of a stream's windows and
ends is private to the core (`h2lean._Flow`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Literal

Headers = list[tuple[bytes, bytes]]


def header(headers: Headers | None, name: bytes) -> bytes | None:
    """First value of a header (names are lowercase in HTTP/2)."""
    for k, v in headers or ():
        if k == name:
            return v
    return None


def header_list_size(headers: Headers) -> int:
    """A header list's size as SETTINGS_MAX_HEADER_LIST_SIZE counts it (RFC 9113 §6.5.2)."""
    return sum(len(name) + len(value) + 32 for name, value in headers)


class Pending(Enum):
    """`next_chunk`'s third answer: nothing yet, the driver waits for the stream to be woken."""

    PENDING = 0


PENDING = Pending.PENDING
Chunk = bytes | None | Literal[Pending.PENDING]


@dataclass(eq=False)
class StreamState:
    """Inbound side of one stream as the consumer sees it."""

    id: int
    headers: Headers | None = None
    trailers: Headers | None = None
    chunks: deque[tuple[bytes, int]] = field(default_factory=deque)  # (data, flow-controlled length)
    ended: bool = False  # remote sent END_STREAM
    reset_code: int | None = None  # remote (or we) reset the stream
    buffered: int = 0  # bytes received and not yet taken by the consumer
    received_at: float = 0.0  # time.perf_counter() when the driver read the request's HEADERS (server side)

    @property
    def finished(self) -> bool:
        return self.ended or self.reset_code is not None

    @property
    def body_ends_here(self) -> bool:
        """The remote ended the stream with its body, no trailers, and nothing is left to take:
        whoever passes the next piece on may set END_STREAM with it."""
        return self.ended and not self.chunks and self.trailers is None
