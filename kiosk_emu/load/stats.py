"""One worker's counts and histograms: overall, per hop (from `server-timing`), per second, per
group and per credential, and the latency split."""

from __future__ import annotations

from collections import Counter

from hdrh.histogram import HdrHistogram

from kiosk_emu.load.histogram import encode, new_histogram, record_ms


class WorkerStats:
    """What one worker counted: outcomes, bytes, and latency overall, per hop, per second, per group."""

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

    def encoded(self) -> dict:
        """The counts, and the histograms encoded, as a worker sends them to the coordinator."""
        return {
            "arrivals": self.arrivals,
            "dropped": self.dropped,
            "outcomes": dict(self.outcomes),
            "bytes": self.bytes,
            "latency": encode(self.latency),
            "hops": {k: encode(h) for k, h in self.hops.items()},
            "split": self.split,
            "split_n": self.split_n,
            "split_total_ms": self.split_total_ms,
            "timeline": {str(sec): encode(h) for sec, h in self.timeline.items()},
            "connects": self.connects,
            "misdelivery": dict(self.misdelivery),
            "groups": {g: {"outcomes": dict(c), "latency": encode(h)} for g, (c, h) in self.groups.items()},
            "credentials": {g: {"outcomes": dict(c), "latency": encode(h)} for g, (c, h) in self.credentials.items()},
        }
