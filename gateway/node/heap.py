"""A node process gives the heap it freed back to the system, every TRIM_EVERY seconds.

A relay's reads and writes take buffers of up to 256 KiB for an instant (h2trio's READ_SIZE and
WRITE_SIZE, TLS records joined for one write). glibc serves the first from mmap, but the first
free raises its mmap threshold to that size, so every later one comes from the heap, and the
pages they leave free between long-lived objects stay in the process: a relay's RSS crept up in
the soak bench while the bytes in use stayed flat (docs/performance.md). A trim is one pass over
the free chunks, nothing per request. Not glibc (musl, macOS): there is no `malloc_trim`, and nothing is done.
"""

from __future__ import annotations

import ctypes

import trio

TRIM_EVERY = 10.0  # seconds; what a relay frees in that time is well under 1 MiB


def _malloc_trim():
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the process's own C library
    except (AttributeError, OSError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_TRIM = _malloc_trim()


def give_back() -> bool:
    """Return the free pages of every malloc arena to the system now; whether any went back."""
    return _TRIM is not None and bool(_TRIM(0))


async def give_back_forever() -> None:
    """For as long as the node process serves: `give_back` every TRIM_EVERY seconds."""
    if _TRIM is None:
        return
    while True:
        await trio.sleep(TRIM_EVERY)
        give_back()
