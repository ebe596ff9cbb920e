"""The workers' results added up into one scenario result: counts, percentiles, per hop, per
second, per group, the latency split and the generator's own load."""

from __future__ import annotations

from collections import Counter

from kiosk_emu.load.histogram import encode, merge, percentiles
from kiosk_emu.load.spec import LoadSpec

SATURATED = 0.9  # a worker busier than this (CPU time / wall time) may be what limits the run


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


def merge_timeline(results: list[dict]) -> list[dict]:
    """Count, p50 and p99 per second of the run, over the workers."""
    timeline = []
    for s in sorted({int(s) for r in results for s in r["timeline"]}):
        p = percentiles(merge([r["timeline"].get(str(s), "") for r in results], 2))
        timeline.append({"second": s, "count": p["count"], "p50_ms": p["p50_ms"], "p99_ms": p["p99_ms"]})
    return timeline


def generator_load(results: list[dict]) -> dict:
    """Each worker's CPU and memory, and whether one was busy enough to limit the run."""
    workers = [
        {k: r[k] for k in ("worker", "kiosks", "cpu_s", "wall_s", "cpu_fraction", "max_rss_kib")} for r in results
    ]
    return {
        "workers": workers,
        "cpu_fraction_max": round(max((w["cpu_fraction"] for w in workers), default=0.0), 3),
        "generator_saturated": any(w["cpu_fraction"] > SATURATED for w in workers),
    }


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
    measured_s = max((r["measured_s"] for r in results), default=0.0)
    arrivals = sum(r["arrivals"] for r in results)
    dropped = sum(r["dropped"] for r in results)
    errors = {k[6:]: v for k, v in outcomes.items() if k.startswith("error:")}
    refused = {k[8:]: v for k, v in outcomes.items() if k.startswith("refused:")}
    cancelled = {k[10:]: v for k, v in outcomes.items() if k.startswith("cancelled:")}
    ok = outcomes.get("ok", 0)
    answered = ok + sum(refused.values())
    nbytes = sum(r["bytes"] for r in results)
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
        "timeline": merge_timeline(results),
        "generator": generator_load(results),
        "partial": any(r.get("partial") for r in results),
        "connections_opened": sum(r.get("connects", 0) for r in results),
        "misdelivery_reasons": dict(sum((Counter(r.get("misdelivery", {})) for r in results), Counter())),
        "by_group": merge_groups(results),
        "by_credential": merge_groups(results, "credentials"),
        **({"trace": sorted(x for r in results for x in r.get("trace", []))} if spec.trace is not None else {}),
    }
