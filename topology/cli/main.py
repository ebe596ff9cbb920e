"""The `konbini` command line: the parser and the dispatch; every command lives in its own module.

Errors a user can hit print one line `konbini: <what> (<where to look>)` and exit non-zero;
no tracebacks for bad input (`topology.cli.common.UserError`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from kiosk_emu.card import DEFAULT_PIN
from topology.cli import bench, business, export, graph, netns, node
from topology.cli import expand as expand_cmd
from topology.cli.card import cmd_card
from topology.cli.check import check_main
from topology.cli.common import default_topology_path, load, settle_options, share_options, user_error
from topology.cli.demo import run_demo
from topology.cli.issue import cmd_issue
from topology.cli.up import PLANNED_CONNECTIONS, cmd_preflight, cmd_up

# -- check -----------------------------------------------------------------------------------


def cmd_check(args) -> int:
    return check_main(args.file or default_topology_path())


# -- demo (the main job) -------------------------------------------------------------------------


def cmd_demo(args) -> int:
    return run_demo(load(args.topology), Path(args.state) if args.state else None)


# -- parser --------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="konbini", description="Emulate the convenience-store certificate issuance network."
    )
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
    u.add_argument(
        "--sites",
        help="with --netns: only these sites (comma-separated shell patterns, e.g. "
        "'store-a0000[1-5],lgwan-000*') and the sites on their way up (EC router, DMZ relays, centers)",
    )
    u.add_argument(
        "--no-preflight", action="store_true", help="start even when the pre-flight check finds a limit too low"
    )
    u.add_argument(
        "--processes",
        type=int,
        help="loopback mode: spread the nodes over this many processes (cores; open-file limits per "
        "process; default 1 for a small file, else one a core or as many as the open-files limit needs); netns mode: serve the namespaces from this many (default: one each up "
        "to 64 namespaces, else two a core)",
    )
    node.add_restart_option(u)
    u.set_defaults(func=cmd_up)

    pf = sub.add_parser(
        "preflight", help="the machine limits a topology will hit (open files, ports, memory), and how to raise them"
    )
    pf.add_argument("file", nargs="?", help="topology file (default: the shipped default topology)")
    pf.add_argument(
        "--connections",
        type=int,
        default=PLANNED_CONNECTIONS,
        help="concurrent connections to plan for (default %(default)s)",
    )
    pf.add_argument(
        "--processes", type=int, help="as `konbini up --processes` (and its default): the limits per process"
    )
    pf.set_defaults(func=cmd_preflight)

    i = sub.add_parser("issue", help="run one issuance through the topology")
    i.add_argument("--topology", help="topology file")
    i.add_argument("--state", help="state directory")
    i.add_argument("--up", action="store_true", help="launch the topology for this run, tear it down after")
    i.add_argument("--store", help="store site (e.g. store-a1); default: the first store")
    i.add_argument("--kiosk", help="kiosk node id (e.g. kiosk-a1-1)")
    i.add_argument("--card", help=f"card id (see `konbini card list`); default: a pool card with PIN {DEFAULT_PIN}")
    i.add_argument("--pin", help=f"PIN typed at the kiosk (default {DEFAULT_PIN}, the pool cards' PIN)")
    i.add_argument(
        "--cert",
        default="residence-record",
        help="certificate type, one the municipality offers (its `certificates:` in the topology file): "
        "residence-record, seal-registration, tax-certificate, family-register, vaccination "
        "(default residence-record)",
    )
    i.add_argument("--municipality", help="municipality code (default: the first in the topology)")
    i.add_argument("--copies", type=int, default=1, help="copies to print, 1 to 10, each paid (default 1)")
    i.add_argument("--size", type=int, help="document size in bytes, 1 to 64 MiB (default 64 KiB)")
    i.add_argument(
        "--clock",
        help="emulated time, e.g. 2026-11-24T10:00 (Japan time unless an offset is given): with --up, "
        "of the whole topology; else of this kiosk only (default: the running topology's time)",
    )
    i.add_argument("--json", action="store_true", help="print one JSON object")
    i.add_argument(
        "--save",
        metavar="FILE.pdf",
        help="keep the certificate the kiosk printed (stamped 返金済・無効 when the job was void)",
    )
    i.add_argument(
        "--smartphone",
        nargs="?",
        const="",
        metavar="PHONE_ID",
        help="hold up a smartphone credential instead of the card: PHONE_ID, or without it a new one made from the card",
    )
    i.add_argument(
        "--netns", action="store_true", help="issue from the kiosk's namespace of a running `konbini up --netns`"
    )
    i.add_argument(
        "--cluster", action="store_true", help="from a Kubernetes pod: dial Service names, PKI read-only from STATE/pki"
    )
    i.add_argument("--tag", help="with --netns: namespaces konbini-TAG-*")
    i.set_defaults(func=cmd_issue)

    k = sub.add_parser("card", help="emulated My Number cards")
    k.add_argument("--topology", help="topology file")
    k.add_argument("--state", help="state directory")
    ksub = k.add_subparsers(dest="card_cmd", required=True)
    kn = ksub.add_parser("new", help="create a card")
    kn.add_argument("--id", help="card id (default: random opaque id)")
    kn.add_argument(
        "--pin",
        default=DEFAULT_PIN,
        help=f"the card's secret: 4 digits for mynumber-auth, 6-16 letters and digits for "
        f"jpki-2004-password (default {DEFAULT_PIN})",
    )
    kn.add_argument(
        "--profile",
        default="mynumber-auth",
        choices=["mynumber-auth", "jpki-2004-password"],
        help="which PIN guards the key: mynumber-auth locks after 3 wrong tries, jpki-2004-password after 5",
    )
    kn.add_argument("--expired", action="store_true", help="a card whose certificate has expired")
    kn.add_argument("--legacy", action="store_true", help="legacy SHA-1/RSA-1024 profile (refused by default)")
    ksub.add_parser(
        "list", help="list cards: PIN profile, key, certificate state (valid, revoked, expired), PIN tries left"
    )
    kr = ksub.add_parser("revoke", help="revoke a card's certificate (published by OCSP)")
    kr.add_argument("id", help="card id (see `konbini card list`)")
    kr.add_argument(
        "--reason",
        default="voluntary",
        choices=["moved-or-died", "key-compromise", "voluntary"],
        help="revocation cause, as seed 004 names them (default voluntary)",
    )
    ku = ksub.add_parser("unlock", help="reset a locked PIN counter (the counter procedure)")
    ku.add_argument("id", help="card id (see `konbini card list`)")
    kp = ksub.add_parser(
        "phone", help="a smartphone credential made from a card (seed 002: one month, reissued while the card is good)"
    )
    kp.add_argument("id", help="the card's id")
    kp.add_argument("--pin", default=DEFAULT_PIN, help=f"the phone's PIN (default {DEFAULT_PIN})")
    kl = ksub.add_parser("lost", help="report a smartphone lost: its credential is revoked, the card stays good")
    kl.add_argument("id", help="the smartphone credential's id (phone-…)")
    k.set_defaults(func=cmd_card)

    d = sub.add_parser("demo", help="the main job: launch the default topology, run issuances and refusals, summarise")
    d.add_argument("--topology", help="topology file")
    d.add_argument("--state", help="state directory (default: a fresh temporary one)")
    d.set_defaults(func=cmd_demo)

    netns.register(sub)  # down, policy, link
    business.add_parsers(sub)  # settle, sla, ledger
    bench.add_parser(sub)
    export.register(sub)  # export k8s, export compose
    expand_cmd.register(sub)  # expand, schema
    graph.register(sub)
    node.register(sub)  # node list, kill, stop, start, restart
    share_options(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        settle_options(args)
        logging.basicConfig(
            level=logging.INFO if args.verbose else logging.ERROR, format="%(asctime)s %(name)s %(message)s"
        )
        return args.func(args)
    except BaseException as exc:
        user = user_error(exc)
        if user is None:
            raise
        print(f"konbini: {user}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
