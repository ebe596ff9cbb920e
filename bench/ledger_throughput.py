"""Issuance throughput with the durable ledger (WAL, synchronous=FULL) against ":memory:".

    .venv/bin/python -m bench.ledger_throughput [--n 200] [--concurrency 1,12] [--json out.json]

Runs the default topology on its own loopback addresses (127.38.x.x, so it can run beside
another topology), once per ledger mode, and issues N residence records through every hop
(card auth, OCSP, municipality, notice) on one persistent connection per kiosk. Prints issuances
per second per mode and concurrency, and writes the same as JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import msgspec
import trio

from gateway.business.clock import Clock
from gateway.protocol.messages import IssueRequest
from kiosk_emu.card import DEFAULT_PIN, CardStore
from kiosk_emu.kiosk import Kiosk
from tests.conftest import TEST_TIME
from topology.launch.loopback import run_topology
from topology.pki import PKI
from topology.spec.load import DEFAULT_TOPOLOGY, load_topology
from topology.spec.model import Topology


def shifted(topo: Topology, ledger: str | None) -> Topology:
    """The same topology on 127.38.x.x addresses with the given ledger setting."""
    nodes = {
        nid: msgspec.structs.replace(n, address=n.address.replace("127.18.", "127.38.", 1), netns_address=None)
        for nid, n in topo.nodes.items()
    }
    return msgspec.structs.replace(topo, nodes=nodes, ledger=ledger)


async def run_mode(topo: Topology, state: Path, n: int, concurrency: int) -> dict:
    async with trio.open_nursery() as nursery:
        running = await nursery.start(
            lambda task_status: run_topology(topo, state, clock=Clock(TEST_TIME), task_status=task_status)
        )
        cards = running.cards.ensure_pool(n)
        kiosks = [k.id for k in topo.of_kind("kiosk")]
        conns = []
        for kid in kiosks[: max(1, min(concurrency, len(kiosks)))]:
            kiosk = Kiosk(running.context(kid), state)
            conn = await kiosk.connect()
            nursery.start_soon(conn.run)
            conns.append((kiosk, conn))
        statuses: list[str] = []
        queue = list(range(n))

        async def worker(w: int) -> None:
            kiosk, conn = conns[w % len(conns)]
            while queue:
                i = queue.pop()
                r = await kiosk.issue(
                    conn, cards[i], DEFAULT_PIN, IssueRequest("131016", "residence-record"), timeout=60
                )
                statuses.append(r.status)

        t0 = time.perf_counter()
        async with trio.open_nursery() as workers:
            for w in range(concurrency):
                workers.start_soon(worker, w)
        elapsed = time.perf_counter() - t0
        center = running.app("issuance-center")
        out = {
            "issuances": n,
            "issued": statuses.count("issued"),
            "concurrency": concurrency,
            "seconds": round(elapsed, 3),
            "per_second": round(n / elapsed, 1),
            "ledger_batches": center.ledger.batches,
            "ledger_ops": center.ledger.ops,
        }
        for _, conn in conns:
            conn.close()
        running.stop()
        nursery.cancel_scope.cancel()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--concurrency", default="1,12")
    p.add_argument("--json", help="write the report here")
    args = p.parse_args()
    base = load_topology(DEFAULT_TOPOLOGY)
    report = {"n": args.n, "runs": []}
    with tempfile.TemporaryDirectory(prefix="konbini-ledger-bench-") as tmp:
        state = Path(tmp)
        topo = shifted(base, None)
        CardStore(state, PKI.ensure(state, topo), clock=lambda: TEST_TIME).ensure_pool(args.n)
        for conc in (int(c) for c in args.concurrency.split(",")):
            for mode in ("durable", ":memory:"):
                t = shifted(base, None if mode == "durable" else ":memory:")
                (state / "ledger.sqlite").unlink(missing_ok=True)
                r = trio.run(run_mode, t, state, args.n, conc)
                r["ledger"] = mode
                report["runs"].append(r)
                print(
                    f"{mode:>9} concurrency {conc:>3}: {r['per_second']:>7.1f} issuances/s "
                    f"({r['issued']}/{r['issuances']} issued in {r['seconds']} s; {r['ledger_ops']} ledger ops in {r['ledger_batches']} commits)"
                )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
