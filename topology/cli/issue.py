"""`konbini issue`: one issuance through a running topology (or one launched for the run)."""

from __future__ import annotations

import json
import ssl
import sys
from pathlib import Path

import trio

from gateway.business import rules
from gateway.business.refusal import Refusal
from gateway.node.cluster import CLUSTER
from gateway.node.server import NodeStartError
from gateway.nodes.center.issuing import DEFAULT_DOCUMENT_SIZE, MAX_DOCUMENT_SIZE
from gateway.protocol.messages import IssueRequest
from kiosk_emu.card import DEFAULT_PIN, Card, CardError, CardStore
from kiosk_emu.device.printer import Printer
from kiosk_emu.kiosk import Kiosk
from kiosk_emu.smartphone import SmartphoneStore
from topology.cli.common import UserError, load, parse_clock, state_dir
from topology.cli.netns import enter_kiosk_namespace
from topology.launch.clockfile import running_clock
from topology.launch.impair import Impairments, LineError
from topology.launch.loopback import Running, run_topology
from topology.launch.netns import running_part
from topology.pki import PKI, PKIError
from topology.spec.model import Mode


def pick_kiosk(topo, kiosk: str | None, store: str | None) -> str:
    """`--kiosk`, else the first kiosk of `--store` (a site, or its store router), else the first kiosk."""
    kiosks = topo.of_kind("kiosk")
    if store is not None and not any(store in (k.site, k.upstream) for k in kiosks):
        stores = sorted({k.site for k in kiosks})
        raise UserError(
            f"unknown store {store!r}; stores are sites with kiosks: {', '.join(stores[:5])}"
            + (f" … ({len(stores)} in all)" if len(stores) > 5 else "")
        )
    if kiosk:
        if kiosk not in topo.nodes or topo.nodes[kiosk].kind != "kiosk":
            raise UserError(f"unknown kiosk {kiosk!r} (see `konbini up` for the node list)")
        node = topo.nodes[kiosk]
        if store is not None and store not in (node.site, node.upstream):
            raise UserError(f"kiosk {kiosk} is in store {node.site}, not {store}; give one of --kiosk and --store")
        return kiosk
    return next(k.id for k in kiosks if store is None or store in (k.site, k.upstream))


def _certificate_refused(exc: BaseException | None) -> bool:
    """A TLS peer refused our certificate chain, or we its, somewhere in `exc` (Trio wraps the
    ssl error in BrokenResourceError, and nurseries in groups)."""
    if exc is None:
        return False
    if isinstance(exc, ssl.SSLCertVerificationError) or "certificate" in str(getattr(exc, "reason", "") or "").lower():
        return True
    return any(
        _certificate_refused(e)
        for e in (*getattr(exc, "exceptions", ()), exc.__cause__, exc.__context__)
        if e is not exc
    )


def outside_hours_hint(topo, muni: str | None, cert_type: str, clock, launched: bool) -> str:
    """The emulated time of the refusal, and a command that runs at the next hour the service opens."""
    now = clock.now()
    node = topo.municipalities().get(muni or "")
    at = node and rules.next_open(now, topo.service_hours, node.municipality, cert_type)
    whose = "this run's" if launched else "the running topology's"
    line = f"emulated time: {now:%Y-%m-%d %H:%M} JST ({whose} clock)"
    if not at:
        return line + "; the service does not open for this municipality in the next two weeks."
    when = at.isoformat()
    how = f"`konbini issue --up --clock {when}`" if launched else f"stop it and start `konbini up --clock {when}`"
    return line + f"; open again {at:%Y-%m-%d %H:%M} JST: {how}"


def check_size(size: int | None) -> None:
    """`--size`: a document of at least one byte, at most what the center serves (it would cut it)."""
    if size is not None and not 1 <= size <= MAX_DOCUMENT_SIZE:
        raise UserError(
            f"--size {size}: a document is 1 to {MAX_DOCUMENT_SIZE:,} bytes (default {DEFAULT_DOCUMENT_SIZE:,})"
        )


def smartphone(cards: CardStore, phone_id: str, card: Card) -> Card:
    """The credential the resident holds up: `phone_id`'s (reissued if its month is over), or a
    new one made from `card`. One the phone cannot renew is held up as it is: the center refuses it."""
    phones = SmartphoneStore(cards)
    if not phone_id:
        return phones.issue(card.card_id)
    try:
        return phones.current(phone_id)
    except CardError:
        return cards.load(phone_id)


def cmd_issue(args) -> int:
    topo = load(args.topology)
    sdir = state_dir(args, topo)
    mode = (
        Mode.NETNS if getattr(args, "netns", False) else CLUSTER if getattr(args, "cluster", False) else Mode.LOOPBACK
    )
    if mode == Mode.NETNS:
        topo = running_part(topo, sdir)  # `up --netns --sites`: its stores, municipalities and addresses
    kiosk_id = pick_kiosk(topo, args.kiosk, args.store)
    if mode == Mode.NETNS:
        if args.up:
            raise UserError("--up and --netns do not mix; start `konbini up --netns` first")
        enter_kiosk_namespace(topo, kiosk_id, getattr(args, "tag", None))
    muni = args.municipality or next(iter(topo.municipalities()), None)
    if args.copies < 1:
        raise UserError("--copies must be at least 1")
    check_size(args.size)
    if args.clock and not args.up:  # said, not silently ignored: the servers keep their own clock
        print(
            "konbini: note: --clock sets this kiosk's time only (its cards and notices); the running topology "
            "keeps its own clock (start it with `konbini up --clock …`, or use --up)",
            file=sys.stderr,
        )
    # joining a running topology: its time, so that a card made now is valid there (item 8)
    clock = parse_clock(args.clock) if args.clock or args.up else running_clock(sdir)
    if not args.up and mode != CLUSTER and not (sdir / "pki").is_dir():  # never a new PKI nobody trusts
        raise UserError(
            f"no PKI in {sdir}: pass the --state that `konbini up` runs with, or --up to launch the topology for this run"
        )
    save = Path(args.save) if args.save else None
    if save is not None and not save.parent.is_dir():
        raise UserError(f"--save {args.save}: folder {save.parent} does not exist")

    async def once(running: Running):
        kiosk = Kiosk(running.context(kiosk_id), sdir, Printer(save_to=save) if save else None)
        where = f"{kiosk.router.id} at {kiosk.router.address}:{kiosk.router.port}"
        try:
            conn = await kiosk.connect()  # first: no card is made for a topology that does not trust us
            async with trio.open_nursery() as nursery:
                nursery.start_soon(conn.run)
                try:
                    card = running.cards.load(args.card) if args.card else running.cards.ensure_pool(1)[0]
                    if args.smartphone is not None:
                        card = smartphone(running.cards, args.smartphone, card)
                except CardError as exc:
                    raise UserError(str(exc)) from None
                req = IssueRequest(municipality=muni or "", cert_type=args.cert, copies=args.copies, size=args.size)
                result = await kiosk.issue(conn, card, args.pin or DEFAULT_PIN, req)
                running.cards.save(card)
                conn.close()
        except (OSError, BaseExceptionGroup) as exc:  # LinkDown is an OSError too
            if _certificate_refused(exc):
                raise UserError(
                    f"{where} does not trust the PKI in {sdir / 'pki'}, made for another state directory; "
                    "pass the --state that `konbini up` runs with"
                ) from None
            if isinstance(exc, OSError):
                raise UserError(
                    f"cannot reach {where}: {exc.strerror or exc} (is `konbini up` running? or pass --up)"
                ) from None
            raise
        return result

    async def main():
        if args.up:
            async with trio.open_nursery() as nursery:
                running = await nursery.start(
                    lambda task_status: run_topology(topo, sdir, clock=clock, task_status=task_status)
                )
                result = await once(running)
                nursery.cancel_scope.cancel()
                return result
        pki = PKI.load(sdir, topo) if mode == CLUSTER else PKI.ensure(sdir, topo)  # a pod's Secret is read-only
        return await once(Running(topo, sdir, pki, CardStore(sdir, pki, clock.now), clock, mode))

    # --up launches the topology as `konbini up` does: with the file's line impairments (root)
    lines = Impairments(topo, Mode.LOOPBACK, state_dir=sdir) if args.up else None
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
        if result.reason == Refusal.CERTIFICATE_TYPE_NOT_OFFERED and (node := topo.municipalities().get(muni or "")):
            print(f"municipality {muni} offers: {', '.join(node.municipality.certificates)}")
        if save is not None and save.exists():
            print(f"printed certificate saved to {save}")
        if result.reason == Refusal.OUTSIDE_HOURS:
            print(outside_hours_hint(topo, muni, args.cert, clock, args.up))
    return 0 if result.status == "issued" else 1
