"""The relay benchmarks' origin: `/bench/*` on the issuance center's address, no card authentication.

It sits where the issuance center sits so a benchmark measures the whole relay chain and
nothing of the center's business; the center only routes `/bench/*` here. GET or POST with
`?size=N` answers N bytes (capped at MAX_SIZE); a POST body is read and its length reported
in the `bench-received` response header, so upload paths are measurable too.
"""

from __future__ import annotations

from gateway.protocol.driver import Stream
from gateway.protocol.http import BadRequest, query, timing

MAX_SIZE = 64 * 1024 * 1024  # the same cap as a document
BENCH_CHUNK = b"k" * (64 * 1024)


async def serve_bench(stream: Stream, method: str, node_id: str, t0: float) -> None:
    """Answer one benchmark request; BadRequest if `size` is not an integer."""
    received = len(await stream.read_body(MAX_SIZE)) if method == "POST" else 0
    try:
        size = min(max(int(query(stream.headers).get("size", "0") or 0), 0), MAX_SIZE)
    except ValueError:
        raise BadRequest("size must be an integer") from None
    stream.send_headers(
        [
            (b":status", b"200"),
            (b"content-length", str(size).encode()),
            (b"bench-received", str(received).encode()),
            timing(node_id, t0, stream),
        ],
        end_stream=size == 0,
    )
    while size > 0:
        n = min(size, len(BENCH_CHUNK))
        size -= n
        await stream.send_data(BENCH_CHUNK[:n] if n < len(BENCH_CHUNK) else BENCH_CHUNK, end_stream=size == 0)
