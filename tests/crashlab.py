"""Crash lab: the default topology split over processes that a test can SIGKILL (tests/test_crash.py).

    python -m tests.crashlab kiosks --topology F --state DIR --kiosks a,b --seed S [--cards N] [--flush-only]

The server nodes run under `python -m topology.launch.nodehost` (it prints "ready", stops at stdin EOF).
This module is the kiosk side: every kiosk keeps one connection to its store router (reopened
whenever it dies), issues seeded requests one after another with its durable outbox running, and
prints one line per attempt. It prints "ready" once every kiosk is connected. At stdin EOF it
stops starting issuances, lets the ones in flight finish, and exits. With --flush-only it issues
nothing: it sends every notice waiting in the outboxes, then prints "flushed <pending>" and exits.

The helpers below (addresses off the default plan, reading results back) are shared with the test.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import ssl
import sys
import time
from pathlib import Path

import trio

from gateway.business.clock import Clock
from gateway.node.server import NodeContext
from gateway.protocol.errors import ConnectionClosed
from gateway.protocol.messages import IssueRequest
from kiosk_emu.card import CardStore
from kiosk_emu.device.printer import Printer
from kiosk_emu.kiosk import Kiosk
from topology.pki import PKI
from topology.spec.load import DEFAULT_TOPOLOGY, load_topology

TEST_TIME = "2026-11-24T10:00:00+09:00"  # inside every service window of the default topology (= conftest)
MUNIS = ("131016", "141003")  # muni-a, muni-b (no family-register: refused there)
CERT_TYPES = ("residence-record", "seal-registration", "tax-certificate", "family-register", "vaccination")
MISPRINT_RATE = 0.04
UNAVAILABLE = (
    "upstream-unavailable",
    "upstream-timeout",
    "ocsp-unavailable",
    "municipality-unavailable",
    "ledger-unavailable",
)
CONNECT_ERRORS = (
    OSError,
    ssl.SSLError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    trio.TooSlowError,
    ConnectionClosed,
    ConnectionError,
)


# -- shared with the test ---------------------------------------------------------------------


def _free(addresses: list[str], port: int = 8443) -> bool:
    for a in addresses:
        s = socket.socket()
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((a, port))
        except OSError:
            return False
        finally:
            s.close()
    return True


# The relays as the crash tests were written for: each kiosk connection with its own chain, so a
# kiosk whose chain broke reconnects before its next attempt. Pooled relays keep the kiosk's
# connection and answer at once while a killed hop restarts, so the kiosks' attempts run out
# before the seeded kill points; tests/test_int1_kill.py kills pooled relays and the center.
PAIRED = "upstream_connections:\n  ec-router: {mode: paired}\n  dmz-relay: {mode: paired}\n"


def write_shifted_topology(path: Path, *, paired: bool = False) -> int:
    """The default topology on 127.<octet>.x.x (an octet no other run uses now), its relays
    `paired` if asked; returns the octet."""
    text = DEFAULT_TOPOLOGY.read_text(encoding="utf-8") + (PAIRED if paired else "")
    base = load_topology(DEFAULT_TOPOLOGY)
    start = 100 + os.getpid() % 100
    for i in range(100):
        octet = 100 + (start - 100 + 2 * i) % 100  # 100..199; 127.18 is the default plan, 127.38 the bench
        addrs = [n.address.replace("127.18.", f"127.{octet}.", 1) for n in base.nodes.values() if n.is_server]
        if _free(addrs):
            path.write_text(text.replace("127.18.", f"127.{octet}."), encoding="utf-8")
            return octet
    raise RuntimeError("no free 127.x.0.0/16 block for the crash topology")


def read_jsonl(path: Path) -> list[dict]:
    """A kiosk log; a last line cut short by SIGKILL is skipped (it was never a complete fact)."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


# -- the kiosk process ------------------------------------------------------------------------


def _say(*parts) -> None:
    """One write per line: under PYTHONUNBUFFERED, print() writes each part separately, and a kill
    between them leaves the parent half a line."""
    sys.stdout.write(" ".join(map(str, parts)) + "\n")
    sys.stdout.flush()


class KioskProc:
    def __init__(self, args) -> None:
        self.state = Path(args.state)
        self.topo = load_topology(args.topology)
        self.clock = Clock.parse(TEST_TIME)
        self.pki = PKI.ensure(self.state, self.topo)
        store = CardStore(self.state, self.pki, self.clock.now)
        self.cards = [store.load(f"pool-{i:04d}") for i in range(args.cards)]
        self.kiosk_ids = [k for k in args.kiosks.split(",") if k]
        self.seed = args.seed
        self.flush_only = args.flush_only
        self.stopping = False
        self.connected: set[str] = set()
        self.all_connected = trio.Event()
        # this life's choices: seeded, and different for each restart of the process
        self.life = args.life
        self.pending_left: dict[str, int] = {}

    def _kiosk(self, kid: str, rng: random.Random) -> Kiosk:
        ctx = NodeContext(self.topo, self.topo.node(kid), self.pki, "loopback", self.clock)
        printer = Printer(lambda iid, no: rng.random() < MISPRINT_RATE)
        return Kiosk(ctx, self.state, printer)

    def _request(self, rng: random.Random) -> IssueRequest:
        return IssueRequest(rng.choice(MUNIS), rng.choice(CERT_TYPES), rng.randint(1, 3))

    async def _connect(self, kiosk: Kiosk):
        while True:  # the store router may be restarting: poll until it answers (bounded by the test)
            try:
                with trio.fail_after(3):
                    return await kiosk.connect()
            except CONNECT_ERRORS:
                await trio.sleep(0.02)

    async def run_kiosk(self, kid: str) -> None:
        rng = random.Random(f"{self.seed}/{self.life}/{kid}")
        kiosk = self._kiosk(kid, random.Random(f"{self.seed}/{self.life}/{kid}/printer"))
        kiosk.recover()  # a killed predecessor's unconfirmed prints and half-received or printed documents
        while not self.stopping:
            conn = await self._connect(kiosk)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(conn.run)
                self.connected.add(kid)
                if len(self.connected) == len(self.kiosk_ids):
                    self.all_connected.set()
                if self.flush_only:
                    await self._flush(kiosk, conn)
                    conn.close()
                    return
                nursery.start_soon(kiosk.run_outbox, conn)
                while not self.stopping and not conn.core.closed:
                    card = rng.choice(self.cards)
                    req = self._request(rng)
                    try:
                        r = await kiosk.issue(conn, card, "1234", req, timeout=5)
                        line = {
                            "kiosk": kid,
                            "status": r.status,
                            "reason": r.reason,
                            "issuance": r.issuance_id,
                            "fee": r.fee,
                            "copies": req.copies,
                            "refunded": r.refunded,
                        }
                    except CONNECT_ERRORS as exc:  # the connection died under the request
                        line = {"kiosk": kid, "status": "error", "reason": type(exc).__name__}
                    _say("R", json.dumps(line))
                    if line["status"] in ("cancelled", "error") or line["reason"] in UNAVAILABLE:
                        await trio.sleep(0.05)  # the next resident comes a little later, not in a tight loop
                conn.close()
                nursery.cancel_scope.cancel()

    async def _flush(self, kiosk: Kiosk, conn) -> None:
        """Send every waiting notice, waiting out each one's backoff (bounded by the test's timeout)."""
        while True:
            left = await kiosk.flush_outbox(conn)
            self.pending_left[kiosk.node.id] = left
            if left == 0 or conn.core.closed:
                return
            nxt = await kiosk._outbox(kiosk.outbox.next_due)
            await trio.sleep(min(max((nxt or 0) - time.time(), 0.02), 2.0))

    async def main(self) -> None:
        async with trio.open_nursery() as nursery:
            for kid in self.kiosk_ids:
                nursery.start_soon(self.run_kiosk, kid)
            await self.all_connected.wait()
            _say("ready")
            if self.flush_only:
                return
            stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
            while await stdin.receive_some(4096):
                pass
            self.stopping = True  # in-flight issuances finish; no new ones start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.crashlab")
    sub = p.add_subparsers(dest="cmd", required=True)
    k = sub.add_parser("kiosks")
    k.add_argument("--topology", required=True)
    k.add_argument("--state", required=True)
    k.add_argument("--kiosks", required=True)
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("--life", type=int, default=0, help="which life of the process (seeds its choices)")
    k.add_argument("--cards", type=int, default=16)
    k.add_argument("--flush-only", action="store_true")
    args = p.parse_args(argv)
    proc = KioskProc(args)
    trio.run(proc.main)
    if args.flush_only:
        _say("flushed", sum(proc.pending_left.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
