"""The `konbini` command line: check, up, issue, card, demo.

Errors a user can hit print one line `konbini: <what> (<where to look>)` and exit non-zero;
no tracebacks for bad input.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from importlib import resources
from pathlib import Path

import trio

from gateway.business.clock import Clock

DEFAULT_TOPOLOGY = "default.yaml"


class UserError(Exception):
    """One line for the user, exit status 2."""


def default_topology_path() -> str:
    return str(resources.files("topology") / DEFAULT_TOPOLOGY)


def load(path: str | None):
    from topology.spec.load import TopologyError, load_topology

    try:
        return load_topology(path or default_topology_path())
    except TopologyError as exc:
        raise UserError(f"bad topology file:\n{exc}") from None


def state_dir(args, topo) -> Path:
    return Path(args.state or topo.state_dir)


# -- check -----------------------------------------------------------------------------------


def cmd_check(args) -> int:
    from topology.spec.load import check_main

    return check_main(args.file or default_topology_path())


# -- up ----------------------------------------------------------------------------------------


def cmd_up(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from topology.launch.loopback import run_topology

    if getattr(args, "netns", False):
        from topology.cli.netns import cmd_up_netns

        return cmd_up_netns(args)
    topo = load(args.file)
    console = Console()
    clock = Clock.parse(args.clock, args.clock_speed)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            running = await nursery.start(lambda task_status: run_topology(topo, state_dir(args, topo), clock=clock, task_status=task_status))
            table = Table(title=f"konbini topology {topo.name!r} ({running.mode})")
            for col in ("node", "kind", "site", "address", "ready"):
                table.add_column(col)
            for node in topo.nodes.values():
                ready = "listening" if node.id in running.servers else "client"
                addr = f"{node.address}:{node.port}" if node.port else node.address
                table.add_row(node.id, node.kind, node.site, addr, ready)
            console.print(table)
            console.print(f"[bold green]ready[/] in {running.ready_s * 1000:.0f} ms; clock {clock.now().isoformat()}; Ctrl-C stops.")
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    break  # shutdown is a cancel: every node's nursery unwinds
            nursery.cancel_scope.cancel()
        console.print("stopped; every node shut down.")

    trio.run(main)
    return 0


# -- issue -------------------------------------------------------------------------------------


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
    from gateway.node.server import NodeStartError
    from gateway.protocol.messages import IssueRequest
    from kiosk_emu.card import CardError, CardStore
    from kiosk_emu.kiosk import Kiosk
    from topology.launch.loopback import Running, run_topology
    from topology.pki import PKI

    topo = load(args.topology)
    sdir = state_dir(args, topo)
    kiosk_id = pick_kiosk(topo, args.kiosk, args.store)
    mode = "netns" if getattr(args, "netns", False) else "loopback"
    if mode == "netns":
        if args.up:
            raise UserError("--up and --netns do not mix; start `konbini up --netns` first")
        from topology.cli.netns import enter_kiosk_namespace

        enter_kiosk_namespace(topo, kiosk_id, getattr(args, "tag", None))
    muni = args.municipality or next(iter(topo.municipalities()), None)
    if args.copies < 1:
        raise UserError("--copies must be at least 1")
    clock = Clock.parse(args.clock, 1.0)

    async def once(running: Running):
        try:
            card = running.cards.load(args.card) if args.card else running.cards.ensure_pool(1, pin=args.pin or "1234")[0]
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
            result = await kiosk.issue(conn, card, args.pin or "1234", req)
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
        pki = PKI.ensure(sdir, topo)
        return await once(Running(topo, sdir, pki, CardStore(sdir, pki, clock.now), clock, mode))

    try:
        result = trio.run(main)
    except NodeStartError as exc:
        raise UserError(str(exc)) from None
    if args.json:
        print(json.dumps(result.as_json(), ensure_ascii=False))
    else:
        line = f"{result.status}: {result.reason or 'ok'}"
        if result.status == "issued":
            line += f" issuance={result.issuance_id} bytes={result.document_bytes} fee={result.fee} yen"
        print(f"{line} latency={result.latency_ms:.1f} ms")
        if result.message and result.status != "issued":
            print(f"kiosk screen: {result.message}")
    return 0 if result.status == "issued" else 1


# -- card --------------------------------------------------------------------------------------


def cmd_card(args) -> int:
    from kiosk_emu.card import CardError, CardProfile, CardStore
    from topology.pki import PKI

    topo = load(args.topology)
    sdir = state_dir(args, topo)
    store = CardStore(sdir, PKI.ensure(sdir, topo))
    try:
        if args.card_cmd == "new":
            card = store.new(
                pin=args.pin, profile=CardProfile(args.profile), card_id=args.id, expired=args.expired, legacy=args.legacy
            )
            print(f"created {card.card_id} (profile {card.profile}, valid until {card.certificate.not_valid_after_utc:%Y-%m-%d})")
        elif args.card_cmd == "list":
            for cid in store.list():
                print(cid)
        elif args.card_cmd == "revoke":
            store.revoke(args.id, args.reason)
            print(f"revoked {args.id} ({args.reason}); the OCSP responder answers 'revoked' from now on")
        elif args.card_cmd == "unlock":
            store.unlock(args.id)
            print(f"unlocked {args.id}: PIN tries reset")
    except (CardError, ValueError) as exc:
        raise UserError(str(exc)) from None
    return 0


# -- demo (the main job) -------------------------------------------------------------------------


def cmd_demo(args) -> int:
    from topology.cli.demo import run_demo

    return run_demo(load(args.topology), Path(args.state) if args.state else None)


# -- parser --------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="konbini", description="Emulate the convenience-store certificate issuance network.")
    p.add_argument("-v", "--verbose", action="store_true", help="log denials and node events")
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("check", help="validate a topology file against its schema and the security annex")
    c.add_argument("file", nargs="?", help="topology file (default: the shipped default topology)")
    c.set_defaults(func=cmd_check)

    u = sub.add_parser("up", help="launch the topology and run until Ctrl-C")
    u.add_argument("file", nargs="?", help="topology file (default: the shipped default topology)")
    u.add_argument("--state", help="state directory (PKI, cards, spools, logs)")
    u.add_argument("--clock", help="start the clock at this time, e.g. 2026-11-24T06:29:50+09:00")
    u.add_argument("--clock-speed", type=float, default=1.0, help="emulated seconds per real second")
    u.add_argument("--netns", action="store_true", help="network-namespace mode with nftables (root)")
    u.add_argument("--tag", help="with --netns: name namespaces konbini-TAG-* instead of konbini-*")
    u.set_defaults(func=cmd_up)

    i = sub.add_parser("issue", help="run one issuance through the topology")
    i.add_argument("--topology", help="topology file")
    i.add_argument("--state", help="state directory")
    i.add_argument("--up", action="store_true", help="launch the topology for this run, tear it down after")
    i.add_argument("--store", help="store site (e.g. store-a1); default: the first store")
    i.add_argument("--kiosk", help="kiosk node id (e.g. kiosk-a1-1)")
    i.add_argument("--card", help="card id (see `konbini card list`); default: a pool card with PIN 1234")
    i.add_argument("--pin", help="PIN typed at the kiosk (default 1234)")
    i.add_argument("--cert", default="residence-record", help="certificate type (default residence-record)")
    i.add_argument("--municipality", help="municipality code (default: the first in the topology)")
    i.add_argument("--copies", type=int, default=1)
    i.add_argument("--size", type=int, help="document size in bytes (default 64 KiB)")
    i.add_argument("--clock", help="emulated time for this run (with --up)")
    i.add_argument("--json", action="store_true", help="print one JSON object")
    i.add_argument("--netns", action="store_true", help="issue from the kiosk's namespace of a running `konbini up --netns`")
    i.add_argument("--tag", help="with --netns: namespaces konbini-TAG-*")
    i.set_defaults(func=cmd_issue)

    k = sub.add_parser("card", help="emulated My Number cards")
    k.add_argument("--topology", help="topology file")
    k.add_argument("--state", help="state directory")
    ksub = k.add_subparsers(dest="card_cmd", required=True)
    kn = ksub.add_parser("new", help="create a card")
    kn.add_argument("--id", help="card id (default: random opaque id)")
    kn.add_argument("--pin", default="1234")
    kn.add_argument("--profile", default="mynumber-auth", choices=["mynumber-auth", "jpki-2004-password"])
    kn.add_argument("--expired", action="store_true", help="a card whose certificate has expired")
    kn.add_argument("--legacy", action="store_true", help="legacy SHA-1/RSA-1024 profile (refused by default)")
    ksub.add_parser("list", help="list cards")
    kr = ksub.add_parser("revoke", help="revoke a card's certificate (published by OCSP)")
    kr.add_argument("id")
    kr.add_argument("--reason", default="voluntary", choices=["moved-or-died", "key-compromise", "voluntary"])
    ku = ksub.add_parser("unlock", help="reset a locked PIN counter (the counter procedure)")
    ku.add_argument("id")
    k.set_defaults(func=cmd_card)

    d = sub.add_parser("demo", help="the main job: launch the default topology, run issuances and refusals, summarise")
    d.add_argument("--topology", help="topology file")
    d.add_argument("--state", help="state directory (default: a fresh temporary one)")
    d.set_defaults(func=cmd_demo)

    from topology.cli.netns import register as register_netns

    register_netns(sub)

    from topology.cli.business import add_parsers  # settle, sla, ledger

    add_parsers(sub, load, UserError)

    from topology.cli.bench import (
        add_parser as add_bench_parser,  # `konbini bench` lives with the benchmarks
    )

    add_bench_parser(sub, UserError)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR, format="%(asctime)s %(name)s %(message)s")
    try:
        return args.func(args)
    except BaseException as exc:
        user = _user_error(exc)
        if user is None:
            raise
        print(f"konbini: {user}", file=sys.stderr)
        return 2


def _user_error(exc: BaseException) -> BaseException | None:
    """The user-facing error inside exc, which may arrive wrapped in Trio's exception groups."""
    from gateway.node.server import NodeStartError

    if isinstance(exc, (UserError, NodeStartError)):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            if (found := _user_error(inner)) is not None:
                return found
    return None


if __name__ == "__main__":
    sys.exit(main())
