"""The interfaces between konbini's HTTP/2 layers, as httpcore's `interfaces.py`: what a sans-IO
core offers its drivers (`Core`), what a driver offers a task's `Stream` (`Connection`), and the
one event primitive each runtime supplies (`OneShot`).

`h2lean.LeanClientCore` and `h2lean.LeanServerCore` are the cores; `h2trio.TrioH2` and
`kiosk_emu.load.h2asyncio.AsyncioH2` the drivers (over `driver.H2Driver`). Two rules hold for
every core: each call that changes state may produce output, so drivers flush after each call;
and a protocol error from the peer closes the whole connection (GOAWAY) and resets every stream
on it, so no request is ever left half-done (INT-1).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable
from typing import Protocol

from gateway.protocol.streams import Chunk, Headers, StreamState


class Core(Protocol):
    """A sans-IO HTTP/2 connection: bytes in (`receive_data`), bytes out (`data_to_send`), and
    the stream table the consumer reads (`streams`; a server's new requests in `new_requests`)."""

    streams: dict[int, StreamState]
    new_requests: deque[StreamState]
    closed: bool
    close_reason: str | None
    preface_received: bool  # server side: the client's preface and first SETTINGS came
    units_received: int  # frames and header blocks received whole (a timeout's progress)
    peer_max_header_list: int | None  # the peer's SETTINGS_MAX_HEADER_LIST_SIZE (None: no limit)

    @property
    def receiving_partial(self) -> bool:
        """A frame or a header block has begun arriving and is not complete yet."""
        ...

    @property
    def pending_output(self) -> int:
        """Bytes queued for the peer and not yet taken by `data_to_send`."""
        ...

    def receive_data(self, data: bytes) -> set[int]:
        """Feed bytes from the peer (b"": its EOF); the stream ids to wake (0: every stream may
        move). Raises ConnectionClosed when the peer ended the connection or broke the protocol."""
        ...

    def data_to_send(self, amount: int | None = None) -> bytes: ...

    def can_open_stream(self) -> bool: ...

    def send_request(self, headers: Headers, end_stream: bool) -> StreamState: ...

    def send_headers(self, stream_id: int, headers: Headers, end_stream: bool = False) -> None: ...

    def send_data(self, stream_id: int, data: bytes | memoryview, end_stream: bool = False) -> int:
        """As much of `data` as the windows allow; the count taken."""
        ...

    def end_stream(self, stream_id: int, trailers: Headers | None = None) -> None: ...

    def take_chunk(self, st: StreamState) -> bytes | None: ...

    def next_chunk(self, st: StreamState) -> Chunk: ...

    def ack(self, stream_id: int, nbytes: int) -> None:
        """The consumer dealt with `nbytes` of the stream: the peer may send them again."""
        ...

    def reset(self, stream_id: int, code: int = ...) -> None: ...

    def forget(self, stream_id: int) -> None: ...

    def ping(self, opaque: bytes = ...) -> None: ...

    def abort(self, reason: str, code: int = ...) -> None:
        """Close for what the peer did: GOAWAY with `code`, `reason` kept as `close_reason`."""
        ...

    def close(self, code: int = ...) -> None:
        """Close on our side: GOAWAY, every unfinished stream reset."""
        ...

    def lose(self, reason: str) -> None:
        """The transport under the connection is gone: closed without a GOAWAY (nobody would read
        it), every unfinished stream reset."""
        ...


class OneShot(Protocol):
    """The runtime's event primitive: set once, awaited by any number of tasks (trio.Event, asyncio.Event)."""

    def set(self) -> None: ...

    def is_set(self) -> bool: ...

    def wait(self) -> Awaitable[object]: ...


class Connection(Protocol):
    """What a `Stream` needs of its driver: the core, getting output onto the wire, and waiting."""

    @property
    def core(self) -> Core: ...

    def flush(self) -> None: ...

    def wake(self, stream_ids: set[int]) -> None: ...

    def now(self) -> float: ...

    async def wait(self, stream_id: int) -> None: ...

    async def wait_window(self, stream_id: int, stalled_since: float) -> None: ...
