"""The kiosk load generator: many kiosks over worker processes, open or closed loop, HDR histograms.

Theory of operation. Each worker process runs one uvloop loop and owns a share of the kiosks;
every kiosk keeps one persistent HTTP/2 connection to its store router (`kiosk_emu.load.h2asyncio`).
- Open loop: arrivals follow a Poisson process at the worker's share of the rate. Latency is
  measured from the *intended* start, so a stalled system or a late generator shows up as
  latency instead of silently lowering the offered load (no coordinated omission). An arrival
  that finds no free kiosk slot, or that the generator can only start more than `late_s` after
  its intended time, is counted as `dropped`.
- Closed loop: a fixed number of requests in flight; each starts when the previous one ended.
Requests whose intended start falls in the warm-up are run but not recorded. Each worker sends
encoded histograms (overall, per hop from `server-timing`, per second) and its CPU use back;
`merge_results` adds them up. The issuance workload runs the Trio kiosk's own driver
(`kiosk_emu.driver.FlowDriver`, same requests, same order) with devices that print nothing, so
a document bound to anyone else is counted as misdelivered (must stay 0).
Workers are spawned, not forked: each imports this module afresh, and in netns mode enters its
namespace before it opens a socket or starts a thread, so nothing imported here may do either.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing as mp
import queue as queue_mod
import random
import resource
import signal
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from cryptography import x509
from hdrh.histogram import HdrHistogram

from gateway.business.clock import JST
from gateway.protocol.errors import LinkDown, LinkError, StreamReset
from gateway.protocol.http import request_headers
from gateway.protocol.messages import IssueRequest
from gateway.transport.tls import client_context
from kiosk_emu import latency
from kiosk_emu.card import DEFAULT_PIN, CardStore
from kiosk_emu.driver import FlowDriver, SpoolWriter, exchange
from kiosk_emu.flow import KioskFlow, State, Status
from kiosk_emu.latency import add_server_timing
from kiosk_emu.load.h2asyncio import AsyncioH2, connect_h2
from topology.netns.enter import enter_namespace
from topology.pkifiles import PKIFiles

LOWEST_US = 1
HIGHEST_US = 120_000_000  # 120 s
SATURATED = 0.9  # a worker busier than this (CPU time / wall time) may be what limits the run

# -- histograms --------------------------------------------------------------------------------


def new_histogram(digits: int = 3) -> HdrHistogram:
    return HdrHistogram(LOWEST_US, HIGHEST_US, digits)


def record_ms(hist: HdrHistogram, ms: float) -> None:
    hist.record_value(min(max(int(ms * 1000), LOWEST_US), HIGHEST_US))


def encode(hist: HdrHistogram) -> str:
    return hist.encode().decode("ascii") if hist.get_total_count() else ""


def merge(encoded: list[str], digits: int = 3) -> HdrHistogram:
    """One histogram from many workers' encoded ones (empty strings are empty histograms)."""
    out = new_histogram(digits)
    for e in encoded:
        if e:
            out.add(HdrHistogram.decode(e.encode("ascii")))
    return out


def percentiles(hist: HdrHistogram) -> dict[str, float | int | None]:
    """p50/p90/p99/p99.9/max/mean in ms (None when nothing was recorded)."""
    n = hist.get_total_count()
    if not n:
        return {
            "count": 0,
            "p50_ms": None,
            "p90_ms": None,
            "p99_ms": None,
            "p999_ms": None,
            "max_ms": None,
            "mean_ms": None,
        }
    at = hist.get_value_at_percentile
    return {
        "count": n,
        "p50_ms": at(50) / 1000,
        "p90_ms": at(90) / 1000,
        "p99_ms": at(99) / 1000,
        "p999_ms": at(99.9) / 1000,
        "max_ms": hist.get_max_value() / 1000,
        "mean_ms": round(hist.get_mean_value() / 1000, 3),
    }


# -- arrivals ----------------------------------------------------------------------------------


def poisson_arrivals(rate: float, start: float, end: float, rng: random.Random) -> Iterator[float]:
    """Intended start times of a Poisson process of `rate` per second in [start, end)."""
    if rate <= 0:
        raise ValueError("rate must be > 0")
    t = start
    while True:
        t += rng.expovariate(rate)
        if t >= end:
            return
        yield t


def piecewise_arrivals(segments: list[tuple[float, float]], start: float, rng: random.Random) -> Iterator[float]:
    """Intended start times of a Poisson process whose rate is `rate` for `seconds`, segment by
    segment, from `start` (a segment of rate 0 has no arrivals)."""
    t0 = start
    for seconds, rate in segments:
        end = t0 + seconds
        if rate > 0:
            yield from poisson_arrivals(rate, t0, end, rng)
        t0 = end


def latency_ms(intended: float, done: float) -> float:
    """Latency as the user sees it: from when the request *should* have started (open loop)."""
    return (done - intended) * 1000


# -- what to run -------------------------------------------------------------------------------


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


# -- one worker ----------------------------------------------------------------------------------


class _Stats:
    def __init__(self, hop_kinds: dict[str, str]) -> None:
        self.hop_kinds = hop_kinds
        self.arrivals = 0
        self.dropped = 0
        self.outcomes: Counter[str] = Counter()
        self.bytes = 0
        self.latency = new_histogram()
        self.hops: dict[str, HdrHistogram] = {}
        self.timeline: dict[int, HdrHistogram] = {}
        self.done = 0  # progress (measured or not)
        self.split: dict[str, float] = {}  # latency part -> ms summed over the measured requests
        self.split_n = 0
        self.split_total_ms = 0.0
        self.groups: dict[str, tuple[Counter[str], HdrHistogram]] = {}  # fleet mode: per operator
        self.credentials: dict[str, tuple[Counter[str], HdrHistogram]] = {}  # issuance: card or smartphone
        self.connects = 0  # fleet mode: kiosks that dialled their store router during the run
        self.misdelivery: Counter[str] = Counter()  # the kiosk's reason for each rejected document

    def record(
        self,
        second: int,
        ms: float,
        outcome: str,
        nbytes: int,
        hops: dict[str, float],
        split: dict[str, float],
        group: str = "",
        credential: str = "",
    ) -> None:
        self.outcomes[outcome] += 1
        for breakdown, key in ((self.groups, group), (self.credentials, credential)):
            if key:
                counts, hist = breakdown.get(key) or breakdown.setdefault(key, (Counter(), new_histogram()))
                counts[outcome] += 1
                if not outcome.startswith("error:"):
                    record_ms(hist, ms)
        self.bytes += nbytes
        if outcome.startswith("error:"):
            return
        if split:
            self.split_n += 1
            self.split_total_ms += ms
            for part, part_ms in split.items():
                self.split[part] = self.split.get(part, 0.0) + part_ms
        record_ms(self.latency, ms)
        t = self.timeline.get(second)
        if t is None:
            t = self.timeline[second] = new_histogram(2)
        record_ms(t, ms)
        for name, hop_ms in hops.items():
            label = self.hop_kinds.get(name, name)
            h = self.hops.get(label)
            if h is None:
                h = self.hops[label] = new_histogram()
            record_ms(h, hop_ms)


class _Kiosk:
    """One emulated kiosk: its persistent connection (reopened if it dies) and its card."""

    def __init__(self, spec: KioskSpec, ctx, card, center_key) -> None:
        self.spec = spec
        self.ctx = ctx
        self.card = card
        self.center_key = center_key
        self.conn: AsyncioH2 | None = None
        self._lock = asyncio.Lock()
        self.make_ctx = None  # fleet mode: KioskSpec -> its client context

    async def connection(self, stats: _Stats | None = None) -> AsyncioH2:
        if self.conn is not None and not self.conn.core.closed:
            return self.conn
        async with self._lock:
            if self.conn is None or self.conn.core.closed:
                s = self.spec
                if self.ctx is None:  # fleet mode: made at the kiosk's first customer
                    self.ctx = self.make_ctx(s)
                self.conn = await connect_h2(
                    s.router_address, s.router_port, s.router_id, self.ctx, local_address=s.address
                )
                if stats is not None:
                    stats.connects += 1
            return self.conn

    def hang_up(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


async def _relay_request(
    k: _Kiosk, w: Workload, hops: dict[str, float], split: dict[str, float], kinds: dict[str, str]
) -> tuple[str, int]:
    conn = await k.connection()
    t0 = time.perf_counter()
    st = await conn.open_stream(request_headers("GET", f"/bench/blob?size={w.size}", k.spec.router_id), end_stream=True)
    try:
        headers = await st.receive_headers()
        t1 = time.perf_counter()
        add_server_timing(headers, hops)
        n = await st.drain_body()
        latency.split((t1 - t0) * 1000, (time.perf_counter() - t0) * 1000, headers, kinds, split)
        status = st.status
        if status != 200:
            reason = dict(headers).get(b"konbini-reason", f"http-{status}".encode()).decode()
            return f"error:{reason}", n
        return "ok", n
    except StreamReset:
        return "error:stream-reset", 0
    finally:
        conn.release(st)


def _discard(chunk: bytes) -> None:
    pass


class _Paperless:
    """The load generator's kiosk devices (`kiosk_emu.driver.KioskDevices`): nothing is spooled
    or printed, no fee is taken, and there is no outbox, so the notice is sent once, answered or not."""

    def __init__(self, conn: AsyncioH2, authority: str) -> None:
        self.conn = conn
        self.authority = authority

    def spool(self, flow: KioskFlow) -> AbstractContextManager[SpoolWriter]:
        return nullcontext(_discard)

    def erase(self, flow: KioskFlow, event: str) -> None:
        pass

    async def pay(self, flow: KioskFlow) -> None:
        pass

    async def print(self, flow: KioskFlow) -> bool:
        return False

    async def printed(self, flow: KioskFlow, path: str, body: bytes) -> None:
        pass

    async def deliver(self, flow: KioskFlow, path: str, body: bytes) -> tuple[int, bytes]:
        return await exchange(self.conn, self.authority, "POST", path, body, flow)


class _Worker:
    def __init__(self, wid: int, nworkers: int, spec: LoadSpec) -> None:
        self.wid = wid
        self.n = nworkers
        self.spec = spec
        self.stats = _Stats(spec.hop_kinds)
        self.rng = random.Random(spec.seed * 1000 + wid)
        self.stop = asyncio.Event()
        self.kiosks: list[_Kiosk] = []
        self.revoked = None
        self.phone = None
        self.free: list[_Kiosk] = []  # slots: a kiosk appears once per request it can take now
        self.t_warm = 0.0
        self.t_end = 0.0
        self.measured_cap = None if spec.count is None else max(1, math.ceil(spec.count / nworkers))
        self.trace: list[tuple[float, float, str, list[str]]] | None = [] if spec.trace is not None else None
        self.card_pool: list = []  # fleet mode: the residents' cards not in a kiosk now
        self.idle: OrderedDict[str, _Kiosk] = (
            OrderedDict()
        )  # fleet mode: connected kiosks with no customer, oldest first

    # -- setup -----------------------------------------------------------------------------

    def load_identities(self) -> None:
        state = Path(self.spec.state_dir)
        # the node store writes a kiosk's files on first use; they are not all on disk
        pki = PKIFiles(state, frozenset(self.spec.centers) | {ks.id for ks in self.spec.kiosks})
        center_key = tuple(
            x509.load_pem_x509_certificate(pki.node_paths(c)[0].read_bytes()).public_key() for c in self.spec.centers
        )
        cards = CardStore.__new__(CardStore)  # read-only use: load() needs only the directory
        cards.dir = state / "cards"
        if self.spec.fleet:
            ca = Path(self.spec.ca_path)

            def make_ctx(ks: KioskSpec):
                return client_context(*pki.node_paths(ks.id), ca)

            for ks in self.spec.kiosks:
                k = _Kiosk(ks, None, None, center_key)
                k.make_ctx = make_ctx
                self.kiosks.append(k)
            for card_id in self.spec.cards[self.wid :: self.n]:
                card = cards.load(card_id)
                card.on_counter_change = None
                self.card_pool.append(card)
        for ks in () if self.spec.fleet else self.spec.kiosks:
            ctx = client_context(*pki.node_paths(ks.id), Path(self.spec.ca_path))
            card = cards.load(ks.card)
            card.on_counter_change = None  # counters live in memory here; wrong PINs are reset below
            self.kiosks.append(_Kiosk(ks, ctx, card, center_key))
        if self.spec.revoked_card:
            self.revoked = cards.load(self.spec.revoked_card)
            self.revoked.on_counter_change = None
        if self.spec.smartphone:
            self.phone = cards.load(self.spec.smartphone)
            self.phone.on_counter_change = None

    async def connect_all(self) -> None:
        if self.spec.fleet:  # a kiosk dials at its first customer
            self.free = list(self.kiosks)
            return
        await asyncio.gather(*(k.connection() for k in self.kiosks))
        per = self.spec.workload.streams_per_kiosk if self.spec.workload.kind == "relay" else 1
        order = list(self.kiosks)
        self.rng.shuffle(order)
        # Round by round, so the requests in flight spread evenly over the kiosks' connections (as
        # the compiled client's -conns does): with every slot shuffled, 200 streams over 24
        # connections fell 3 on one and 15 on another, and relays that are fair per connection
        # then made a tail of the crowded ones (relay-1m p99 7.9 s against p50 1.1 s).
        self.free = [k for _ in range(per) for k in order]

    # -- one request -----------------------------------------------------------------------

    def _case(self) -> str:
        r = self.rng.random()
        for case, share in self.spec.workload.mix:
            if r < share:
                return case
            r -= share
        return "ok"

    async def one(self, k: _Kiosk, intended: float, measured: bool, card=None) -> None:
        loop = asyncio.get_running_loop()
        w = self.spec.workload
        hops: dict[str, float] = {}
        split: dict[str, float] = {}
        nbytes = 0
        case = "ok"
        started = loop.time()
        try:
            if w.kind == "relay":
                async with asyncio.timeout(w.timeout_s):
                    outcome, nbytes = await _relay_request(k, w, hops, split, self.spec.hop_kinds)
            else:
                case = self._case()
                outcome, nbytes, hops, split = await self._issue(k, case, card)
        except LinkError as exc:  # a refused connection is named by what refused it
            outcome = f"error:{type(exc.__cause__ if isinstance(exc, LinkDown) and exc.__cause__ else exc).__name__}"
        except TimeoutError:
            outcome = "error:timeout"
        except Exception as exc:  # noqa: BLE001 - a bug in a flow must not stop the run; it is counted
            outcome = f"error:{type(exc).__name__}"
        finally:
            self.free.append(k)
            if card is not None:
                self.card_pool.append(card)
                self._idle(k)
        if outcome not in EXPECTED[case] and not outcome.startswith("error:") and outcome != "misdelivered":
            outcome = f"error:expected-{case}-got-{outcome}"
        done = loop.time()
        self.stats.done += 1
        if measured:
            total = latency_ms(intended, done)
            if split:  # what the parts do not explain: waiting for a free kiosk, or the kiosk's own work
                split["generator wait"] = (started - intended) * 1000
                split["kiosk / generator own"] = total - sum(split.values())
            credential = "" if w.kind != "issuance" else "smartphone" if case == "smartphone" else "card"
            self.stats.record(
                int(intended - self.t_warm), total, outcome, nbytes, hops, split, k.spec.group, credential
            )
            if self.trace is not None:
                seen = [h for h in hops if h in self.spec.trace]
                self.trace.append((round(intended - self.t_warm, 3), round(done - self.t_warm, 3), outcome, seen))

    def _idle(self, k: _Kiosk) -> None:
        """Fleet mode: a kiosk whose customer left keeps its line while it is among the
        `max_open` most recently used; the oldest idle one hangs up."""
        if k.conn is None:
            return
        self.idle[k.spec.id] = k
        self.idle.move_to_end(k.spec.id)
        while len(self.idle) > self.spec.max_open:
            _, oldest = self.idle.popitem(last=False)
            oldest.hang_up()

    async def _issue(self, k: _Kiosk, case: str, resident=None) -> tuple[str, int, dict[str, float], dict[str, float]]:
        """`kiosk_emu.kiosk.Kiosk.issue` over asyncio, spool and log left out (nothing is printed).
        `resident`: fleet mode's card (the kiosk has none of its own) and a municipality drawn for it."""
        w, spec = self.spec.workload, self.spec
        muni = spec.closed_muni if case == "outside-hours" else spec.open_muni
        if resident is not None and spec.munis:
            muni = self.rng.choice(spec.munis)
        card = (
            self.revoked
            if case == "card-revoked" and self.revoked is not None
            else self.phone
            if case == "smartphone" and self.phone is not None
            else resident or k.card
        )
        pin = "9999" if case == "pin-wrong" else DEFAULT_PIN
        flow = KioskFlow(k.spec.id, card, pin, IssueRequest(muni, spec.cert_type, 1, w.size or None), k.center_key)
        flow.hop_kinds = spec.hop_kinds
        timeout = w.timeout_s
        if case == "timeout":
            lo, hi = w.short_timeout_ms
            timeout = self.rng.uniform(lo, hi) / 1000
        nbytes = 0
        try:
            async with asyncio.timeout(timeout):
                conn = await k.connection(self.stats)
                driver = FlowDriver(conn, k.spec.router_id, _Paperless(conn, k.spec.router_id))
                await driver.run(flow)
                nbytes = flow.outcome.document_bytes
        except TimeoutError:
            flow.cancel("timeout")
        except Exception:
            if case == "pin-wrong":
                card.tries_left = card.profile.max_tries
            raise
        if flow.state is State.VERIFIED:  # past the kiosk's timeout, as on the Trio kiosk; a hung notice is an error
            async with asyncio.timeout(w.timeout_s):
                await driver.settle(flow, self._now)
        if case == "pin-wrong":
            card.tries_left = card.profile.max_tries  # the counter procedure, so the card never locks
        o = flow.outcome
        if o.status is Status.ISSUED:
            outcome = "ok"
        elif o.status is Status.MISDELIVERED:
            outcome = "misdelivered"
            self.stats.misdelivery[o.reason or "-"] += 1
        else:
            outcome = f"{o.status}:{o.reason}"
        return outcome, nbytes, o.hops, o.split

    def _now(self) -> datetime:
        if self.spec.clock_start:
            start = datetime.fromisoformat(self.spec.clock_start)
            return start.astimezone(JST)
        return datetime.now(JST)

    # -- the loops -------------------------------------------------------------------------

    def _cap_reached(self) -> bool:
        return self.measured_cap is not None and self.stats.arrivals >= self.measured_cap

    async def open_loop(self, t0: float, tasks: set) -> None:
        loop = asyncio.get_running_loop()
        rate = self.spec.rate / self.n
        if self.spec.segments:
            first = self.spec.segments[0][1]
            plan = [(self.spec.warmup_s, first), *self.spec.segments]
            arrivals = piecewise_arrivals([(sec, r / self.n) for sec, r in plan], t0, self.rng)
        else:
            arrivals = poisson_arrivals(rate, t0, self.t_end, self.rng)
        for intended in arrivals:
            if self.stop.is_set() or self._cap_reached():
                return
            delay = intended - loop.time()
            if delay > 0:
                try:
                    await asyncio.wait_for(self.stop.wait(), delay) if delay > 0.05 else await asyncio.sleep(delay)
                except TimeoutError:
                    pass
                if self.stop.is_set():
                    return
            measured = intended >= self.t_warm
            if measured:
                self.stats.arrivals += 1
            late = loop.time() - intended
            if not self.free or late > self.spec.late_s or (self.spec.fleet and not self.card_pool):
                if measured:
                    self.stats.dropped += 1
                continue
            if self.spec.fleet:  # a kiosk drawn at random among those with no customer
                i = self.rng.randrange(len(self.free))
                self.free[i], self.free[-1] = self.free[-1], self.free[i]
                k = self.free.pop()
                self.idle.pop(k.spec.id, None)
            else:
                k = self.free.pop()
            card = self.card_pool.pop() if self.spec.fleet else None  # taken now: its task starts later
            task = asyncio.create_task(self.one(k, intended, measured, card))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    async def closed_loop(self, tasks: set) -> None:
        loop = asyncio.get_running_loop()
        total = self.spec.concurrency or 1
        mine = total // self.n + (1 if self.wid < total % self.n else 0)

        async def user() -> None:
            while not self.stop.is_set() and loop.time() < self.t_end and not self._cap_reached():
                while not self.free:
                    await asyncio.sleep(0.001)
                k = self.free.pop()
                start = loop.time()
                measured = start >= self.t_warm
                if measured:
                    self.stats.arrivals += 1
                await self.one(k, start, measured)

        for _ in range(mine):
            task = asyncio.create_task(user())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.sleep(0)

    async def run(self, go_wall: float, report) -> dict:
        loop = asyncio.get_running_loop()
        t0 = loop.time() + max(0.0, go_wall - time.time())
        self.t_warm = t0 + self.spec.warmup_s
        self.t_end = t0 + self.spec.warmup_s + self.spec.duration_s
        await asyncio.sleep(max(0.0, t0 - loop.time()))
        cpu0, wall0 = time.process_time(), time.perf_counter()
        tasks: set[asyncio.Task] = set()

        async def progress() -> None:
            while True:
                await asyncio.sleep(0.25)
                report(("progress", self.wid, self.stats.done))

        ticker = asyncio.create_task(progress())
        if self.spec.rate:
            await self.open_loop(t0, tasks)
        else:
            await self.closed_loop(tasks)
            while tasks and not self.stop.is_set() and loop.time() < self.t_end and not self._cap_reached():
                try:
                    await asyncio.wait_for(self.stop.wait(), max(0.0, min(0.1, self.t_end - loop.time())))
                except TimeoutError:
                    pass
        measured_end = min(loop.time(), self.t_end)
        # In-flight requests get a grace period, then are cancelled whole and counted.
        grace = min(self.spec.workload.timeout_s, 5.0)
        if tasks:
            _, pending = await asyncio.wait(set(tasks), timeout=grace)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
                self.stats.outcomes["error:unfinished"] += len(pending)
        cpu = time.process_time() - cpu0
        wall = time.perf_counter() - wall0
        ticker.cancel()
        s = self.stats
        return {
            "worker": self.wid,
            "arrivals": s.arrivals,
            "dropped": s.dropped,
            "outcomes": dict(s.outcomes),
            "bytes": s.bytes,
            "latency": encode(s.latency),
            "hops": {k: encode(h) for k, h in s.hops.items()},
            "split": s.split,
            "split_n": s.split_n,
            "split_total_ms": s.split_total_ms,
            "timeline": {str(sec): encode(h) for sec, h in s.timeline.items()},
            "measured_s": max(0.0, measured_end - self.t_warm),
            "cpu_s": cpu,
            "wall_s": wall,
            "cpu_fraction": cpu / wall if wall > 0 else 0.0,
            "max_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            "partial": self.stop.is_set(),
            "kiosks": len(self.kiosks),
            "trace": self.trace or [],
            "connects": s.connects,
            "misdelivery": dict(s.misdelivery),
            "groups": {g: {"outcomes": dict(c), "latency": encode(h)} for g, (c, h) in s.groups.items()},
            "credentials": {g: {"outcomes": dict(c), "latency": encode(h)} for g, (c, h) in s.credentials.items()},
        }

    def close(self) -> None:
        for k in self.kiosks:
            if k.conn is not None:
                k.conn.close()


def _worker_main(wid: int, nworkers: int, spec: LoadSpec, out: mp.Queue, go: mp.Event, go_at, stop: mp.Event) -> None:
    import uvloop

    ns = spec.kiosks[0].namespace if spec.kiosks else None
    if ns:  # netns mode: before any socket (and any thread: setns moves only the calling one)
        try:
            enter_namespace(ns)
        except OSError as exc:
            out.put(("error", wid, f"cannot enter namespace {ns}: {exc.strerror or exc}"))
            return

    async def main() -> None:
        loop = asyncio.get_running_loop()
        w = _Worker(wid, nworkers, spec)
        loop.add_signal_handler(signal.SIGINT, w.stop.set)
        try:
            w.load_identities()
            await w.connect_all()
        except Exception as exc:  # noqa: BLE001 - reported as one line by the parent
            out.put(("error", wid, _describe_connect_error(exc, spec)))
            w.close()
            return
        out.put(("ready", wid, None))
        await loop.run_in_executor(None, go.wait)

        finished = threading.Event()

        def wait_stop() -> bool:  # polls, so the thread ends once we finish; never sets the shared
            while not finished.is_set():  # `stop` itself: that would cut the other workers short
                if stop.wait(0.1):
                    return True
            return False

        async def watch_stop() -> None:
            if await loop.run_in_executor(None, wait_stop):
                w.stop.set()

        watcher = asyncio.create_task(watch_stop())
        try:
            result = await w.run(go_at.value, out.put)
        finally:
            w.close()
            finished.set()
        out.put(("result", wid, result))
        await asyncio.sleep(0)
        watcher.cancel()

    uvloop.run(main())


def _describe_connect_error(exc: Exception, spec: LoadSpec) -> str:
    k = spec.kiosks[0] if spec.kiosks else None
    where = f"{k.router_id} at {k.router_address}:{k.router_port}" if k else "the store routers"
    what = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return f"cannot reach {where}: {what} (is the topology up?)"


# -- the coordinator ---------------------------------------------------------------------------


class LoadError(Exception):
    """The load could not be run (kiosks cannot connect, a worker died); one line for the user."""


def run_load(
    spec: LoadSpec,
    workers: int = 1,
    *,
    progress: bool = True,
    label: str = "",
    on_go: Callable[[float], None] | None = None,
) -> dict:
    """Run one load across `workers` processes; returns the merged result (see `merge_results`).
    `on_go(wall_time)` is told when the workers start (warm-up begins): the bench's cost model
    times its CPU window from it."""
    if spec.rate is not None and spec.rate <= 0:
        raise LoadError(f"impossible rate {spec.rate}: it must be > 0 requests per second")
    if spec.rate is None and (spec.concurrency or 0) <= 0:
        raise LoadError("give a rate > 0 (open loop) or a concurrency >= 1 (closed loop)")
    workers = max(1, min(workers, len(spec.kiosks)))
    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()
    go, stop = ctx.Event(), ctx.Event()
    go_at = ctx.Value("d", 0.0)
    shares = worker_shares(spec.kiosks, workers)
    workers = len(shares)
    procs = []
    for wid in range(workers):
        part = LoadSpec(**{**spec.__dict__, "kiosks": shares[wid]})
        p = ctx.Process(target=_worker_main, args=(wid, workers, part, out, go, go_at, stop), daemon=True)
        p.start()
        procs.append(p)
    results: dict[int, dict] = {}
    interrupted = False
    try:
        ready = 0
        deadline = time.monotonic() + 120
        while ready < workers:
            try:
                kind, wid, payload = out.get(timeout=0.5)
            except queue_mod.Empty:
                if time.monotonic() > deadline or any(not p.is_alive() for p in procs):
                    raise LoadError("a load-generator worker did not start (see the log above)") from None
                continue
            if kind == "error":
                raise LoadError(payload)
            ready += kind == "ready"
        go_at.value = time.time() + 0.1
        go.set()
        if on_go is not None:
            on_go(go_at.value)
        results = _collect(out, procs, spec, workers, progress, label)
    except KeyboardInterrupt:
        interrupted = True
        stop.set()
        results = _collect(out, procs, spec, workers, False, label, deadline_s=15)
    finally:
        stop.set()
        go.set()
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
    merged = merge_results(list(results.values()), spec)
    merged["partial"] = interrupted or merged["partial"] or len(results) < workers
    return merged


def worker_shares(kiosks: list[KioskSpec], workers: int) -> list[list[KioskSpec]]:
    """Kiosks per worker, round-robin. A worker lives in one network namespace, so in netns mode
    kiosks are first grouped by namespace: at least one worker per namespace, `workers` spread over them."""
    groups: dict[str | None, list[KioskSpec]] = {}
    for k in kiosks:
        groups.setdefault(k.namespace, []).append(k)
    per = max(1, workers // len(groups)) if groups else 1
    return [g[i::n] for g in groups.values() for n in [min(per, len(g))] for i in range(n)]


def _collect(
    out, procs, spec: LoadSpec, workers: int, progress: bool, label: str, deadline_s: float | None = None
) -> dict[int, dict]:
    results: dict[int, dict] = {}
    done_by: dict[int, int] = {}
    total_s = spec.warmup_s + spec.duration_s
    limit = time.monotonic() + (deadline_s if deadline_s is not None else total_s + 30)
    bar = None
    if progress:
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[done]} done"),
            TimeRemainingColumn(),
            transient=True,
        )
        bar.start()
        task = bar.add_task(label or spec.workload.name, total=total_s, done=0)
    t0 = time.monotonic()
    try:
        while len(results) < workers and time.monotonic() < limit:
            try:
                kind, wid, payload = out.get(timeout=0.25)
            except queue_mod.Empty:
                if all(not p.is_alive() for p in procs):
                    break
                kind = None
            if kind == "progress":
                done_by[wid] = payload
            elif kind == "result":
                results[wid] = payload
            if bar is not None:
                bar.update(task, completed=min(total_s, time.monotonic() - t0), done=sum(done_by.values()))
    finally:
        if bar is not None:
            bar.stop()
    return results


def merge_groups(results: list[dict], breakdown: str = "groups") -> dict[str, dict]:
    """Outcomes and latency percentiles per group over the workers: per operator in fleet mode
    (`groups`), per credential in issuance (`credentials`: card or smartphone)."""
    out = {}
    for g in sorted({g for r in results for g in r.get(breakdown, {})}):
        outcomes: Counter[str] = Counter()
        for r in results:
            outcomes.update(r.get(breakdown, {}).get(g, {}).get("outcomes", {}))
        lat = merge([r[breakdown][g]["latency"] for r in results if g in r.get(breakdown, {})])
        out[g] = {
            "issued": outcomes.get("ok", 0),
            "misdelivered": outcomes.get("misdelivered", 0),
            "refused": sum(v for k, v in outcomes.items() if k.startswith("refused:")),
            "errors": {k[6:]: v for k, v in outcomes.items() if k.startswith("error:")},
            **{k: v for k, v in percentiles(lat).items() if k in ("p50_ms", "p99_ms", "count")},
        }
    return out


def merge_results(results: list[dict], spec: LoadSpec) -> dict:
    """Add up the workers' counts and histograms into one scenario result."""
    lat = merge([r["latency"] for r in results])
    outcomes: Counter[str] = Counter()
    for r in results:
        outcomes.update(r["outcomes"])
    hop_names = sorted({h for r in results for h in r["hops"]})
    hops = {h: percentiles(merge([r["hops"].get(h, "") for r in results])) for h in hop_names}
    split_n = sum(r.get("split_n", 0) for r in results)
    parts = sorted({p for r in results for p in r.get("split", {})})
    split = {p: round(sum(r["split"].get(p, 0.0) for r in results) / split_n, 3) for p in parts} if split_n else {}
    seconds = sorted({int(s) for r in results for s in r["timeline"]})
    timeline = []
    for s in seconds:
        h = merge([r["timeline"].get(str(s), "") for r in results], 2)
        p = percentiles(h)
        timeline.append({"second": s, "count": p["count"], "p50_ms": p["p50_ms"], "p99_ms": p["p99_ms"]})
    measured_s = max((r["measured_s"] for r in results), default=0.0)
    arrivals = sum(r["arrivals"] for r in results)
    dropped = sum(r["dropped"] for r in results)
    errors = {k[6:]: v for k, v in outcomes.items() if k.startswith("error:")}
    refused = {k[8:]: v for k, v in outcomes.items() if k.startswith("refused:")}
    cancelled = {k[10:]: v for k, v in outcomes.items() if k.startswith("cancelled:")}
    ok = outcomes.get("ok", 0)
    answered = ok + sum(refused.values())
    nbytes = sum(r["bytes"] for r in results)
    workers = [
        {k: r[k] for k in ("worker", "kiosks", "cpu_s", "wall_s", "cpu_fraction", "max_rss_kib")} for r in results
    ]
    return {
        "scenario": spec.workload.name,
        "mode": "open" if spec.rate else "closed",
        "rate": spec.rate,
        "concurrency": spec.concurrency,
        "duration_s": spec.duration_s,
        "warmup_s": spec.warmup_s,
        "measured_s": round(measured_s, 3),
        "kiosks": len(spec.kiosks),
        "arrivals": arrivals,
        "dropped": dropped,
        "ok": ok,
        "refused": refused,
        "cancelled": cancelled,
        "misdelivered": outcomes.get("misdelivered", 0),
        "errors": errors,
        "throughput_rps": round(answered / measured_s, 2) if measured_s else 0.0,
        "ok_rps": round(ok / measured_s, 2) if measured_s else 0.0,
        "bytes_per_s": round(nbytes / measured_s, 1) if measured_s else 0.0,
        **{k: v for k, v in percentiles(lat).items() if k != "count"},
        "latency_count": lat.get_total_count(),
        "latency_hist": encode(lat),
        "hops": hops,
        # mean ms per part of a request's latency; the parts add up to latency_split_total_ms (the mean latency)
        "latency_split": split,
        "latency_split_total_ms": round(sum(r.get("split_total_ms", 0.0) for r in results) / split_n, 3)
        if split_n
        else None,
        "timeline": timeline,
        "generator": {
            "workers": workers,
            "cpu_fraction_max": round(max((w["cpu_fraction"] for w in workers), default=0.0), 3),
            "generator_saturated": any(w["cpu_fraction"] > SATURATED for w in workers),
        },
        "partial": any(r.get("partial") for r in results),
        "connections_opened": sum(r.get("connects", 0) for r in results),
        "misdelivery_reasons": dict(sum((Counter(r.get("misdelivery", {})) for r in results), Counter())),
        "by_group": merge_groups(results),
        "by_credential": merge_groups(results, "credentials"),
        **({"trace": sorted(x for r in results for x in r.get("trace", []))} if spec.trace is not None else {}),
    }
