"""The rate a national-peak level would reach on more cores, from the same level pinned to 1 and 2.

The model (Amdahl's law, fitted to two points): X(k) = X(1) / ((1 - p) + p / k), where X(k) is the
issuances a second measured with the whole run (node processes and generator) on k cores and p the
parallel fraction, p = 2 (1 - X(1) / X(2)). It assumes the level saturated the cores at both counts
(else X(2) is the offered rate, and the estimate a lower bound; the level used is the one whose
lower rate of the two is highest, the nearest to that), that the cost per issuance stays
what it was, and that nothing but cores limits: one Python process uses at most one core, so no k
takes the run past 1 / (the CPU one issuance costs its busiest process), the cap also given.
Pure arithmetic on the report's rows; tested directly.
"""

from __future__ import annotations

CORES = (4, 8, 16)
SATURATED = 0.95  # issued below this share of the offered rate: the cores, not the offer, set the rate


def parallel_fraction(x1: float, x2: float) -> float:
    """Amdahl's p from the rates on 1 and 2 cores, within [0, 1]."""
    if x1 <= 0 or x2 <= 0:
        return 0.0
    return min(1.0, max(0.0, 2 * (1 - x1 / x2)))


def amdahl(x1: float, p: float, k: int) -> float:
    return x1 / ((1 - p) + p / k)


def saturated(row: dict) -> bool:
    return (row.get("ok_rps") or 0.0) < SATURATED * row["offered_rps"]


def process_cap(row: dict) -> tuple[str, float] | None:
    """The busiest single process's µs per issuance and the rate it allows, issuances a second."""
    procs = [p for p in row.get("costs", {}).get("processes", []) if p.get("us_per_request")]
    if not procs:
        return None
    top = max(procs, key=lambda p: p["us_per_request"])
    return top["name"], 1e6 / top["us_per_request"]


def estimate(rows: list[dict]) -> dict | None:
    """From the level run on both 1 and 2 cores whose lower rate of the two is highest: p, and the
    rate on 4, 8 and 16 cores. Not simply the highest level: past its capacity a level collapses
    (issuances time out: x100 on the national file issued 26.5/s on 2 cores and 0 on 1), and a
    collapsed rate says nothing of capacity."""
    by_level: dict[float, dict[int, dict]] = {}
    for r in rows:
        if r.get("level") is not None and r.get("cores") in (1, 2):
            by_level.setdefault(r["level"], {})[r["cores"]] = r
    pairs = [lv for lv, got in by_level.items() if len(got) == 2]
    if not pairs:
        return None
    level = max(pairs, key=lambda lv: (min(by_level[lv][k].get("ok_rps") or 0.0 for k in (1, 2)), lv))
    one, two = by_level[level][1], by_level[level][2]
    x1, x2 = one["ok_rps"] or 0.0, two["ok_rps"] or 0.0
    p = parallel_fraction(x1, x2)
    cap = process_cap(two)
    rates = {}
    for k in CORES:
        rate = amdahl(x1, p, k)
        rates[str(k)] = round(min(rate, cap[1]) if cap else rate, 1)
    notes = []
    if not saturated(two):
        notes.append(
            f"on 2 cores the level issued {x2:g}/s of {two['offered_rps']:g}/s offered: not saturated, so the "
            "parallel fraction and every estimate are lower bounds"
        )
    if not saturated(one):
        notes.append(f"on 1 core the level was not saturated either ({x1:g}/s issued): run a higher level")
    return {
        "model": "Amdahl fitted to two points: X(k) = X(1) / ((1 - p) + p / k), p = 2 (1 - X(1) / X(2)); "
        "capped at 1 / (the busiest process's CPU per issuance)",
        "level": level,
        "rate_1_core": x1,
        "rate_2_cores": x2,
        "parallel_fraction": round(p, 3),
        "amdahl": {str(k): round(amdahl(x1, p, k), 1) for k in CORES},
        "process_cap": {"process": cap[0], "rate": round(cap[1], 1)} if cap else None,
        "rate": rates,
        "notes": notes,
    }


def describe(est: dict | None) -> list[str]:
    """The estimate in a few lines of markdown (the report's and the docs')."""
    if est is None:
        return ["No core-scaling estimate: no level ran on both 1 and 2 cores (`--cores 2,1`)."]
    cap = est["process_cap"]
    lines = [
        f"Level x{est['level']:g}: {est['rate_1_core']:g} issued/s on 1 core, {est['rate_2_cores']:g}/s on 2; "
        f"parallel fraction p = {est['parallel_fraction']:g}. {est['model']}.",
        "",
        "| cores | Amdahl | estimate |",
        "|---|---|---|",
        *[f"| {k} | {est['amdahl'][k]:g} | {est['rate'][k]:g} |" for k in est["rate"]],
    ]
    if cap:
        lines += ["", f"Cap: {cap['process']}, the busiest process on 2 cores, allows {cap['rate']:g} issuances/s."]
    lines += [f"- {n}" for n in est["notes"]]
    return lines
