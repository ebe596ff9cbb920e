"""`konbini card new|list|revoke|unlock`: the emulated My Number cards of a state directory."""

from __future__ import annotations

from kiosk_emu.card import CardError, CardProfile, CardStore
from topology.cli.common import UserError, load, state_dir
from topology.pki import PKI


def cmd_card(args) -> int:
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
