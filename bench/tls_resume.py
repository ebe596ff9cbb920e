"""CPU of a resumed TLS 1.3 handshake against a full one, on both ends, with konbini's contexts.

    python -m bench.tls_resume [--handshakes N] [--rounds K] [--out FILE]

A server process (store-router-a1's server context) and this process as the client (kiosk-a1-1's
client context) make `rounds` alternating blocks of `handshakes` connections over loopback: full
handshakes (no session offered) and resumed ones (the newest ticket offered, as connect_h2 does),
and plain TCP connections for the floor. Each connection is a handshake and one record from the
server, which brings the ticket. Prints
process CPU per handshake on each end (the lowest block of each kind, and the mean), and with
--out writes the figures as JSON. A throwaway PKI is made in a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import select
import socket
import ssl
import tempfile
import time
from pathlib import Path

from gateway.transport.resumption import SessionCache
from gateway.transport.tls import client_context, server_context
from topology.pki import PKI
from topology.spec.load import DEFAULT_TOPOLOGY, load_topology

SERVER, CLIENT = "store-router-a1", "kiosk-a1-1"


def _serve(tls_listener: socket.socket, tcp_listener: socket.socket, paths: tuple[str, str, str], control) -> None:
    """Handshake each connection, send one record, wait for the client's close; the same without
    TLS on `tcp_listener` (the floor: what a connection costs Python and the kernel). Answers
    `control` with our CPU seconds and how many sessions we resumed."""
    ctx = server_context(*(Path(p) for p in paths))
    while True:
        if control.poll():
            if control.recv() == "stop":
                return
            control.send((time.process_time(), ctx.session_stats()["hits"]))
        for listener in select.select([tls_listener, tcp_listener], [], [], 0.05)[0]:
            conn, _ = listener.accept()
            conn.setsockopt(
                socket.IPPROTO_TCP, socket.TCP_NODELAY, 1
            )  # as konbini's nodes: no Nagle wait on the ticket
            with ctx.wrap_socket(conn, server_side=True) if listener is tls_listener else conn as stream:
                stream.sendall(b"\0")
                stream.recv(1)


def _block(ctx: ssl.SSLContext | None, address, cache: SessionCache | None, handshakes: int) -> int:
    """`handshakes` connections (plain TCP if `ctx` is None); returns how many resumed."""
    resumed = 0
    for _ in range(handshakes):
        if ctx is None:
            with socket.create_connection(address) as tcp:
                tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                tcp.recv(1)
            continue
        session = cache.offer(SERVER) if cache else None
        with socket.create_connection(address) as tcp:
            tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with ctx.wrap_socket(tcp, server_hostname=SERVER, session=session) as tls:
                tls.recv(1)  # the server's record, and before it the ticket
                resumed += tls.session_reused
                if cache:
                    cache.remember(SERVER, tls)
                    cache.offer(SERVER)  # read it now: a closed SSLSocket, unlike trio's stream, forgets its session
    return resumed


def measure(state: Path, handshakes: int, rounds: int) -> dict:
    pki = PKI.ensure(state, load_topology(DEFAULT_TOPOLOGY))
    listener, tcp_listener = socket.create_server(("127.0.0.1", 0)), socket.create_server(("127.0.0.1", 0))
    ours, theirs = mp.Pipe()
    server_paths = (*pki.node_paths(SERVER), pki.network_ca_path)
    server = mp.get_context("fork").Process(
        target=_serve, args=(listener, tcp_listener, server_paths, theirs), daemon=True
    )
    server.start()
    ctx = client_context(*(Path(p) for p in pki.node_paths(CLIENT)), Path(pki.network_ca_path))
    cache = SessionCache()
    _block(ctx, listener.getsockname(), cache, 20)  # warm both ends; the cache has a ticket

    def server_side() -> tuple[float, int]:
        """The server's CPU seconds, and how many sessions it has resumed (its own count)."""
        ours.send("cpu")
        return ours.recv()

    blocks: dict[str, list[tuple[float, float, int, int]]] = {"full": [], "resumed": [], "tcp only": []}
    kinds = (("full", ctx, listener, None), ("resumed", ctx, listener, cache), ("tcp only", None, tcp_listener, None))
    for _ in range(rounds):
        for kind, tls, door, offer in kinds:
            (s0, hits0), c0 = server_side(), time.process_time()
            resumed = _block(tls, door.getsockname(), offer, handshakes)
            c1, (s1, hits1) = time.process_time(), server_side()
            blocks[kind].append(((c1 - c0) / handshakes, (s1 - s0) / handshakes, resumed, hits1 - hits0))
    ours.send("stop")
    server.join(5)
    result = {"handshakes_per_block": handshakes, "rounds": rounds, "openssl": ssl.OPENSSL_VERSION}
    for kind, rows in blocks.items():
        result[kind] = {
            "client_us_min": min(r[0] for r in rows) * 1e6,
            "client_us_mean": sum(r[0] for r in rows) / len(rows) * 1e6,
            "server_us_min": min(r[1] for r in rows) * 1e6,
            "server_us_mean": sum(r[1] for r in rows) / len(rows) * 1e6,
            "resumed": sum(r[2] for r in rows),
            "server_resumed": sum(r[3] for r in rows),
            "handshakes": handshakes * len(rows),
        }
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.tls_resume", description=__doc__.split("\n\n")[0])
    ap.add_argument("--handshakes", type=int, default=200, help="connections per block")
    ap.add_argument("--rounds", type=int, default=5, help="blocks of each kind, alternating")
    ap.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="konbini-tls-resume-") as state:
        result = measure(Path(state), args.handshakes, args.rounds)
    print(f"{result['openssl']}; {args.rounds} blocks of {args.handshakes} handshakes each kind, CPU µs per handshake")
    print(f"{'':9} {'client min':>10} {'mean':>8} {'server min':>10} {'mean':>8} {'resumed':>9}")
    for kind in ("full", "resumed", "tcp only"):
        r = result[kind]
        print(
            f"{kind:9} {r['client_us_min']:10.0f} {r['client_us_mean']:8.0f} {r['server_us_min']:10.0f} "
            f"{r['server_us_mean']:8.0f} {r['resumed']:>4}/{r['handshakes']}"
        )
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
