"""The load generator's arithmetic: Poisson arrivals, intended-start latency, dropped arrivals,
HDR histogram merge and percentile extraction, and the merged result's bookkeeping."""

from __future__ import annotations

import asyncio
import random
import statistics

import pytest

from kiosk_emu.load.arrivals import latency_ms, poisson_arrivals
from kiosk_emu.load.histogram import encode, merge, new_histogram, percentiles, record_ms
from kiosk_emu.load.merge import merge_results
from kiosk_emu.load.spec import KioskSpec, LoadSpec, Workload
from kiosk_emu.load.worker import Worker


def test_poisson_arrivals_have_the_asked_rate_and_stay_in_the_window() -> None:
    times = list(poisson_arrivals(200.0, 10.0, 60.0, random.Random(7)))
    assert all(10.0 < t < 60.0 for t in times)
    assert times == sorted(times)
    assert len(times) / 50.0 == pytest.approx(200.0, rel=0.05)
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    # exponential gaps: mean 1/rate and standard deviation equal to the mean
    assert statistics.mean(gaps) == pytest.approx(1 / 200, rel=0.05)
    assert statistics.stdev(gaps) == pytest.approx(1 / 200, rel=0.1)


def test_poisson_arrivals_are_reproducible_from_the_seed() -> None:
    a = list(poisson_arrivals(50, 0, 5, random.Random(3)))
    b = list(poisson_arrivals(50, 0, 5, random.Random(3)))
    assert a == b


@pytest.mark.parametrize("rate", [0, -1.5])
def test_impossible_rate_is_refused(rate: float) -> None:
    with pytest.raises(ValueError):
        next(poisson_arrivals(rate, 0, 1, random.Random(1)))


def test_latency_counts_from_the_intended_start_not_the_actual_one() -> None:
    intended, started_late, done = 1.000, 1.250, 1.260  # the generator was 250 ms late
    assert latency_ms(intended, done) == pytest.approx(260.0)
    assert latency_ms(started_late, done) == pytest.approx(10.0)  # what coordinated omission would report


def test_percentiles_of_a_known_distribution() -> None:
    h = new_histogram()
    for ms in range(1, 1001):  # 1..1000 ms, uniform
        record_ms(h, ms)
    p = percentiles(h)
    assert p["count"] == 1000
    assert p["p50_ms"] == pytest.approx(500, rel=0.002)
    assert p["p90_ms"] == pytest.approx(900, rel=0.002)
    assert p["p99_ms"] == pytest.approx(990, rel=0.002)
    assert p["p999_ms"] == pytest.approx(999, rel=0.002)
    assert percentiles(new_histogram())["p50_ms"] is None


def test_histograms_merge_across_workers() -> None:
    fast, slow = new_histogram(), new_histogram()
    for _ in range(900):
        record_ms(fast, 1.0)
    for _ in range(100):
        record_ms(slow, 100.0)
    merged = merge([encode(fast), encode(slow), ""])
    assert merged.get_total_count() == 1000
    p = percentiles(merged)
    assert p["p50_ms"] == pytest.approx(1.0, rel=0.002)
    assert p["p99_ms"] == pytest.approx(100.0, rel=0.002)


def _spec(**kw) -> LoadSpec:
    kiosk = KioskSpec("kiosk-a1-1", "127.18.11.11", "store-router-a1", "127.18.11.1", 8443, "pool-0000")
    return LoadSpec(
        workload=Workload("relay-small", "relay"), state_dir="/nonexistent", kiosks=[kiosk], ca_path="", **kw
    )


def test_arrivals_without_a_free_kiosk_are_dropped_not_delayed() -> None:
    async def main() -> Worker:
        w = Worker(0, 1, _spec(rate=500.0, duration_s=0.2, warmup_s=0.0))
        loop = asyncio.get_running_loop()
        w.t_warm = loop.time()
        w.t_end = w.t_warm + 0.2
        w.free = []  # every kiosk busy
        await w.open_loop(w.t_warm, set())
        return w

    w = asyncio.run(main())
    assert w.stats.arrivals > 50
    assert w.stats.dropped == w.stats.arrivals
    assert sum(w.stats.outcomes.values()) == 0


def test_merged_result_adds_up() -> None:
    def worker(wid: int, ok: int, refused: int, errors: int, dropped: int, ms: float) -> dict:
        h = new_histogram()
        for _ in range(ok + refused):
            record_ms(h, ms)
        return {
            "worker": wid,
            "arrivals": ok + refused + errors + dropped,
            "dropped": dropped,
            "outcomes": {"ok": ok, "refused:pin-wrong": refused, "error:timeout": errors},
            "bytes": ok * 10,
            "latency": encode(h),
            "hops": {"store-router": encode(h)},
            "timeline": {"0": encode(h)},
            "measured_s": 2.0,
            "cpu_s": 1.9,
            "wall_s": 2.0,
            "cpu_fraction": 0.95,
            "max_rss_kib": 1,
            "kiosks": 1,
            "partial": False,
        }

    r = merge_results([worker(0, 90, 5, 1, 4, 10.0), worker(1, 100, 0, 0, 0, 20.0)], _spec(rate=50.0))
    assert r["arrivals"] == 200
    assert (
        r["arrivals"]
        == r["dropped"] + r["ok"] + sum(r["refused"].values()) + sum(r["errors"].values()) + r["misdelivered"]
    )
    assert r["ok"] == 190 and r["refused"] == {"pin-wrong": 5} and r["errors"] == {"timeout": 1}
    assert r["throughput_rps"] == pytest.approx(195 / 2.0)
    assert r["bytes_per_s"] == pytest.approx(1900 / 2.0)
    assert r["p50_ms"] == pytest.approx(20.0, rel=0.002)
    assert r["hops"]["store-router"]["count"] == 195
    assert r["generator"]["generator_saturated"] is True


class _CountingKiosk:
    """A kiosk whose connection is always up; `one` below counts the streams it carries at once."""

    def __init__(self, n: int) -> None:
        self.spec = KioskSpec(f"kiosk-{n}", "127.18.11.11", "store-router-a1", "127.18.11.1", 8443, "pool-0000")
        self.open = self.peak = 0

    async def connection(self) -> None:
        return None


def test_closed_loop_streams_spread_evenly_over_the_kiosk_connections() -> None:
    """200 streams over 24 kiosks: 8 or 9 on each connection, as the compiled client's -conns
    spreads them, not a random 3 on one and 15 on another (a tail made by the generator)."""
    kiosks = [_CountingKiosk(i) for i in range(24)]

    async def main() -> None:
        w = Worker(0, 1, _spec(concurrency=200, duration_s=0.3, warmup_s=0.0))
        w.kiosks = kiosks
        await w.connect_all()
        loop = asyncio.get_running_loop()
        w.t_warm, w.t_end = loop.time(), loop.time() + 0.3

        async def one(k, start, measured) -> None:
            k.open += 1
            k.peak = max(k.peak, k.open)
            await asyncio.sleep(0.01 * (1 + int(k.spec.id.rsplit("-", 1)[1]) % 3))  # uneven service times
            k.open -= 1
            w.free.append(k)

        w.one = one
        tasks: set = set()
        await w.closed_loop(tasks)
        await asyncio.gather(*tasks)

    asyncio.run(main())
    assert sorted({k.peak for k in kiosks}) in ([8, 9], [9])
