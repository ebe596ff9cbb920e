"""One load-generator worker process: its kiosks, open or closed loop, and the result it sends back.

Open loop: arrivals follow a Poisson process at the worker's share of the rate. Latency is
measured from the *intended* start, so a stalled system or a late generator shows up as latency
instead of silently lowering the offered load. An arrival that finds no free kiosk slot, or that
the generator can only start more than `late_s` after its intended time, is counted as `dropped`.
Closed loop: a fixed number of requests in flight; each starts when the previous one ended.
Requests whose intended start falls in the warm-up are run but not recorded. The issuance workload
runs the Trio kiosk's own driver (`kiosk_emu.driver.FlowDriver`) with devices that print nothing,
so a document bound to anyone else is counted as misdelivered (must stay 0).
Workers are spawned, not forked: in netns mode a worker enters its namespace before it opens a
socket or starts a thread, so nothing imported here may do either.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing as mp
import random
import resource
import signal
import threading
import time
from collections import OrderedDict
from datetime import datetime
from pathlib import Path

from cryptography import x509

from gateway.business.clock import JST
from gateway.protocol.errors import LinkDown, LinkError
from gateway.protocol.messages import IssueRequest
from gateway.transport.tls import client_context
from kiosk_emu.card import DEFAULT_PIN, CardStore
from kiosk_emu.driver import FlowDriver
from kiosk_emu.flow import KioskFlow, State, Status
from kiosk_emu.load.arrivals import latency_ms, piecewise_arrivals, poisson_arrivals
from kiosk_emu.load.kiosk import LoadKiosk, Paperless, relay_request
from kiosk_emu.load.spec import EXPECTED, KioskSpec, LoadSpec
from kiosk_emu.load.stats import WorkerStats
from topology.netns.enter import enter_namespace
from topology.pkifiles import PKIFiles


class Worker:
    def __init__(self, wid: int, nworkers: int, spec: LoadSpec) -> None:
        self.wid = wid
        self.n = nworkers
        self.spec = spec
        self.stats = WorkerStats(spec.hop_kinds)
        self.rng = random.Random(spec.seed * 1000 + wid)
        self.stop = asyncio.Event()
        self.kiosks: list[LoadKiosk] = []
        self.revoked = None
        self.phone = None
        self.free: list[LoadKiosk] = []  # slots: a kiosk appears once per request it can take now
        self.t_warm = 0.0
        self.t_end = 0.0
        self.measured_cap = None if spec.count is None else max(1, math.ceil(spec.count / nworkers))
        self.trace: list[tuple[float, float, str, list[str]]] | None = [] if spec.trace is not None else None
        self.card_pool: list = []  # fleet mode: the residents' cards not in a kiosk now
        self.idle: OrderedDict[str, LoadKiosk] = (
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
                k = LoadKiosk(ks, None, None, center_key)
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
            self.kiosks.append(LoadKiosk(ks, ctx, card, center_key))
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

    async def one(self, k: LoadKiosk, intended: float, measured: bool, card=None) -> None:
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
                    outcome, nbytes = await relay_request(k, w, hops, split, self.spec.hop_kinds)
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

    def _idle(self, k: LoadKiosk) -> None:
        """Fleet mode: a kiosk whose customer left keeps its line while it is among the
        `max_open` most recently used; the oldest idle one hangs up."""
        if k.conn is None:
            return
        self.idle[k.spec.id] = k
        self.idle.move_to_end(k.spec.id)
        while len(self.idle) > self.spec.max_open:
            _, oldest = self.idle.popitem(last=False)
            oldest.hang_up()

    async def _issue(
        self, k: LoadKiosk, case: str, resident=None
    ) -> tuple[str, int, dict[str, float], dict[str, float]]:
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
                driver = FlowDriver(conn, k.spec.router_id, Paperless(conn, k.spec.router_id))
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
        return self.stats.encoded() | {
            "worker": self.wid,
            "measured_s": max(0.0, measured_end - self.t_warm),
            "cpu_s": cpu,
            "wall_s": wall,
            "cpu_fraction": cpu / wall if wall > 0 else 0.0,
            "max_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            "partial": self.stop.is_set(),
            "kiosks": len(self.kiosks),
            "trace": self.trace or [],
        }

    def close(self) -> None:
        for k in self.kiosks:
            if k.conn is not None:
                k.conn.close()


def worker_main(wid: int, nworkers: int, spec: LoadSpec, out: mp.Queue, go: mp.Event, go_at, stop: mp.Event) -> None:
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
        w = Worker(wid, nworkers, spec)
        loop.add_signal_handler(signal.SIGINT, w.stop.set)
        try:
            w.load_identities()
            await w.connect_all()
        except Exception as exc:  # noqa: BLE001 - reported as one line by the parent
            out.put(("error", wid, describe_connect_error(exc, spec)))
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


def describe_connect_error(exc: Exception, spec: LoadSpec) -> str:
    k = spec.kiosks[0] if spec.kiosks else None
    where = f"{k.router_id} at {k.router_address}:{k.router_port}" if k else "the store routers"
    what = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return f"cannot reach {where}: {what} (is the topology up?)"
