"""One task accepts for every listening socket of a node process.

A national file gives a process some 18,000 listeners, most of them never dialled in a run. A Trio
task per listener (its coroutine, its registration in Trio's epoll, a nursery for its connections)
was most of a node process's start. Here the listening sockets are registered in an epoll set of
their own, and one task waits for that set to become readable (an epoll descriptor is itself
pollable), then accepts on each socket that is ready and hands the connection to that socket's
handler in the process's nursery. Adding a listener is one `epoll_ctl`, nothing awaited.

As `trio.serve_listeners`, accept() finding no descriptor or memory free (EMFILE, ENFILE, ENOMEM,
ENOBUFS) is logged and retried after 100 ms, so a flood slows the process down instead of
cancelling its nodes; here the pause holds every listener of the process, which share the one
descriptor table anyway.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
from collections.abc import Awaitable, Callable

import trio

log = logging.getLogger("konbini.node")

ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_BACKOFF = 0.1  # seconds, as trio.serve_listeners

Handler = Callable[[trio.SocketStream], Awaitable[None]]


class Acceptor:
    """The listening sockets of a process, each with the handler its connections go to."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._listeners: dict[int, tuple[socket.socket, Handler]] = {}  # by descriptor

    def __len__(self) -> int:
        return len(self._listeners)

    def add(self, sock: socket.socket, handler: Handler) -> None:
        """Accept on `sock` (listening, non-blocking) from now on; it is closed when `run` ends."""
        self._epoll.register(sock.fileno(), select.EPOLLIN)  # level-triggered: a backlog is seen again
        self._listeners[sock.fileno()] = (sock, handler)

    async def run(self, nursery: trio.Nursery) -> None:
        """Accept for ever, each connection to its socket's handler in `nursery`; every socket and
        the epoll set are closed when the task ends (a cancel)."""
        try:
            while True:
                await trio.lowlevel.wait_readable(self._epoll.fileno())
                for fd, _ in self._epoll.poll(0):
                    sock, handler = self._listeners[fd]
                    try:
                        conn, _ = sock.accept()
                    except BlockingIOError:
                        continue  # the peer gave up between the wakeup and accept()
                    except OSError as exc:
                        if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                            raise
                        log.error(
                            "accept returned %s (%s); retrying in %s s",
                            errno.errorcode[exc.errno],
                            os.strerror(exc.errno),
                            ACCEPT_BACKOFF,
                        )
                        await trio.sleep(ACCEPT_BACKOFF)
                        break  # the others are still ready at the next wait (level-triggered)
                    nursery.start_soon(handler, trio.SocketStream(trio.socket.from_stdlib_socket(conn)))
        finally:
            trio.lowlevel.notify_closing(self._epoll.fileno())  # Trio's own epoll still holds it
            self.close()

    def close(self) -> None:
        """Close every socket and the epoll set (a launch that fails before `run` calls it)."""
        for sock, _ in self._listeners.values():
            sock.close()
        self._listeners.clear()
        self._epoll.close()
