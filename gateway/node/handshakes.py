"""TLS handshakes this process's servers completed, by node kind, full or resumed.

A process-wide tally beside each node's own `konbini_tls_handshakes` / `konbini_tls_resumed`:
a bench wants the totals of a phase, and scraping every node's port to get them would mean the
national file's 55,000 store routers. SIGUSR1 writes the tally to a file (`dump_on_signal`), so a
bench on another process reads it at the start and the end of its measured window.
"""

from __future__ import annotations

import json
import os
import signal
from collections import Counter
from pathlib import Path

TALLY: Counter[tuple[str, str]] = Counter()  # (node kind, "full" | "resumed") -> handshakes
SIGNAL = signal.SIGUSR1


def count(kind: str, resumed: bool) -> None:
    """A server handshake of a node of `kind` finished (result ok)."""
    TALLY[kind, "resumed" if resumed else "full"] += 1


def snapshot() -> dict[str, dict[str, int]]:
    """Kind -> {"full": n, "resumed": n}."""
    out: dict[str, dict[str, int]] = {}
    for (kind, how), n in TALLY.items():
        out.setdefault(kind, {"full": 0, "resumed": 0})[how] = n
    return out


def tally_path(state_dir: Path, pid: int) -> Path:
    return Path(state_dir) / "processes" / f"handshakes-{pid}.json"


def write(path: Path) -> None:
    """The tally as JSON, replaced at once (a reader never sees half a file); nothing where the
    state is read-only (a cluster pod's): no bench reads it there."""
    tmp = path.with_suffix(".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(snapshot()))
        os.replace(tmp, path)
    except OSError:
        pass


def dump_on_signal(path: Path) -> None:
    """Write the tally to `path` whenever this process gets SIGUSR1 (in the main thread, between
    two bytecodes of the event loop: the tally is never half-counted)."""
    signal.signal(SIGNAL, lambda signum, frame: write(path))
