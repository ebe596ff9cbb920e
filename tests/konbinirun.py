"""`konbini` as a user runs it, for the tests that start a whole topology: `konbini up` until it
says it is ready (its own "ready in" line, not a sleep), then Ctrl-C and, for a tagged netns run,
`konbini down`, whatever happened in between."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

KONBINI = [sys.executable, "-m", "topology.cli"]
REPO = Path(__file__).resolve().parent.parent


def konbini(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*KONBINI, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)


def start_up(*args: str) -> tuple[subprocess.Popen, list[str]]:
    """`konbini up ARGS` once it is ready: the process and the lines it printed until then. One
    that ends first fails the test with what it printed."""
    proc = subprocess.Popen(
        [*KONBINI, "up", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO
    )
    seen: list[str] = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("ready in"):
            return proc, seen
    raise AssertionError(f"konbini up {' '.join(args)} ended before ready (exit {proc.wait()}):\n" + "".join(seen))


def stop_up(proc: subprocess.Popen, timeout: float = 30) -> None:
    """Ctrl-C, as a user stops it; killed if it does not end within `timeout`."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def running_up(*args: str, tag: str | None = None, state: str | Path | None = None) -> Iterator[list[str]]:
    """`konbini up ARGS` while the block runs: yields the lines it printed until ready. Afterwards
    Ctrl-C, and with a `tag`, `konbini down --tag TAG --state STATE` (a failed start too)."""
    proc = None
    try:
        proc, seen = start_up(*args)
        yield seen
    finally:
        if proc is not None:
            stop_up(proc)
        if tag is not None:
            konbini("down", "--tag", tag, "--state", str(state), timeout=60)
