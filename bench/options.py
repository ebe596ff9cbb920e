"""What a bench run is asked for (`BenchOptions`), checked once before anything starts."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from bench import crosscheck
from bench.baselines.haproxy import HAProxyError, haproxy_binary
from bench.scenarios import SCENARIOS
from gateway.business.clock import JST
from kiosk_emu.load.run import LoadProgress
from topology.launch.netns import NetnsError, require_root
from topology.netns.plan import PlanError, namespace_prefix
from topology.spec.model import Topology

PHASES = ("konbini", "lines", "haproxy")  # konbini's relays; the same with the lines impaired; HAProxy's relays
BENCH_PHONE = "bench-phone"  # the smartphone credential the "smartphone" case holds up (made from the first pool card)


class BenchError(Exception):
    """A bench that cannot run; one line for the user."""


def bench_clock_start() -> datetime:
    """Yesterday 20:30 JST: inside muni-a's hours, outside muni-b's, the same whenever it is run."""
    return (datetime.now(JST) - timedelta(days=1)).replace(hour=20, minute=30, second=0, microsecond=0)


@dataclass
class BenchOptions:
    scenarios: list[str]
    topology: Topology
    state_dir: Path
    out_dir: Path
    rate: float | None = None
    concurrency: int | None = None
    duration_s: float = 10.0
    warmup_s: float | None = None
    kiosks: int = 24
    workers: int = 1
    baseline: str | None = None
    count: int | None = None
    p99_target_ms: float = 100.0
    sweep_steps: int = 8
    sweep_factor: float = 1.5
    h2load: bool = False
    progress: LoadProgress | None = None  # each run's progress (the CLI's bar); None: shown nowhere
    seed: int = 1
    netns: bool = False  # run the topology in netns mode (root); the kiosks' workers join their namespaces
    netns_tag: str = "bench"  # namespaces konbini-<tag>-<site>
    lines: dict[str, str] | None = (
        None  # line kind -> delay ("20ms"): repeat konbini's phase with those lines impaired (root)
    )
    cross_check: bool = False  # drive the relay scenarios again with the compiled Go client, both chains
    relay_processes: str = "operator"  # konbini's relays: one process per operator, or per (operator, hop kind)
    center_processes: str = "one"  # the center side: one process, or one per role (centers, OCSP, municipalities)
    center_workers: int = 1  # processes serving the whole center side on shared addresses (SO_REUSEPORT)
    notes: list[str] = field(default_factory=list)


def validate(opts: BenchOptions) -> None:
    """BenchError, one line, for the first option that cannot run: the load, then the processes,
    then the tools and modes the run needs."""
    validate_load(opts)
    validate_processes(opts)
    validate_tools_and_modes(opts)


def validate_load(opts: BenchOptions) -> None:
    unknown = [s for s in opts.scenarios if s not in SCENARIOS]
    if unknown:
        raise BenchError(f"unknown scenario {unknown[0]!r}; one of: {', '.join(SCENARIOS)}")
    if opts.rate is not None and opts.rate <= 0:
        raise BenchError(f"impossible rate {opts.rate:g}: --rate must be > 0 requests per second")
    if opts.concurrency is not None and opts.concurrency <= 0:
        raise BenchError(f"impossible concurrency {opts.concurrency}: --concurrency must be >= 1")
    if opts.duration_s <= 0:
        raise BenchError("--duration must be > 0 seconds")
    if opts.kiosks < 1 or opts.workers < 1:
        raise BenchError("--kiosks and --workers must be >= 1")
    if opts.baseline not in (None, "haproxy"):
        raise BenchError(f"unknown baseline {opts.baseline!r}; only 'haproxy' is supported")


def validate_processes(opts: BenchOptions) -> None:
    if opts.relay_processes not in ("operator", "hop"):
        raise BenchError(f"--relay-processes {opts.relay_processes!r}: one of operator, hop")
    if opts.center_processes not in ("one", "role"):
        raise BenchError(f"--center-processes {opts.center_processes!r}: one of one, role")
    if opts.center_processes == "role" and opts.netns:
        raise BenchError("--center-processes role is for loopback mode (netns mode runs a process per site)")
    if opts.center_workers < 1:
        raise BenchError("--center-workers must be >= 1")
    if opts.center_workers > 1 and (opts.center_processes == "role" or opts.netns):
        raise BenchError(
            "--center-workers is for loopback mode with --center-processes one (each worker serves the whole center side)"
        )


def validate_tools_and_modes(opts: BenchOptions) -> None:
    if opts.baseline == "haproxy" or opts.h2load:
        try:
            haproxy_binary()
        except HAProxyError as exc:
            raise BenchError(str(exc)) from None
    if opts.cross_check:
        if opts.netns:
            raise BenchError("--cross-check runs in loopback mode (the compiled client has no namespace support)")
        try:
            haproxy_binary()
            crosscheck.go_binary()
        except (HAProxyError, crosscheck.CrossCheckError) as exc:
            raise BenchError(str(exc)) from None
    if opts.h2load and shutil.which("h2load") is None:
        raise BenchError("h2load is not installed (apt-get install nghttp2-client), needed for --h2load")
    if opts.lines is not None:
        if os.geteuid() != 0:
            raise BenchError("--line impairs lines per address pair on lo, which needs root")
        kinds = {line.kind for line in opts.topology.lines}
        if unknown := sorted(set(opts.lines) - kinds):
            raise BenchError(
                f"no line of kind {unknown[0]!r} in {opts.topology.source}; kinds: {', '.join(sorted(kinds))}"
            )
        if opts.netns:
            raise BenchError("--line runs in loopback mode; in netns mode set the lines with `konbini link set`")
    if any(SCENARIOS[s].failover for s in opts.scenarios) and (opts.netns or opts.baseline):
        raise BenchError("the failover scenario kills konbini's own node processes: loopback mode, no --baseline")
    if opts.netns:
        if opts.baseline or opts.h2load:
            raise BenchError("--netns runs konbini's relays only: --baseline and --h2load are loopback-only")
        try:
            require_root("`konbini bench --netns`")
            namespace_prefix(opts.netns_tag)
        except (NetnsError, PlanError) as exc:
            raise BenchError(str(exc)) from None
