"""`konbini settle`, `konbini sla` and `konbini ledger verify`: reports over the center's ledger.

Each prints a short table, or one JSON object with --json; problems are one line (UserError).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from gateway.business.ledger import MEMORY, LedgerDB, LedgerError, ledger_path
from gateway.business.settlement import SettlementError, report
from gateway.business.sla import availability, complete_outages
from topology.cli.common import UserError, load, parse_clock


def open_ledger(args, topo) -> LedgerDB:
    path = ledger_path(topo.ledger, Path(args.state or topo.state_dir))
    if path == MEMORY:
        raise UserError('the topology keeps its ledger in memory (ledger: ":memory:"); there is nothing to report on')
    if not Path(path).exists():
        raise UserError(f"no ledger at {path} (run `konbini up` and issue first, or pass --state)")
    try:
        db = LedgerDB(path)
        db.verify()
    except LedgerError as exc:
        raise UserError(str(exc)) from None
    return db


def cmd_settle(args, topo) -> int:
    now = parse_clock(args.clock).now()
    db = open_ledger(args, topo)
    try:
        fixed = db.fixed_report(args.month)
        if fixed is not None:
            rep, status = fixed, "fixed"
            if args.fix:
                raise UserError(f"month {args.month} is already fixed; fixed data is never modified")
        else:
            rep, status = report(db.entries(args.month), args.month, now), "open"
            if args.fix:
                with db.transaction():
                    db.fix_month(args.month, now, rep)
                status = "fixed"
    except SettlementError as exc:
        raise UserError(str(exc)) from None
    except LedgerError as exc:
        raise UserError(str(exc)) from None
    rep = {**rep, "status": status}
    munis = topo.municipalities()
    named = {
        code: {**t, "name": munis[code].municipality.name if code in munis else None}
        for code, t in rep.get("municipalities", {}).items()
    }  # a month fixed before this has none
    rep["municipalities"] = named
    if args.json:
        print(json.dumps(rep, ensure_ascii=False))
        return 0
    print(f"settlement {rep['month']} ({status}); consignment {rep['consignment_fee_per_copy']} yen per copy")
    print(f"{'operator':<10} {'copies':>7} {'fees':>10} {'consignment':>12} {'amount due':>11}")
    for op, t in rep["operators"].items():
        print(f"{op:<10} {t['copies']:>7} {t['fees']:>10} {t['consignment']:>12} {t['amount_due']:>11}")
    tot = rep["total"]
    print(f"{'total':<10} {tot['copies']:>7} {tot['fees']:>10} {tot['consignment']:>12} {tot['amount_due']:>11}")
    for code, t in named.items():
        print(f"  {(t['name'] + ' ' if t['name'] else '')}{code}: {t['copies']} copies, {t['fees']} yen in fees")
    d = rep["deadlines"]
    print(
        f"deadlines: reconcile {d['reconcile']}, amount fixed {d['fix']}, invoice {d['invoice']}, payment {d['payment']}"
    )
    return 0


def cmd_sla(args, topo) -> int:
    db = open_ledger(args, topo)
    if args.record_outage:
        try:
            start, end = (datetime.fromisoformat(t) for t in args.record_outage)
        except ValueError:
            raise UserError("--record-outage START END: ISO times with offset, e.g. 2026-11-03T02:00+09:00") from None
        if start.tzinfo is None or end.tzinfo is None or end <= start:
            raise UserError("--record-outage START END: aware times (with +09:00) and END after START")
        with db.transaction():
            db.record_outage("service", start, end, "recorded by hand")
    per_scope: dict[str, list] = {}
    for scope, start, end in db.outages():
        per_scope.setdefault(scope, []).append((start, end))
    kiosks = [n.id for n in topo.of_kind("kiosk")]
    scopes = kiosks if any(k in per_scope for k in kiosks) else []
    try:
        rep = availability(args.month, complete_outages(per_scope, scopes))
    except SettlementError as exc:
        raise UserError(str(exc)) from None
    if args.json:
        print(json.dumps(rep, ensure_ascii=False))
    else:
        verdict = "met" if rep["met"] else "MISSED"
        print(
            f"availability {rep['month']}: {rep['availability_percent']:.4f} % (target {rep['target_percent']:.1f} %: {verdict}); "
            f"downtime {rep['downtime_minutes']:.1f} of {rep['month_minutes']} minutes; "
            f"{len(rep['outages_counted'])} outages counted, {rep['outages_ignored_short']} of 10 minutes or less ignored"
        )
    return 0 if rep["met"] else 1


def cmd_ledger(args, topo) -> int:
    db = open_ledger(args, topo)  # verifies the chain
    print(f"ledger {db.path}: {db.verify()} rows, hash chain intact; schema version {db.version}")
    return 0


def add_parsers(sub) -> None:
    """Register the subcommands on the `konbini` parser ."""

    def wrap(fn):
        return lambda args: fn(args, load(args.topology))

    s = sub.add_parser("settle", help="monthly settlement per operator (BIZ-6)")
    s.add_argument("--month", required=True, help="YYYY-MM, e.g. 2026-11")
    s.add_argument("--fix", action="store_true", help="fix the month: its records can never change after this")
    s.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object: per operator copies, fees, consignment, amount due; deadlines",
    )
    s.add_argument("--topology", help="topology file")
    s.add_argument("--state", help="state directory")
    s.add_argument(
        "--clock",
        help="emulated now, e.g. 2026-12-09T10:00 (Japan time unless an offset is given; the month must be over)",
    )
    s.set_defaults(func=wrap(cmd_settle))

    a = sub.add_parser(
        "sla",
        help="monthly availability under the MynaSign service terms (BIZ-9): 43,200-minute month, outages over 10 minutes count, target 99.9 %%; exit 1 when missed",
    )
    a.add_argument("--month", required=True, help="YYYY-MM")
    a.add_argument("--json", action="store_true")
    a.add_argument("--record-outage", nargs=2, metavar=("START", "END"), help="record a complete service outage first")
    a.add_argument("--topology", help="topology file")
    a.add_argument("--state", help="state directory")
    a.set_defaults(func=wrap(cmd_sla))

    g = sub.add_parser("ledger", help="the center's ledger")
    g.add_argument("ledger_cmd", choices=["verify"], help="verify: walk the hash chain")
    g.add_argument("--topology", help="topology file")
    g.add_argument("--state", help="state directory")
    g.set_defaults(func=wrap(cmd_ledger))
