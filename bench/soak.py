"""The soak's evidence: node processes' RSS and descriptors sampled over a phase, and the ledger's
issuances left unfinished when it ends."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

from bench.processes import proc_stats
from gateway.business.ledger import UNFINISHED
from gateway.business.session import DELIVERY_TIMEOUT, NOTICE_TTL

SOAK_RSS_GROWTH_PCT = 5.0  # the soak passes when no node process grows more over the last 80 %
SOAK_FD_SLACK = 2  # descriptors a node process may gain over the last 80 % and still count as flat


class ProcessSampler:
    """RSS and open descriptors of named processes, sampled on a thread every `interval` seconds
    while a soak phase runs (a thread: the bench's main thread waits on the load workers)."""

    def __init__(self, pids: dict[str, int], interval: float) -> None:
        self.pids = pids
        self.interval = interval
        self.samples: dict[str, list[tuple[float, float, int]]] = {name: [] for name in pids}  # (s, RSS MiB, fds)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-sampler", daemon=True)

    def __enter__(self) -> ProcessSampler:
        self._t0 = time.monotonic()
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()  # one last point at the very end

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        t = round(time.monotonic() - self._t0, 2)
        for name, pid in self.pids.items():
            stats = proc_stats(pid)
            try:
                fds = len(os.listdir(f"/proc/{pid}/fd"))
            except OSError:
                continue  # the process is gone; the summary says so by its missing tail
            self.samples[name].append((t, stats.get("rss_mib", 0.0), fds))

    def summary(self, result: dict, issuances: dict | None = None) -> dict:
        """Per process: RSS and descriptors at the 20 % and the 90 % mark of the run; the ledger's
        issuances left unfinished (`unfinished_issuances`); the verdict."""
        procs = {}
        for name, series in self.samples.items():
            if len(series) < 2:
                procs[name] = {"samples": len(series), "ok": False, "why": "fewer than 2 samples"}
                continue
            span = series[-1][0]
            mark = next(p for p in series if p[0] >= 0.2 * span)
            # the verdict's end is the 90 % mark: the last samples see the load winding down
            end = [p for p in series if p[0] <= 0.9 * span][-1]
            growth = (end[1] - mark[1]) / mark[1] * 100 if mark[1] else 0.0
            tail_fds = [p[2] for p in series if mark[0] <= p[0] <= end[0]]
            procs[name] = {
                "samples": len(series),
                "rss_mib_at_20pct": mark[1],
                "rss_mib_at_90pct": end[1],
                "rss_growth_pct": round(growth, 2),
                "fds_at_20pct": mark[2],
                "fds_at_90pct": end[2],
                "fds_min": min(tail_fds),
                "fds_max": max(tail_fds),
                "ok": growth < SOAK_RSS_GROWTH_PCT and end[2] - mark[2] <= SOAK_FD_SLACK,
                "series": [{"s": t, "rss_mib": r, "fds": f} for t, r, f in series],
            }
        errors = sum((result.get("errors") or {}).values())
        return {
            "rss_growth_limit_pct": SOAK_RSS_GROWTH_PCT,
            "fd_slack": SOAK_FD_SLACK,
            "interval_s": self.interval,
            "processes": procs,
            "errors": errors,
            "misdelivered": result.get("misdelivered", 0),
            "issuances": issuances,
            "ok": bool(procs)
            and all(p["ok"] for p in procs.values())
            and errors == 0
            and result.get("misdelivered", 0) == 0
            and (issuances is None or issuances["past_bound"] == 0),
        }


def unfinished_issuances(path: str) -> dict | None:
    """The ledger's issuances in each state when a soak ends, and how many of those not in a final
    state (created: streaming, sent: awaiting the notice) are past their bound, counted back from
    the ledger's latest change: the center must have ended those (cancelled or expired). Read only;
    None without a ledger file (":memory:")."""
    if not Path(path).exists():
        return None
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        states = dict(conn.execute("SELECT state, count(*) FROM issuances GROUP BY state").fetchall())
        (latest,) = conn.execute("SELECT max(changed) FROM issuances").fetchone()
        past = 0
        if latest is not None:
            now = datetime.fromisoformat(latest)
            past = conn.execute(
                "SELECT count(*) FROM issuances WHERE (state = 'created' AND changed < ?) OR (state = 'sent' AND changed < ?)",
                (
                    (now - timedelta(seconds=DELIVERY_TIMEOUT)).isoformat(),
                    (now - timedelta(seconds=NOTICE_TTL)).isoformat(),
                ),
            ).fetchone()[0]
    finally:
        conn.close()
    return {
        "states": states,
        "unfinished": sum(states.get(s, 0) for s in UNFINISHED),
        "past_bound": past,
        "bounds_s": {"created": DELIVERY_TIMEOUT, "sent": NOTICE_TTL},
    }
