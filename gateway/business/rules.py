"""Business rules of one issuance request (BIZ-1..3), pure: a time, the topology's data, an answer.

Checked in the order a resident meets them: the municipality exists and takes part (on that
date), the service is open (year-end closure of the general service, then the center's hours
narrowed by the municipality's), then the certificate type and the number of copies.
"""

from __future__ import annotations

from datetime import date, datetime, time, timedelta

from gateway.business.clock import JST
from gateway.business.refusal import Refusal
from gateway.business.settlement import year_end_closure
from topology.spec.model import Hours, Municipality

MAX_COPIES = 10
VACCINATION = "vaccination"
# The vaccination certificate service runs every day (000 §14); the general service closes Dec 29 - Jan 3.
CLOSURE_EXEMPT = frozenset({VACCINATION})

Refused = tuple[Refusal, dict[str, str]]  # why, and the fields of its message
# refusals that a later hour or day may lift
TIMELY = frozenset({Refusal.OUTSIDE_HOURS, Refusal.MUNICIPALITY_NOT_PARTICIPATING})


def participates(muni: Municipality, day: date) -> bool:
    if not muni.participating:
        return False
    if muni.participating_from and day < date.fromisoformat(muni.participating_from):
        return False
    if muni.participating_until and day > date.fromisoformat(muni.participating_until):
        return False
    return True


def window(service: Hours, muni: Hours) -> tuple[str, str]:
    """The hours a municipality's certificates can be issued: the center's, narrowed by its own."""
    return max(service.open, muni.open), min(service.close, muni.close)


def within(now: datetime, open_: str, close: str) -> bool:
    hm = f"{now.hour:02d}:{now.minute:02d}"
    return open_ <= hm < close


def refusal(now: datetime, service: Hours, muni: Municipality | None, cert_type: str, copies: int) -> Refused | None:
    """None when the request may go ahead at `now`, else (reason, message fields)."""
    now = now.astimezone(JST)
    if muni is None:
        return Refusal.MUNICIPALITY_UNKNOWN, {}
    named = {"municipality": muni.name or "Your municipality"}  # the kiosk screen names it where the file does
    if not participates(muni, now.date()):
        return Refusal.MUNICIPALITY_NOT_PARTICIPATING, named
    open_, close = window(service, muni.hours)
    if cert_type not in CLOSURE_EXEMPT and year_end_closure(now.date()):
        return Refusal.OUTSIDE_HOURS, {"hours": "closed Dec 29 - Jan 3"}
    if not within(now, open_, close):
        return Refusal.OUTSIDE_HOURS, {"hours": f"{open_}–{close}"}
    if cert_type not in muni.certificates:
        return Refusal.CERTIFICATE_TYPE_NOT_OFFERED, named
    if not 1 <= copies <= MAX_COPIES:
        return Refusal.COPIES_OUT_OF_RANGE, {"max_copies": str(MAX_COPIES)}
    return None


def next_open(now: datetime, service: Hours, muni: Municipality, cert_type: str, days: int = 14) -> datetime | None:
    """The first day's 10:00 Japan time (the window's opening if later) after `now` at which the
    hours let this request go; None when none of the next `days` does (a closed municipality)."""
    now = now.astimezone(JST)
    opening = max(time(10), time.fromisoformat(window(service, muni.hours)[0]))
    for day in range(days + 1):
        at = datetime.combine(now.date() + timedelta(days=day), opening, JST)
        if at <= now:
            continue
        refused = refusal(at, service, muni, cert_type, 1)
        if refused is None or refused[0] not in TIMELY:
            return at
    return None


def fee(muni: Municipality, cert_type: str, copies: int) -> int:
    """What the resident pays: the municipality's per-copy fee times the copies (BIZ-3)."""
    return muni.certificates[cert_type] * copies
