"""Small request/response helpers over `gateway.protocol.driver.Stream`: JSON bodies, refusals, timing."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TypeVar

import msgspec

from gateway.protocol.driver import Stream
from gateway.protocol.streams import Headers, header

JSON = b"application/json"
T = TypeVar("T")


def method_path(headers: Headers | None) -> tuple[str, str]:
    """(method, path without query) of a request."""
    method = (header(headers, b":method") or b"").decode("ascii", "replace")
    path = (header(headers, b":path") or b"").decode("ascii", "replace")
    return method, path.split("?", 1)[0]


def query(headers: Headers | None) -> dict[str, str]:
    path = (header(headers, b":path") or b"").decode("ascii", "replace")
    if "?" not in path:
        return {}
    out = {}
    for part in path.split("?", 1)[1].split("&"):
        k, _, v = part.partition("=")
        out[k] = v
    return out


def request_headers(method: str, path: str, authority: str, extra: Iterable[tuple[bytes, bytes]] = ()) -> Headers:
    return [
        (b":method", method.encode()),
        (b":scheme", b"https"),
        (b":authority", authority.encode()),
        (b":path", path.encode()),
        *extra,
    ]


def timing(
    node_id: str,
    started: float,
    stream: Stream | None = None,
    *,
    upstream: float | None = None,
    queue: float | None = None,
) -> tuple[bytes, bytes]:
    """A server-timing entry for this hop: `dur`, its own time since `started` (time.perf_counter());
    `queue`, the time from reading the request's HEADERS to the handler's start (event-loop
    backlog; from `stream` when `started` is the handler's start, else given); `up`, seconds spent waiting for the next hop's answer (relays). Together
    with the client's own clock these let the latency be split so that its parts add up."""
    entry = f"{node_id};dur={(time.perf_counter() - started) * 1000:.3f}"
    if queue is None and stream is not None and stream.st.received_at:
        queue = started - stream.st.received_at
    if queue is not None:
        entry += f";queue={max(0.0, queue) * 1000:.3f}"
    if upstream is not None:
        entry += f";up={upstream * 1000:.3f}"
    return (b"server-timing", entry.encode())


async def send_json(stream: Stream, status: int, body: object, extra: Iterable[tuple[bytes, bytes]] = ()) -> None:
    data = msgspec.json.encode(body)
    stream.send_headers(
        [
            (b":status", str(status).encode()),
            (b"content-type", JSON),
            (b"content-length", str(len(data)).encode()),
            *extra,
        ]
    )
    await stream.send_data(data, end_stream=True)


async def refuse(
    stream: Stream, status: int, reason: str, message: str, extra: Iterable[tuple[bytes, bytes]] = ()
) -> None:
    """A refusal every hop and the kiosk understand: reason code + the kiosk's screen message."""
    await send_json(
        stream,
        status,
        {"status": "refused", "reason": reason, "message": message},
        [(b"konbini-reason", reason.encode()), *extra],
    )


def decode(data: bytes, kind: type[T]) -> T:
    """A wire message, validated once on entry; BadRequest names what is wrong."""
    try:
        return msgspec.json.decode(data, type=kind)
    except msgspec.DecodeError as exc:
        raise BadRequest(f"bad {kind.__name__}: {exc}") from exc


class BadRequest(Exception):
    """A request a handler cannot act on; answered 400 with the message."""
