"""The benchmark scenarios: what each one asks of the network and how it loads it by default."""

from __future__ import annotations

from dataclasses import dataclass

from kiosk_emu.load.spec import Workload

DOC_64K = 64 * 1024


@dataclass(frozen=True)
class Scenario:
    workload: Workload
    what: str
    rate: float | None = None  # default open-loop rate
    concurrency: int | None = None  # default closed-loop concurrency (used when no rate)
    success_only: bool = True  # any error or refusal is a failure of the run
    sweep: bool = False  # raise the open-loop rate stepwise instead of one run
    soak: bool = False  # sample every node process's RSS and open descriptors over the run
    failover: bool = False  # kill and restart one of two DMZ relays and one of two document servers (bench.failover)
    duration_s: float | None = None  # measured seconds when --duration is not given (else 10)
    topology: str | None = None  # a file in topology/ used when --topology is not given (else the default one)

    @property
    def name(self) -> str:
        return self.workload.name


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            Workload("relay-small", "relay", size=0), "GET /bench/blob?size=0 through the three relays", concurrency=64
        ),
        Scenario(
            Workload("relay-64k", "relay", size=64 * 1024), "GET a 64 KiB blob through the three relays", concurrency=32
        ),
        Scenario(
            Workload("relay-1m", "relay", size=1 << 20), "GET a 1 MiB blob, 200 streams in flight", concurrency=200
        ),
        Scenario(
            Workload("issuance", "issuance", size=DOC_64K),
            "full card-authenticated issuance of a 64 KiB document",
            rate=100,
        ),
        Scenario(
            Workload(
                "mixed",
                "issuance",
                size=DOC_64K,
                mix=(("pin-wrong", 0.1), ("outside-hours", 0.1), ("card-revoked", 0.1), ("smartphone", 0.2)),
            ),
            "issuance with 10 % each of wrong PIN, outside-hours and revoked-card refusals; 20 % of residents hold "
            "up a smartphone credential instead of the card",
            rate=50,
            success_only=False,
        ),
        Scenario(
            Workload(
                "issuance-timeouts", "issuance", size=DOC_64K, mix=(("timeout", 0.3),), short_timeout_ms=(2.0, 60.0)
            ),
            "issuance at full kiosk load with a 2-60 ms kiosk timeout on 30 % of requests: misdelivered must stay 0",
            concurrency=0,  # 0: one customer at every kiosk
            success_only=False,
        ),
        Scenario(
            Workload("sweep", "issuance", size=DOC_64K),
            "issuance at a rising open-loop rate: highest rate with p99 under target",
            rate=50,
            sweep=True,
        ),
        Scenario(
            Workload(
                "soak",
                "issuance",
                size=DOC_64K,
                mix=(("pin-wrong", 0.05), ("outside-hours", 0.05), ("card-revoked", 0.05), ("smartphone", 0.1)),
            ),
            "mixed issuance at about half the measured capacity (~100/s on 2 cores) for a long run: RSS and open "
            "descriptors of every node process over time; passes with RSS growth under 5 % over the last 80 %, "
            "descriptors flat, no errors, 0 misdelivered",
            rate=50,
            success_only=False,
            soak=True,
        ),
        Scenario(
            Workload("failover", "issuance", size=DOC_64K),
            "issuance while one of an operator's two DMZ relays (from 10 % of the run) and then one of a municipality's "
            "two document servers (from 55 %) is SIGKILLed and restarted, then SIGSTOPped (hung) and continued: "
            "completions and failures per second, failures by reason, time to pass over; 0 misdelivered",
            rate=10,
            success_only=False,
            failover=True,
            duration_s=24.0,
            topology="redundant.yaml",
        ),
    )
}
