"""CPU per request of the HTTP/2 work alone, without sockets, TLS or a scheduler: how much of a
relay hop is h2 and the splice, measured the same way before and after a change.

    python -m bench.h2cost [--requests N] [--repeat K] [--size BYTES] [--out FILE]

`exchange`: one request and its response between a client core and a server core (both sides'
work). `relay hop`: the same request through a spliced relay hop (`gateway.protocol.splice`):
the relay's downstream server core, its upstream client core and the splice between them; only
the relay's calls are timed. Each runs on h2's cores (`H2Core`) and on the lean ones
(`gateway.protocol.h2lean`, what konbini runs), and the hop also with a lean upstream only. Each figure is the lowest of K runs of N requests (the least
disturbed by the rest of a shared machine), with the median beside it.
"""

from __future__ import annotations

import argparse
import builtins
import json
import logging
import statistics
import time
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path

import h2.connection
import hpack.hpack

from gateway.protocol.h2core import STREAM_WINDOW, H2Core, Headers
from gateway.protocol.h2lean import LeanClientCore, LeanServerCore
from gateway.protocol.http import request_headers
from gateway.protocol.splice import Pair, Splice
from topology.spec.model import Limits

REQUEST = request_headers("GET", "/bench/blob?size=0", "store-router-a1", [(b"user-agent", b"konbini-kiosk")])


def _response(size: int) -> Headers:
    return [(b":status", b"200"), (b"content-length", str(size).encode()), (b"server-timing", b"origin;dur=0.100")]


def _handshake(client: H2Core, server: H2Core) -> None:
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())


def _client(lean: bool):
    return LeanClientCore() if lean else H2Core(client_side=True)


def _server(lean: bool):
    return LeanServerCore(limits=Limits()) if lean else H2Core(client_side=False, limits=Limits())


def exchange(n: int, size: int, lean: bool = False) -> float:
    """Seconds of CPU for n request/response exchanges between two cores (`lean`: h2lean's)."""
    client, server = _client(lean), _server(lean)
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


def relay_hop(n: int, size: int, lean_up: bool = False, lean_down: bool = False) -> float:
    """Seconds of CPU the relay spends (its two cores and the splice) on n requests; `lean_up`,
    `lean_down`: that side's core is h2lean's instead of h2's. The kiosk and the origin are h2's."""
    kiosk, down = H2Core(client_side=True), _server(lean_down)
    up, origin = _client(lean_up), H2Core(client_side=False, limits=Limits())
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


@contextmanager
def stock_h2():
    """h2 and hpack as shipped: every received frame formatted, hpack's debug calls made
    (what `gateway.protocol.h2core` switches off), for a before/after in one run."""
    saved = h2.connection.repr, hpack.hpack.log
    h2.connection.repr, hpack.hpack.log = builtins.repr, logging.getLogger(hpack.hpack.__name__)
    try:
        yield
    finally:
        h2.connection.repr, hpack.hpack.log = saved


def measure(variants: dict[str, tuple], n: int, repeat: int, size: int) -> dict[str, dict]:
    """Each variant (name: (function, context manager factory)) run `repeat` times, the variants
    taking turns, so a machine that slows down for a while slows every variant alike."""
    runs: dict[str, list[float]] = {name: [] for name in variants}
    for fn, ctx in variants.values():
        with ctx():
            fn(max(100, n // 10), size)  # warm up caches and the HPACK tables
    for _ in range(repeat):
        for name, (fn, ctx) in variants.items():
            with ctx():
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
    ap.add_argument(
        "--stock-h2", action="store_true", help="also measure with h2 and hpack as shipped (before/after in one run)"
    )
    ap.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    args = ap.parse_args(argv)
    if not 0 <= args.size <= STREAM_WINDOW:
        ap.error(f"--size: 0 to {STREAM_WINDOW} bytes (one stream window: the origin sends the body in one pass)")
    variants = {
        "exchange": (exchange, nullcontext),
        "exchange_lean": (partial(exchange, lean=True), nullcontext),
        "relay_hop": (relay_hop, nullcontext),
        "relay_hop_lean_upstream": (partial(relay_hop, lean_up=True), nullcontext),
        "relay_hop_lean": (partial(relay_hop, lean_up=True, lean_down=True), nullcontext),
    }
    if args.stock_h2:
        variants |= {"exchange_stock_h2": (exchange, stock_h2), "relay_hop_stock_h2": (relay_hop, stock_h2)}
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
