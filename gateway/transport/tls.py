"""TLS 1.3 contexts with mutual authentication for every hop (SEC-SN-2), ALPN h2 only, and session
tickets so a reconnecting client resumes (docs/tls.md)."""

from __future__ import annotations

import ctypes
import logging
import ssl
from functools import lru_cache
from pathlib import Path

log = logging.getLogger("konbini.tls")

# How long a server's session ticket may be resumed (its lifetime hint; the server refuses it after).
# A resumed connection carries the identity of the certificate verified in the full handshake, so
# this bounds how long a connection may be admitted on a certificate checked that long ago.
TICKET_LIFETIME = 3600  # seconds


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
    _alpn_or_alert(ctx, alpn.encode())
    # Stateless TLS 1.3 tickets, sealed with this context's own random key: a ticket names the
    # client certificate verified in the full handshake, and only that client holds its secret.
    # One ticket per handshake is enough, as a client resumes one connection at a time per server.
    ctx.num_tickets = 1
    _session_lifetime(ctx, TICKET_LIFETIME)
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


# OpenSSL's ALPN selection callback (SSL_CTX_set_alpn_select_cb). Python's own callback answers a
# client that offers only other protocols by negotiating none (SSL_TLSEXT_ERR_NOACK), so the
# handshake completed and the connection was then dropped; RFC 7301 §3.2 wants the handshake to
# fail with a no_application_protocol alert, which OpenSSL sends when the callback says so.
_SELECT = ctypes.CFUNCTYPE(
    ctypes.c_int,
    ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_void_p),
    ctypes.POINTER(ctypes.c_ubyte),
    ctypes.c_void_p,
    ctypes.c_uint,
    ctypes.c_void_p,
)
_TLSEXT_ERR_OK, _TLSEXT_ERR_ALERT_FATAL = 0, 2


def _ssl_ctx(ctx: ssl.SSLContext) -> int | None:
    """The SSL_CTX pointer under `ctx`, or None where CPython's layout is not the one we know."""
    # the pointer follows the object header in CPython's PySSLContext; its options, read through
    # OpenSSL, must be the ones Python reports, or this is not the layout we know
    pointer = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    return pointer if _libssl().SSL_CTX_get_options(pointer) == ctx.options else None


def _session_lifetime(ctx: ssl.SSLContext, seconds: int) -> None:
    """SSL_CTX_set_timeout, which Python does not expose: OpenSSL's own default is two hours."""
    if (pointer := _ssl_ctx(ctx)) is None:
        log.warning("ssl.SSLContext is not laid out as CPython's: tickets keep OpenSSL's lifetime")
        return
    _libssl().SSL_CTX_set_timeout(pointer, seconds)


@lru_cache(maxsize=1)
def _libssl():
    """The libssl the `ssl` module runs on (its symbols resolve through `_ssl`'s own links)."""
    lib = ctypes.CDLL(ssl._ssl.__file__)  # noqa: SLF001
    lib.SSL_CTX_set_alpn_select_cb.argtypes = [ctypes.c_void_p, _SELECT, ctypes.c_void_p]
    lib.SSL_CTX_set_alpn_select_cb.restype = None
    lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
    lib.SSL_CTX_get_options.restype = ctypes.c_uint64
    lib.SSL_CTX_set_timeout.argtypes = [ctypes.c_void_p, ctypes.c_long]
    lib.SSL_CTX_set_timeout.restype = ctypes.c_long
    return lib


def _alpn_or_alert(ctx: ssl.SSLContext, protocol: bytes) -> None:
    """Select `protocol` when the client offers it; otherwise fail the handshake with a
    no_application_protocol alert. A client that offers no ALPN at all is not asked about."""

    @_SELECT
    def select(_ssl, out, outlen, offered, offered_len, _arg) -> int:
        wire = ctypes.string_at(offered, offered_len)
        pos = 0
        while pos < len(wire):
            n = wire[pos]
            if wire[pos + 1 : pos + 1 + n] == protocol:
                out[0] = offered + pos + 1  # OpenSSL copies it from the client's own list
                outlen[0] = n
                return _TLSEXT_ERR_OK
            pos += 1 + n
        return _TLSEXT_ERR_ALERT_FATAL

    if (ssl_ctx := _ssl_ctx(ctx)) is None:  # then Python's own callback stays (no alert, a close)
        log.warning("ssl.SSLContext is not laid out as CPython's: no no_application_protocol alert")
        return
    _libssl().SSL_CTX_set_alpn_select_cb(ssl_ctx, select, None)
    ctx._konbini_alpn_select = select  # noqa: SLF001  # the callback lives as long as the context
