"""Entering a network namespace from the calling thread: a syscall, no subprocess, so both the
netns launcher's forked node hosts and the load generator's worker processes can use it."""

from __future__ import annotations

import contextlib
import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)
_CLONE_NEWNET = 0x40000000


def enter_namespace(namespace: str) -> None:
    """Move the calling thread (a fresh child, before it opens any socket) into /run/netns/NAMESPACE.
    ctypes rather than os.setns: that needs Python 3.12."""
    fd = os.open(f"/run/netns/{namespace}", os.O_RDONLY)
    try:
        _setns(fd, namespace)
    finally:
        os.close(fd)


def _setns(fd: int, what: str) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns {what}: {os.strerror(err)}")


@contextlib.contextmanager
def in_namespace(namespace: str | None):
    """Sockets made inside this block are made in /run/netns/NAMESPACE; the calling thread goes back
    to its own namespace on leaving. A socket keeps the namespace it was made in for good, so one
    process can serve the nodes of many namespaces (`up --netns` on a large part). Nothing is
    awaited inside: another task of the thread would make its sockets there too. None: stay."""
    if namespace is None:
        yield
        return
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        there = os.open(f"/run/netns/{namespace}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(there, namespace)
        finally:
            os.close(there)
        try:
            yield
        finally:
            _setns(home, "back")
    finally:
        os.close(home)


def in_namespace_argv(namespace: str) -> list[str]:
    """The argv prefix that runs a command in /run/netns/NAMESPACE: the network namespace only.
    `ip netns exec` also makes a mount namespace and mounts sysfs again, which ip, nft, iptables
    and /proc/sys/net do not need (no faster for it, docs/performance.md; it is the smaller tool)."""
    return ["nsenter", f"--net=/run/netns/{namespace}"]
