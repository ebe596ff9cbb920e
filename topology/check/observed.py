"""What the policy probes saw, against what they expected: one `Result` per probe, and per
namespace its surroundings (only lo and the topology's veths, no route out).
"""

from __future__ import annotations

from dataclasses import dataclass

from topology.check.probes import Probe
from topology.netns.plan import MONITORING_SITE, NetPlan


@dataclass
class Result:
    id: int
    kind: str
    src: str
    dst: str
    proto: str
    port: int
    sent_from: str
    expected: str
    observed: str
    ok: bool
    requirements: tuple[str, ...]
    rule: str | None


def compare(probes: list[Probe], answered: dict[int, str]) -> list[Result]:
    results = []
    for p in probes:
        seen = answered.get(p.id)
        expected = "syn-ack" if p.expect_answer else "nothing"
        ok = seen == "syn-ack" if p.expect_answer else seen is None
        results.append(
            Result(
                p.id,
                p.kind,
                p.src,
                p.dst,
                p.proto,
                p.port,
                p.site,
                expected,
                seen or "nothing",
                ok,
                p.requirements,
                p.rule,
            )
        )
    return results


def surroundings_results(plan: NetPlan, sites: dict[str, dict], start_id: int) -> list[Result]:
    """Per namespace: only lo and the topology's veths, no default route, nothing routable outside."""
    results = []
    for s, info in sorted(sites.items()):
        if s == MONITORING_SITE and plan.monitoring is not None:
            want = sorted(["lo", *(link.mon_ifname for link in plan.monitoring.links.values())])
        else:
            want = sorted(plan.interface_names(s))
        for kind, expected, observed in (
            ("interfaces", " ".join(want), " ".join(info["interfaces"])),
            ("default-route", "none", "present" if info["default_route"] else "none"),
            ("route-out", "unreachable", info["route_out"] or "unreachable"),
        ):
            results.append(
                Result(
                    start_id + len(results),
                    kind,
                    "-",
                    "-",
                    "-",
                    0,
                    s,
                    expected,
                    observed,
                    expected == observed,
                    ("SEC-SN-1",),
                    None,
                )
            )
        for err in info.get("errors", []):
            results.append(
                Result(
                    start_id + len(results),
                    "probe-error",
                    "-",
                    "-",
                    "-",
                    0,
                    s,
                    "no error",
                    err,
                    False,
                    ("SEC-SN-1",),
                    None,
                )
            )
    return results
