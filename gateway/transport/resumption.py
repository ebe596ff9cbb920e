"""TLS session resumption on the dialling side of a hop: per client context and server name, the
newest resumable session, offered on the next connection to that server (docs/tls.md).

A TLS 1.3 ticket arrives after the handshake, with the server's first records, so a connection is
remembered when it opens and its session is read when the next connection to the server needs one.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable
from typing import Protocol
from weakref import WeakKeyDictionary


class HasSession(Protocol):
    """An ssl.SSLObject, or a trio.SSLStream (which forwards `session` to its SSLObject)."""

    session: ssl.SSLSession | None


class SessionCache:
    """The sessions of one client context (one client identity), by the server name dialled."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._latest: dict[str, HasSession] = {}  # the newest connection, its ticket perhaps not yet read
        self._sessions: dict[str, ssl.SSLSession] = {}

    def remember(self, server_name: str, connection: HasSession) -> None:
        """A connection to `server_name` finished its handshake; its ticket may come later."""
        self._latest[server_name] = connection

    def offer(self, server_name: str) -> ssl.SSLSession | None:
        """The session to offer `server_name` next: the newest with a ticket, unless expired."""
        if (connection := self._latest.get(server_name)) is not None:
            session = connection.session
            if session is not None and session.has_ticket:
                self._sessions[server_name] = session
                del self._latest[server_name]  # its ticket is read: the connection need not be kept
        session = self._sessions.get(server_name)
        if session is not None and self._clock() >= session.time + _lifetime(session):
            del self._sessions[server_name]  # the server would refuse it: a full handshake, as if none
            return None
        return session


def _lifetime(session: ssl.SSLSession) -> int:
    """Seconds from its start the server takes a session back: the ticket's lifetime hint (the
    server's TICKET_LIFETIME), within our own session timeout."""
    return min(session.timeout, session.ticket_lifetime_hint or session.timeout)


_caches: WeakKeyDictionary[ssl.SSLContext, SessionCache] = WeakKeyDictionary()


def sessions_of(ctx: ssl.SSLContext) -> SessionCache:
    """The cache of client context `ctx`: a session belongs to the context that made it (Python
    refuses it on any other), and a context is one client identity."""
    if (cache := _caches.get(ctx)) is None:
        cache = _caches[ctx] = SessionCache()
    return cache


class OfferingContext:
    """`ctx`, whose next `wrap_bio` offers `session`: for asyncio's create_connection, which
    takes a context but no session, and makes its SSLObject with `wrap_bio`."""

    def __init__(self, ctx: ssl.SSLContext, session: ssl.SSLSession | None) -> None:
        self._ctx = ctx
        self._session = session

    def wrap_bio(self, incoming, outgoing, server_side=False, server_hostname=None, session=None) -> ssl.SSLObject:
        return self._ctx.wrap_bio(incoming, outgoing, server_side, server_hostname, session=session or self._session)

    def __getattr__(self, name: str):
        return getattr(self._ctx, name)
