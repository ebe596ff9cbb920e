"""Line impairments as data: what each line's `impair: {delay, jitter, loss, rate}` turns into on
the machine, in either mode. Pure: `topology.launch.impair` applies it, `topology.policy.nft`
writes its rule text.

Every line direction is impaired on its *receiving* side (prerouting), where holding a packet
cannot stall the sender's TCP (TCP Small Queues would collapse throughput on the send side) and
a drop is a real loss rather than a local error TCP retries at once:
- loss: an nftables `numgen random` drop in the receiving namespace (loopback: on `lo`);
- delay and jitter: the run's one NFQUEUE queue there, served by the impairment daemon
  (`topology.launch.impaird`), which tells the line directions apart by the packet's addresses;
- rate: `tbf` on both veth ends (a serialisation queue belongs to the sender), or, for a pair
  of addresses on one `lo`, the daemon's own serialisation clock.
Where the kernel has `sch_netem`, a veth line is shaped by netem on both ends instead.

A hop matches on the receiving interface plus the line's two addresses, so on a shared `lo`
exactly one pair of nodes is impaired and every other pair stays loopback-fast.

Each run's rules are its own (issue 28): a table, a chain and a queue number named by the run, so
two loopback topologies on one host impair their own lines and remove only their own rules. One
queue per run and namespace, never one per line: a queue number has 16 bits and the national file
has 110,000 line directions (issue 31).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from topology.netns.plan import NetPlan
from topology.spec.model import Impairment, Mode, Topology

QUEUE_BASE = {
    Mode.NETNS: 100,
    Mode.LOOPBACK: 2000,
}  # the run's NFQUEUE number; loopback runs on one lo take the next free one
QUEUE_LIMIT = 65535  # NFQUEUE numbers are 16 bits (the netlink header's res_id)
RATE_LIMIT_S = 0.1  # a rate-limited line queues at most 100 ms of serialisation, then tail-drops

# Realistic defaults per line kind, one direction (round trip = twice the delay). Sources are
# public figures for Japanese carriers' services; every value is a plan, not a measurement.
LINE_KIND_DEFAULTS: dict[str, Impairment] = {
    # A store's closed line: a carrier IP-VPN over FTTH access (FLET'S-class, best effort with a
    # contracted share), store to the operator's EC center across regions: ~10-20 ms RTT,
    # a few ms of queueing jitter on the shared access, rare loss; 10 Mbit/s is the kiosk's
    # share next to the POS traffic.
    "closed-line": Impairment(delay="8ms", jitter="2ms", loss="0.05%", rate="10mbit"),
    # The EC center's dedicated line to the issuance center: a leased wide-area Ethernet between
    # data centers in the Tokyo area: ~1-2 ms one way, sub-ms jitter, no loss to speak of, 100 Mbit/s.
    "dedicated-line": Impairment(delay="2ms", jitter="200us", loss="0.001%", rate="100mbit"),
    # LGWAN: J-LIS's closed government WAN, the municipality reached through its prefecture's
    # access point: national backbone plus a municipal access line, ~20 ms RTT, low loss, 30 Mbit/s.
    "lgwan": Impairment(delay="10ms", jitter="1ms", loss="0.01%", rate="30mbit"),
    # In-building segments (store LAN, the EC center's DMZ) stay loopback-fast.
    "lan": Impairment(),
    "dmz": Impairment(),
    "wifi": Impairment(),
}


class ImpairError(ValueError):
    """A value konbini cannot read as a delay, a loss or a rate (one line for the user)."""


_TIME = {"us": 1e-6, "usec": 1e-6, "ms": 1e-3, "msec": 1e-3, "s": 1.0, "sec": 1.0}
# tc's units: "bit" suffixes are bits per second, "bps" suffixes bytes per second (SI multiples).
_RATE = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "bps": 8, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9}
_NUMBER = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([a-zA-Z%]*)\s*")


def _split(value: str, what: str) -> tuple[float, str]:
    m = _NUMBER.fullmatch(value)
    if not m:
        raise ImpairError(f"{what} {value!r}: expected a number and a unit")
    return float(m.group(1)), m.group(2).lower()


def parse_time(value: str | None, what: str = "delay") -> float:
    """'20ms' -> 0.02 s; '500us', '1s' too."""
    if not value:
        return 0.0
    number, unit = _split(value, what)
    if unit not in _TIME:
        raise ImpairError(f"{what} {value!r}: unit must be one of {', '.join(_TIME)}")
    return number * _TIME[unit]


def parse_loss(value: str | None) -> float:
    """'0.5%' -> 0.005."""
    if not value:
        return 0.0
    number, unit = _split(value, "loss")
    if unit != "%" or number > 100:
        raise ImpairError(f"loss {value!r}: expected a percentage between 0% and 100%")
    return number / 100


def parse_rate(value: str | None) -> float:
    """'10mbit' -> 10e6 bit/s (tc's units: 'kbit', 'mbit', 'gbit'; 'kbps' is kilobytes/s)."""
    if not value:
        return 0.0
    number, unit = _split(value, "rate")
    if unit not in _RATE:
        raise ImpairError(f"rate {value!r}: unit must be one of {', '.join(_RATE)}")
    return number * _RATE[unit]


@dataclass(frozen=True)
class Shape:
    """One line's impairment in numbers, the same both ways."""

    delay_s: float = 0.0
    jitter_s: float = 0.0
    loss: float = 0.0  # fraction of packets dropped per direction
    rate_bps: float = 0.0

    @classmethod
    def of(cls, impair: Impairment) -> Shape:
        return _shape_of(impair)

    @classmethod
    def _parse(cls, impair: Impairment) -> Shape:
        shape = cls(
            parse_time(impair.delay),
            parse_time(impair.jitter, "jitter"),
            parse_loss(impair.loss),
            parse_rate(impair.rate),
        )
        if shape.jitter_s and not shape.delay_s:
            raise ImpairError("jitter needs a delay")
        return shape

    @property
    def empty(self) -> bool:
        return not (self.delay_s or self.jitter_s or self.loss or self.rate_bps)

    def describe(self) -> str:
        if self.empty:
            return "-"
        parts = []
        if self.delay_s:
            parts.append(f"{self.delay_s * 1e3:g} ms" + (f" ± {self.jitter_s * 1e3:g}" if self.jitter_s else ""))
        if self.loss:
            parts.append(f"{self.loss * 100:g} % loss")
        if self.rate_bps:
            parts.append(f"{self.rate_bps / 1e6:g} Mbit/s")
        return ", ".join(parts)


@dataclass(frozen=True)
class Hop:
    """One direction of one line, as its receiving side matches it."""

    line: str
    direction: str  # "a>b" or "b>a", the file's a and b
    src: str
    dst: str
    namespace: str | None  # None: the launcher's own namespace (loopback mode)
    iif: str  # "lo" or the veth's name
    saddr: str
    daddr: str
    queue: int  # the run's queue: every queued hop of a run shares it


@dataclass(frozen=True)
class LineImpairment:
    """What one line needs: its shape, its two hops, and which mechanism carries each part."""

    line: str
    kind: str
    shape: Shape
    hops: tuple[Hop, Hop]
    veth: tuple[str, str, str] | None  # (namespace a, namespace b, device) when the line is a veth pair
    netem: bool  # shaped by netem on the veth ends instead of queue + numgen + tbf

    @property
    def queued(self) -> bool:
        """Does the daemon hold this line's packets?"""
        if self.netem or self.shape.empty:
            return False
        return bool(self.shape.delay_s or (self.shape.rate_bps and self.veth is None))

    @property
    def tbf(self) -> bool:
        return bool(self.shape.rate_bps and self.veth is not None and not self.netem)

    @property
    def mechanism(self) -> str:
        if self.shape.empty:
            return "none"
        if self.netem:
            return "netem"
        parts = []
        if self.queued:
            parts.append("nfqueue")
        if self.shape.loss:
            parts.append("numgen")
        if self.tbf:
            parts.append("tbf")
        return "+".join(parts)

    def daemon_queues(self) -> list[dict]:
        """The daemon's config entries for this line (empty unless it is queued)."""
        if not self.queued:
            return []
        rate = self.shape.rate_bps if self.veth is None else 0.0  # a veth's rate is tbf's job
        return [
            {
                "num": h.queue,
                "netns": h.namespace,
                "saddr": h.saddr,
                "daddr": h.daddr,
                "line": self.line,
                "dir": h.direction,
                "delay_s": self.shape.delay_s,
                "jitter_s": self.shape.jitter_s,
                "rate_bps": rate,
                "limit_s": RATE_LIMIT_S,
            }
            for h in self.hops
        ]


@functools.lru_cache(maxsize=1024)
def _shape_of(impair: Impairment) -> Shape:
    """`Shape.of`, parsed once per distinct impairment: a national file has 330,000 lines and a
    handful of impairments among them."""
    return Shape._parse(impair)


def impairments(topo: Topology, overrides: dict[str, Impairment] | None = None) -> dict[str, Impairment]:
    """Every line's impairment in force: the file's, then any live `link set` change."""
    out = {line.id: line.impair for line in topo.lines}
    out.update(overrides or {})
    return out


def plan_impairments(
    topo: Topology,
    mode: Mode,
    impairs: dict[str, Impairment],
    plan: NetPlan | None = None,
    netem: bool = False,
    queue: int | None = None,
    impaired_only: bool = False,
) -> list[LineImpairment]:
    """Every line of the topology with what carries its impairment (lines without one too, unless
    `impaired_only`: what a start applies, 19,000 of national.yaml's 330,000 lines).
    `queue`: the run's NFQUEUE number (default: the mode's base)."""
    if mode == Mode.NETNS and plan is None:
        raise ValueError("netns mode needs the NetPlan")
    queue = QUEUE_BASE[mode] if queue is None else queue
    veths = {v.line: v for v in plan.veths} if plan else {}
    out = []
    for line in topo.lines:
        shape = Shape.of(impairs.get(line.id, line.impair))
        if impaired_only and shape.empty:
            continue
        a, b = topo.node(line.a), topo.node(line.b)
        veth = veths.get(line.id)
        hops = []
        for k, (src, dst) in enumerate(((a, b), (b, a))):
            namespace = plan.namespace(dst.site) if plan else None
            iif = veth.name if veth else "lo"
            hops.append(
                Hop(
                    line.id,
                    ("a>b", "b>a")[k],
                    src.id,
                    dst.id,
                    namespace,
                    iif,
                    src.address_in(mode),
                    dst.address_in(mode),
                    queue,
                )
            )
        where = (plan.namespace(veth.site_a), plan.namespace(veth.site_b), veth.name) if veth and plan else None
        out.append(LineImpairment(line.id, line.kind, shape, (hops[0], hops[1]), where, netem and where is not None))
    return out


def free_queue(taken: set[int], mode: Mode = Mode.LOOPBACK) -> int:
    """The lowest queue number from the mode's base up that no other run holds (bound, or named by a rule)."""
    for num in range(QUEUE_BASE[mode], QUEUE_LIMIT + 1):
        if num not in taken:
            return num
    raise ImpairError(f"every NFQUEUE number from {QUEUE_BASE[mode]} to {QUEUE_LIMIT} is taken")


MARK_MASK = 0xFFFF0000


def run_mark(queue: int) -> int:
    """The packet mark a run's nft table sets on its queued hops, for its one NFQUEUE rule to match:
    the run's queue number in the high 16 bits (distinct per run, as the queue numbers are)."""
    return queue << 16


def tbf_args(rate_bps: float) -> list[str]:
    """`tc qdisc replace dev X root tbf …` arguments: a burst of 10 ms of the rate (at least two
    full frames) keeps the measured rate close to the configured one; 100 ms of queue."""
    burst = max(int(rate_bps / 8 * 0.01), 2 * 1514)
    return ["rate", f"{int(rate_bps)}bit", "burst", str(burst), "latency", f"{int(RATE_LIMIT_S * 1000)}ms"]


def netem_args(impair: Impairment) -> list[str]:
    """`tc qdisc replace … netem …` arguments, for kernels that have sch_netem."""
    args: list[str] = []
    if impair.delay:
        args += ["delay", impair.delay] + ([impair.jitter] if impair.jitter else [])
    if impair.loss:
        args += ["loss", impair.loss]
    if impair.rate:
        args += ["rate", impair.rate]
    return args
