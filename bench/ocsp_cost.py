"""CPU per OCSP step, sans-IO: the responder's answer and the center's check of it.

    python -m bench.ocsp_cost [--repeat 5] [--number 200]

Prints the lowest of `repeat` runs, in µs per call, for each step twice in the same run: with the
verification caches of gateway/business/ocsp.py cleared before every call (what each call cost
before they existed) and with them warm. A throwaway PKI and card are made in a temporary folder.
"""

from __future__ import annotations

import argparse
import tempfile
import timeit
from datetime import datetime
from pathlib import Path

from gateway.business import ocsp
from gateway.business.clock import JST
from kiosk_emu.card import CardStore
from topology.pki import PKI
from topology.spec.model import Node, Topology

NOW = datetime(2026, 11, 24, 10, 0, tzinfo=JST)
CACHES = (ocsp._issuer_hashes, ocsp._key_hash, ocsp._signs_ocsp_for)


def _cold(fn):
    def call():
        for cache in CACHES:
            cache.cache_clear()
        return fn()

    return call


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ocsp_cost", description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--number", type=int, default=200)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        node = Node(id="ocsp-1", kind="ocsp", site="jlis", address="127.30.0.2", port=8443)
        pki = PKI.ensure(Path(tmp), Topology(name="t", nodes={node.id: node}))
        store = CardStore(Path(tmp), pki, clock=lambda: NOW)
        card = store.new()
        signer_cert, signer_key = pki.ocsp_signer()
        revocations = store.revocations()
        responder = ocsp.OcspResponder(pki.jpki_ca, signer_cert, signer_key, lambda: revocations, clock=lambda: NOW)
        request = ocsp.build_request(card.certificate, pki.jpki_ca)
        answer = responder.respond(request)
        assert ocsp.verdict(answer, card.certificate, pki.jpki_ca, NOW)[0] is None
        steps = {
            "responder: answer a request": lambda: responder.respond(request),
            "center: check an answer": lambda: ocsp.verdict(answer, card.certificate, pki.jpki_ca, NOW),
        }
        print(f"{'step':<30} {'caches cold µs':>15} {'caches warm µs':>15}")
        for name, fn in steps.items():
            cold = min(timeit.repeat(_cold(fn), number=args.number, repeat=args.repeat)) / args.number
            warm = min(timeit.repeat(fn, number=args.number, repeat=args.repeat)) / args.number
            print(f"{name:<30} {cold * 1e6:>15.0f} {warm * 1e6:>15.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
