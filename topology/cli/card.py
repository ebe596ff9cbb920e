"""`konbini card new|list|revoke|unlock|phone|lost`: the emulated My Number cards of a state
directory, and the smartphone credentials made from them."""

from __future__ import annotations

from kiosk_emu.card import CardError, CardProfile, CardStore
from kiosk_emu.smartphone import SmartphoneStore
from topology.cli.common import UserError, load, state_dir
from topology.launch.clockfile import running_clock
from topology.pki import PKI, verify_card_certificate


def cmd_card(args) -> int:
    topo = load(args.topology)
    sdir = state_dir(args, topo)
    # the time of the topology last run with this state directory: a new card is valid there (item 8)
    clock = running_clock(sdir)
    store = CardStore(sdir, PKI.ensure(sdir, topo), clock.now)
    try:
        if args.card_cmd == "new":
            card = store.new(
                pin=args.pin,
                profile=CardProfile(args.profile),
                card_id=args.id,
                expired=args.expired,
                legacy=args.legacy,
            )
            key = "legacy SHA-1/RSA-1024 certificate, refused by default; " if args.legacy else ""
            print(
                f"created {card.card_id} ({key}PIN profile {card.profile}, "
                f"valid {card.certificate.not_valid_before_utc:%Y-%m-%d} to {card.certificate.not_valid_after_utc:%Y-%m-%d})"
            )
        elif args.card_cmd == "list":
            print_cards(store, clock.now())
        elif args.card_cmd == "revoke":
            if not store.revoke(args.id, args.reason):
                at, reason = store.revocations()[store.load(args.id).serial]
                raise UserError(
                    f"card {args.id} was already revoked on {at:%Y-%m-%d %H:%M} JST ({reason}); nothing changed"
                )
            phones = SmartphoneStore(store).revoke_card(args.id, args.reason)  # and its phones (seed 002 §8.1)
            print(
                f"revoked {args.id} ({args.reason}); the OCSP responder answers 'revoked' from now on"
                + (f"; so are its smartphone credentials {', '.join(phones)}" if phones else "")
            )
        elif args.card_cmd == "phone":
            phone = SmartphoneStore(store).issue(args.id, args.pin)
            print(
                f"created {phone.card_id} for card {args.id} (valid until {phone.certificate.not_valid_after_utc:%Y-%m-%d}, "
                "reissued while the card is good)"
            )
        elif args.card_cmd == "lost":
            SmartphoneStore(store).report_lost(args.id)
            print(f"revoked {args.id} (lost); the card it was made from stays good")
        elif args.card_cmd == "unlock":
            store.unlock(args.id)
            print(f"unlocked {args.id}: PIN tries reset")
    except (CardError, ValueError) as exc:
        raise UserError(str(exc)) from None
    return 0


def print_cards(store: CardStore, now) -> None:
    """One line a card: what decides whether a kiosk takes it, at the topology's time `now`."""
    revoked = store.revocations()
    rows = []
    for card_id in store.list():
        card = store.load(card_id)
        problem = verify_card_certificate(card.certificate, store.pki.jpki_ca, now)
        state = "revoked" if card.serial in revoked else problem or "valid"
        tries = "locked" if card.locked else f"{card.tries_left} of {card.profile.max_tries}"
        key = f"RSA-{card.key.key_size}" + (" legacy" if card.key.key_size < 2048 else "")
        rows.append(
            (card_id, card.profile.value, key, state, tries, f"{card.certificate.not_valid_after_utc:%Y-%m-%d}")
        )
    head = ("card", "PIN profile", "key", "certificate", "PIN tries left", "valid until")
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]
    for row in (head, *rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    print(f"{len(rows)} cards in {store.dir}; checked at {now:%Y-%m-%d %H:%M} JST")
