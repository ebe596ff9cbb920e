"""Availability (BIZ-9, seed 003): pure arithmetic over outage intervals.

The month counts as 43,200 minutes whatever its length; downtime counts only complete outages
longer than 10 minutes; the target is >= 99.9 %. Overlapping outages are merged first; an
outage that spans a month boundary qualifies on its whole length and counts in each month only
the minutes inside it. A complete outage of the service is a time when every monitored scope
(e.g. every kiosk's connection, or the center itself) is down at once: `complete_outages`.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from gateway.business.clock import JST
from gateway.business.settlement import month_end, parse_month

MONTH_MINUTES = 43_200
MIN_OUTAGE = timedelta(minutes=10)
TARGET = 0.999

Interval = tuple[datetime, datetime]


def merge(intervals: Iterable[Interval]) -> list[Interval]:
    out: list[Interval] = []
    for start, end in sorted(i for i in intervals if i[1] > i[0]):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def intersect(a: list[Interval], b: list[Interval]) -> list[Interval]:
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if start < end:
            out.append((start, end))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def complete_outages(per_scope: dict[str, Iterable[Interval]], scopes: Iterable[str]) -> list[Interval]:
    """Times when every scope in `scopes` was down together, plus every "service" outage."""
    scopes = list(scopes)
    together: list[Interval] | None = None
    for scope in scopes:
        mine = merge(per_scope.get(scope, ()))
        together = mine if together is None else intersect(together, mine)
    return merge((together or []) + list(per_scope.get("service", ())))


def availability(month: str, outages: Iterable[Interval]) -> dict[str, Any]:
    y, m = parse_month(month)
    start, end = datetime(y, m, 1, tzinfo=JST), month_end(month)
    counted, ignored = [], 0
    minutes = 0.0
    for o_start, o_end in merge(outages):
        clipped = (max(o_start, start), min(o_end, end))
        if clipped[0] >= clipped[1]:
            continue
        if o_end - o_start <= MIN_OUTAGE:
            ignored += 1
            continue
        m_ = (clipped[1] - clipped[0]).total_seconds() / 60
        minutes += m_
        counted.append({"start": clipped[0].isoformat(), "end": clipped[1].isoformat(), "minutes": round(m_, 3)})
    avail = max(0.0, 1 - minutes / MONTH_MINUTES)
    return {
        "month": month,
        "month_minutes": MONTH_MINUTES,
        "downtime_minutes": round(minutes, 3),
        "availability": avail,
        "availability_percent": round(avail * 100, 4),
        "target_percent": TARGET * 100,
        "met": minutes * 1000 <= MONTH_MINUTES * round((1 - TARGET) * 1000, 9),  # exact at 43.2 minutes
        "outages_counted": counted,
        "outages_ignored_short": ignored,
    }
