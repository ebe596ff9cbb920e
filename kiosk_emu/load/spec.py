"""What to run: the workload, the kiosks and everything a worker process needs (picklable)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Workload:
    """One scenario as the generator sees it."""

    name: str
    kind: str  # "relay": GET /bench/blob?size=N | "issuance": the full card-authenticated flow
    size: int = 0
    # issuance: share of each case; the rest are plain successful issuances
    # ("pin-wrong" | "outside-hours" | "card-revoked" | "timeout" | "smartphone", share); "smartphone": the
    # resident holds a smartphone credential (seed 002) up to the kiosk instead of the card
    mix: tuple[tuple[str, float], ...] = ()
    short_timeout_ms: tuple[float, float] = (2.0, 40.0)  # "timeout" case: kiosk timeout drawn from this range
    timeout_s: float = 15.0  # every request's kiosk timeout otherwise
    streams_per_kiosk: int = 64  # relay: concurrent streams per kiosk connection; issuance: 1 customer per kiosk


EXPECTED = {
    "ok": {"ok"},
    "pin-wrong": {"refused:pin-wrong"},
    "outside-hours": {"refused:outside-hours"},
    "card-revoked": {"refused:card-revoked"},
    "timeout": {"ok", "cancelled:timeout"},
    "smartphone": {"ok"},
}


@dataclass(frozen=True)
class KioskSpec:
    id: str
    address: str
    router_id: str
    router_address: str
    router_port: int
    card: str  # card id in the state dir's card store ("" in fleet mode: the resident brings one)
    namespace: str | None = None  # netns mode: the kiosk's network namespace (its worker enters it)
    group: str = ""  # fleet mode: what the results are broken down by (the store's operator)


@dataclass
class LoadSpec:
    """Everything a worker needs (picklable: it crosses a process boundary)."""

    workload: Workload
    state_dir: str
    kiosks: list[KioskSpec]
    ca_path: str
    rate: float | None = None  # open loop: arrivals per second (all workers together)
    concurrency: int | None = None  # closed loop: requests in flight (all workers together)
    duration_s: float = 10.0
    warmup_s: float = 2.0
    count: int | None = None  # stop after this many measured arrivals (all workers together)
    late_s: float = 0.2
    seed: int = 1
    open_muni: str = ""
    closed_muni: str = ""
    revoked_card: str = ""
    smartphone: str = ""  # the credential id of the "smartphone" case (the runner makes it)
    cert_type: str = "residence-record"
    hop_kinds: dict[str, str] = field(default_factory=dict)  # server-timing name -> hop label
    clock_start: str | None = None  # emulated time the kiosks print on notices (ISO 8601)
    # keep every measured request as (start s, end s, outcome, those of these node ids its
    # server-timing names), times from the end of warm-up (the failover bench reads who served when)
    trace: tuple[str, ...] | None = None
    # Fleet mode (`konbini bench national-peak`): `kiosks` is every kiosk of the country; each
    # arrival goes to one drawn at random that has no customer, which dials its store router at
    # its first customer (its TLS context made then) and keeps the connection while it is among
    # the `max_open` most recently used; the resident brings a card from `cards` and asks for a
    # certificate of a municipality drawn from `munis`.
    centers: tuple[str, ...] = ("issuance-center",)  # whose signature on a document's binding is accepted
    fleet: bool = False
    cards: tuple[str, ...] = ()
    munis: tuple[str, ...] = ()
    max_open: int = 2000  # per worker
    # open loop with a rate that changes: (seconds, arrivals per second) after the warm-up (at the
    # first one's rate); their seconds add up to duration_s
    segments: tuple[tuple[float, float], ...] = ()
