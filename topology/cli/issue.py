"""`konbini issue`: one issuance through a running topology (or one launched for the run)."""

from __future__ import annotations

import json
import sys

import trio

from gateway.business.clock import Clock
from gateway.node.cluster import CLUSTER
from gateway.node.server import NodeStartError
from gateway.protocol.messages import IssueRequest
from kiosk_emu.card import DEFAULT_PIN, CardError, CardStore
from kiosk_emu.kiosk import Kiosk
from topology.cli.common import UserError, load, state_dir
from topology.cli.netns import enter_kiosk_namespace
from topology.launch.impair import Impairments, LineError
from topology.launch.loopback import Running, run_topology
from topology.launch.netns import running_part
from topology.pki import PKI, PKIError


def pick_kiosk(topo, kiosk: str | None, store: str | None) -> str:
    if kiosk:
        if kiosk not in topo.nodes or topo.nodes[kiosk].kind != "kiosk":
            raise UserError(f"unknown kiosk {kiosk!r} (see `konbini up` for the node list)")
        return kiosk
    for node in topo.of_kind("kiosk"):
        if store is None or node.site == store or node.upstream == store:
            return node.id
    raise UserError(f"no kiosk in store {store!r} (stores are sites like 'store-a1')")


def cmd_issue(args) -> int:
    topo = load(args.topology)
    sdir = state_dir(args, topo)
    mode = "netns" if getattr(args, "netns", False) else CLUSTER if getattr(args, "cluster", False) else "loopback"
    if mode == "netns":
        topo = running_part(topo, sdir)  # `up --netns --sites`: its stores, municipalities and addresses
    kiosk_id = pick_kiosk(topo, args.kiosk, args.store)
    if mode == "netns":
        if args.up:
            raise UserError("--up and --netns do not mix; start `konbini up --netns` first")
        enter_kiosk_namespace(topo, kiosk_id, getattr(args, "tag", None))
    muni = args.municipality or next(iter(topo.municipalities()), None)
    if args.copies < 1:
        raise UserError("--copies must be at least 1")
    if args.clock and not args.up:  # said, not silently ignored: the servers keep their own clock
        print("konbini: note: --clock sets this kiosk's time only (its cards and notices); the running topology "
              "keeps its own clock (start it with `konbini up --clock …`, or use --up)", file=sys.stderr)
    clock = Clock.parse(args.clock, 1.0)

    async def once(running: Running):
        try:
            card = running.cards.load(args.card) if args.card else running.cards.ensure_pool(1, pin=args.pin or DEFAULT_PIN)[0]
        except CardError as exc:
            raise UserError(str(exc)) from None
        kiosk = Kiosk(running.context(kiosk_id), sdir)
        try:
            conn = await kiosk.connect()
        except OSError as exc:
            raise UserError(f"cannot reach {kiosk.router.id} at {kiosk.router.address}:{kiosk.router.port}: {exc.strerror or exc} (is `konbini up` running? or pass --up)") from None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.run)
            req = IssueRequest(municipality=muni or "", cert_type=args.cert, copies=args.copies, size=args.size)
            result = await kiosk.issue(conn, card, args.pin or DEFAULT_PIN, req)
            running.cards.save(card)
            conn.close()
        return result

    async def main():
        if args.up:
            async with trio.open_nursery() as nursery:
                running = await nursery.start(lambda task_status: run_topology(topo, sdir, clock=clock, task_status=task_status))
                result = await once(running)
                nursery.cancel_scope.cancel()
                return result
        pki = PKI.load(sdir, topo) if mode == CLUSTER else PKI.ensure(sdir, topo)  # a pod's Secret is read-only
        return await once(Running(topo, sdir, pki, CardStore(sdir, pki, clock.now), clock, mode))

    # --up launches the topology as `konbini up` does: with the file's line impairments (root)
    lines = Impairments(topo, "loopback", state_dir=sdir) if args.up else None
    if lines is not None:
        try:
            notes = lines.start()
        except LineError as exc:
            notes = [f"line impairments not applied: {exc}"]
        for note in notes:
            print(f"konbini: lines: {note}", file=sys.stderr)
    try:
        result = trio.run(main)
    except (NodeStartError, PKIError) as exc:
        raise UserError(str(exc)) from None
    finally:
        if lines is not None:
            lines.stop()
    if args.json:
        print(json.dumps(result.as_json(), ensure_ascii=False))
    else:
        line = f"{result.status}: {result.reason or 'ok'}"
        if result.status == "issued":
            line += f" issuance={result.issuance_id} bytes={result.document_bytes} fee={result.fee} yen"
        print(f"{line} latency={result.latency_ms:.1f} ms")
        if result.message and result.status != "issued":
            print(f"kiosk screen: {result.message}")
        if result.reason == "outside-hours":
            when = f"{clock.now():%Y-%m-%d %H:%M} JST" if args.up else "the running topology's clock"
            print(f"emulated time: {when}; the center serves 06:30–23:00 Japan time (a municipality may narrow it). "
                  "Try `--up --clock 2026-11-24T10:00:00+09:00`.")
    return 0 if result.status == "issued" else 1
