"""How a conversation with a peer fails, as one family: `LinkError`.

Callers above the drivers catch `LinkError` (or one of its kinds) and nothing else: the drivers
(`gateway.protocol.h2trio`, `kiosk_emu.load.h2asyncio`) and dialing map what the OS, `ssl` and
trio raise about a transport into `LinkDown` at their boundary (`link_errors`), as httpcore maps
its backends' exceptions, so no caller spells out a tuple of socket and TLS exceptions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import trio


class LinkError(Exception):
    """The peer cannot be talked to any more on this link: its transport failed, the HTTP/2
    connection ended, or the stream was reset."""


class LinkDown(LinkError, ConnectionError):
    """The transport under a connection failed or refused us: TCP (refused, reset, unreachable)
    or TLS (a handshake the peer or we rejected, a broken record). The original is `__cause__`.
    A ConnectionError too, so a caller written against the OS's errors still catches it."""


class ConnectionClosed(LinkError):
    """The HTTP/2 connection is gone (peer GOAWAY, protocol error or EOF)."""


class StreamReset(LinkError):
    """The peer reset the stream (or the connection died) before it finished."""

    def __init__(self, stream_id: int, code: int | None) -> None:
        super().__init__(f"stream {stream_id} reset (code {code})")
        self.code = code


class Violation(Exception):
    """The peer broke a rule of the protocol: the core closes the connection with GOAWAY `code`
    and counts `reason` (a node's denial reason) before it raises ConnectionClosed. Only the
    cores raise and catch it."""

    def __init__(self, code: int, what: str, reason: str = "protocol-error") -> None:
        super().__init__(what)
        self.code = code
        self.reason = reason


# What a transport raises when it fails (ssl.SSLError and ConnectionError are OSErrors; trio wraps
# a failed TLS stream in BrokenResourceError and refuses a closed one with ClosedResourceError).
TRANSPORT_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)


@contextlib.contextmanager
def link_errors() -> Iterator[None]:
    """Raise a transport's failure inside the block as `LinkDown` (the original as its cause: for a
    TLS stream trio broke, the TLS error it broke on, such as a certificate that names another
    node); a TimeoutError (an OSError too) stays itself: it is the caller's deadline, not the link's."""
    try:
        yield
    except TimeoutError:
        raise
    except TRANSPORT_ERRORS as exc:
        cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) and exc.__cause__ is not None else exc
        raise LinkDown(f"{type(cause).__name__}: {cause}") from cause
