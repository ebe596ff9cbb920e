"""Entering a network namespace from the calling thread: a syscall, no subprocess, so both the
netns launcher's forked node hosts and the load generator's worker processes can use it."""

from __future__ import annotations

import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)
_CLONE_NEWNET = 0x40000000


def enter_namespace(namespace: str) -> None:
    """Move the calling thread (a fresh child, before it opens any socket) into /run/netns/NAMESPACE.
    ctypes rather than os.setns: that needs Python 3.12."""
    fd = os.open(f"/run/netns/{namespace}", os.O_RDONLY)
    try:
        if _libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {namespace}: {os.strerror(err)}")
    finally:
        os.close(fd)
