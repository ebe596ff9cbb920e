"""CPU per request of the HTTP/2 work alone, without sockets, TLS or a scheduler: how much of a
relay hop is h2 and the splice, measured the same way before and after a change.

    python -m bench.h2cost [--requests N] [--repeat K] [--size BYTES] [--out FILE]

`exchange`: one request and its response between a client core and a server core (both sides'
work). `relay hop`: the same request through a spliced relay hop (`gateway.protocol.splice`):
the relay's downstream server core, its upstream client core and the splice between them; only
the relay's calls are timed. Every core is konbini's (`gateway.protocol.h2lean`). Each figure is
the lowest of K runs of N requests (the least disturbed by the rest of a shared machine), with the
median beside it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from gateway.protocol.frames import STREAM_WINDOW
from gateway.protocol.h2lean import LeanClientCore, LeanServerCore
from gateway.protocol.http import request_headers
from gateway.protocol.splice import Pair, Splice
from gateway.protocol.streams import Headers
from topology.spec.model import Limits

REQUEST = request_headers("GET", "/bench/blob?size=0", "store-router-a1", [(b"user-agent", b"konbini-kiosk")])


def _response(size: int) -> Headers:
    return [(b":status", b"200"), (b"content-length", str(size).encode()), (b"server-timing", b"origin;dur=0.100")]


def _handshake(client: LeanClientCore, server: LeanServerCore) -> None:
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())


def exchange(n: int, size: int) -> float:
    """Seconds of CPU for n request/response exchanges between two cores."""
    client, server = LeanClientCore(), LeanServerCore(limits=Limits())
    _handshake(client, server)
    body = b"k" * size
    t = time.process_time()
    for _ in range(n):
        st = client.send_request(REQUEST, True)
        server.receive_data(client.data_to_send())
        req = server.new_requests.popleft()
        server.send_headers(req.id, _response(size), not body)
        if body:
            server.send_data(req.id, body, end_stream=True)
        server.forget(req.id)
        client.receive_data(server.data_to_send())
        client.ack(st.id, sum(flow for _, flow in st.chunks))
        client.forget(st.id)
    return time.process_time() - t


def relay_hop(n: int, size: int) -> float:
    """Seconds of CPU the relay spends (its two cores and the splice) on n requests."""
    kiosk, down = LeanClientCore(), LeanServerCore(limits=Limits())
    up, origin = LeanClientCore(), LeanServerCore(limits=Limits())
    _handshake(kiosk, down)
    _handshake(up, origin)

    def stamp(pair: Pair, headers: Headers) -> Headers:
        return [*headers, (b"server-timing", b"relay;dur=0.010;up=0.100")]

    splice = Splice(down, up, stamp=stamp)
    body = b"k" * size
    spent = 0.0
    for _ in range(n):
        ks = kiosk.send_request(REQUEST, True)
        wire = kiosk.data_to_send()
        t = time.process_time()
        down.receive_data(wire)
        st = down.new_requests.popleft()
        splice.open(st, st.headers or [], time.perf_counter())
        wire = up.data_to_send()
        spent += time.process_time() - t
        origin.receive_data(wire)
        req = origin.new_requests.popleft()
        origin.send_headers(req.id, _response(size), not body)
        if body:
            origin.send_data(req.id, body, end_stream=True)
        origin.forget(req.id)
        wire = origin.data_to_send()
        t = time.process_time()
        splice.up_events(up.receive_data(wire))
        wire, back = down.data_to_send(), up.data_to_send()
        spent += time.process_time() - t
        if back:  # WINDOW_UPDATEs for the body, once it was passed on
            origin.receive_data(back)
        kiosk.receive_data(wire)
        kiosk.ack(ks.id, sum(flow for _, flow in ks.chunks))
        kiosk.forget(ks.id)
        if wire := kiosk.data_to_send():  # the kiosk's WINDOW_UPDATEs
            t = time.process_time()
            down.receive_data(wire)
            spent += time.process_time() - t
    if splice.by_down:
        raise RuntimeError(f"{len(splice.by_down)} requests still crossing the hop: the bench is wrong")
    return spent


def measure(variants: dict[str, Callable[[int, int], float]], n: int, repeat: int, size: int) -> dict[str, dict]:
    """Each variant (name: function) run `repeat` times, the variants taking turns, so a machine
    that slows down for a while slows every variant alike."""
    runs: dict[str, list[float]] = {name: [] for name in variants}
    for fn in variants.values():
        fn(max(100, n // 10), size)  # warm up caches and the HPACK tables
    for _ in range(repeat):
        for name, fn in variants.items():
            runs[name].append(fn(n, size) / n * 1e6)
    return {
        name: {
            "us_per_request_min": round(min(r), 1),
            "us_per_request_median": round(statistics.median(r), 1),
            "runs": len(r),
        }
        for name, r in runs.items()
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.h2cost", description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=3000, help="requests per run (default 3000)")
    ap.add_argument("--repeat", type=int, default=7, help="runs; the lowest is reported (default 7)")
    ap.add_argument("--size", type=int, default=0, help="response body bytes (default 0)")
    ap.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    args = ap.parse_args(argv)
    if not 0 <= args.size <= STREAM_WINDOW:
        ap.error(f"--size: 0 to {STREAM_WINDOW} bytes (one stream window: the origin sends the body in one pass)")
    variants: dict[str, Callable[[int, int], float]] = {"exchange": exchange, "relay_hop": relay_hop}
    result: dict = {"size": args.size, **measure(variants, args.requests, args.repeat, args.size)}
    for name in variants:
        r = result[name]
        print(
            f"{name:24} {r['us_per_request_min']:8.1f} µs per request (median {r['us_per_request_median']}, {r['runs']} runs)"
        )
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
