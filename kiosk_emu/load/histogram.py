"""HDR histograms of latency in microseconds: what a worker records and sends, and what the
coordinator adds up and reads percentiles from."""

from __future__ import annotations

from hdrh.histogram import HdrHistogram

LOWEST_US = 1
HIGHEST_US = 120_000_000  # 120 s


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
