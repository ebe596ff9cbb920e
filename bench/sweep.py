"""The sweep: one scenario's phase at rising open-loop rates until the p99 target, errors,
misdeliveries or drops stop it; the best rate that passed."""

from __future__ import annotations

from collections.abc import Callable

from bench.options import BenchOptions


def sweep(name: str, phase: str, first_rate: float | None, opts: BenchOptions, run: Callable[[float], dict]) -> dict:
    """`run(rate)`: one phase at that open-loop rate, its result."""
    o = opts
    rate = o.rate or first_rate or 50.0
    steps = []
    best = None
    for _ in range(o.sweep_steps):
        r = run(rate)
        p99 = r.get("p99_ms")
        ok = (
            p99 is not None
            and p99 < o.p99_target_ms
            and not r["errors"]
            and r["misdelivered"] == 0
            and r["dropped"] <= 0.01 * max(1, r["arrivals"])
        )
        steps.append(
            {k: r.get(k) for k in ("rate", "throughput_rps", "p50_ms", "p99_ms", "dropped", "arrivals", "misdelivered")}
            | {
                "errors": sum(r["errors"].values()),
                "pass": ok,
                "generator_saturated": r["generator"]["generator_saturated"],
            }
        )
        if r.get("partial"):
            break
        if not ok:
            break
        best = rate
        rate = round(rate * o.sweep_factor, 1)
    last = steps[-1] if steps else {}
    return {
        "scenario": name,
        "phase": phase,
        "p99_target_ms": o.p99_target_ms,
        "best_rate": best,
        "steps": steps,
        "throughput_rps": max((s["throughput_rps"] for s in steps if s["pass"]), default=0.0),
        "p50_ms": last.get("p50_ms"),
        "p99_ms": last.get("p99_ms"),
        "misdelivered": sum(s["misdelivered"] for s in steps),
        "errors": {},
        "dropped": sum(s["dropped"] for s in steps),
        "partial": False,
    }
