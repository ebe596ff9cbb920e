"""TLS 1.3 contexts with mutual authentication for every hop (SEC-SN-2), ALPN h2 only."""

from __future__ import annotations

import ssl
from functools import lru_cache
from pathlib import Path


def _base(ctx: ssl.SSLContext, chain: Path, key: Path, ca: Path, tls12_floor: bool) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2 if tls12_floor else ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(chain, key)
    ctx.load_verify_locations(ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols(["h2"])
    return ctx


@lru_cache(maxsize=256)
def server_context(chain: Path, key: Path, ca: Path, tls12_floor: bool = False, alpn: str = "h2") -> ssl.SSLContext:
    """`alpn` "http/1.1" only for the metrics scrape port (gateway/node/metrics.py)."""
    ctx = _base(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), chain, key, ca, tls12_floor)
    ctx.set_alpn_protocols([alpn])
    # Tickets would let a client resume without presenting its certificate again; we want
    # every connection authenticated by certificate, and connections are long-lived anyway.
    ctx.options |= ssl.OP_NO_TICKET
    return ctx


@lru_cache(maxsize=256)
def client_context(chain: Path, key: Path, ca: Path, tls12_floor: bool = False) -> ssl.SSLContext:
    ctx = _base(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), chain, key, ca, tls12_floor)
    ctx.check_hostname = True  # server_hostname is the expected node id (a DNS SAN of its cert)
    return ctx


def peer_identity(cert: dict | None) -> str | None:
    """The node id a peer's verified certificate (`getpeercert()`) names: its subject CN."""
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None
