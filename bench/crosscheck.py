"""The cross-check: the relay scenarios driven by an independent compiled client.

konbini's load generator is Python: on a small machine its own CPU can be part of what a
throughput ratio measures. `konbini bench --cross-check` drives relay-small, relay-64k and
relay-1m once more with ../shared/tools/h2mtls_load (Go's net/http, built here with Debian's
golang-go, nothing downloaded) against konbini's relays and against HAProxy on the same
addresses, from every kiosk's address with its own certificate, and the report shows both
ratios side by side. The client is closed loop: -c requests in flight over one connection per kiosk.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from bench.costs import CostProcess, CostWindow

SCENARIOS = ("relay-small", "relay-64k", "relay-1m")
AGREE = 0.25  # ratios within 25 % of each other agree; further apart, the report says which to believe
ROOT = Path(__file__).resolve().parents[1]
BUILD_TIMEOUT_S = 300


class CrossCheckError(Exception):
    """The compiled client cannot be built or run; one line for the user."""


def go_binary() -> str:
    path = shutil.which("go")
    if path is None:
        raise CrossCheckError("go is not installed (apt-get install golang-go), needed for --cross-check")
    return path


def source_dir() -> Path:
    """tools/h2mtls_load in the shared folder next to the checkout (or inside it)."""
    for shared in (ROOT / "shared", ROOT.parent / "shared"):
        if (shared / "tools/h2mtls_load/main.go").exists():
            return shared / "tools/h2mtls_load"
    raise CrossCheckError(f"no tools/h2mtls_load/main.go under {ROOT / 'shared'} or {ROOT.parent / 'shared'}")


def build(build_dir: Path) -> Path:
    """The client built into build_dir (again only when its source is newer); offline: GOPROXY=off.
    The folder is made absolute first: go refuses a relative GOPATH, and the default state folder
    (.konbini-bench) is relative."""
    build_dir = build_dir.resolve()
    src = source_dir()
    binary = build_dir / "h2mtls_load"
    newest = max(p.stat().st_mtime for p in src.iterdir() if p.suffix in (".go", ".mod"))
    if binary.exists() and binary.stat().st_mtime >= newest:
        return binary
    build_dir.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "GOFLAGS": "-mod=mod",
        "GOPROXY": "off",
        "GOTOOLCHAIN": "local",
        "CGO_ENABLED": "0",
        "GOCACHE": str(build_dir / "cache"),
        "GOPATH": str(build_dir / "gopath"),
    }
    try:
        done = subprocess.run(
            [go_binary(), "build", "-o", str(binary), "."],
            cwd=src,
            env=env,
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        raise CrossCheckError(f"go build of {src} took over {BUILD_TIMEOUT_S} s") from None
    if done.returncode != 0:
        first = (done.stderr.strip() or f"exit {done.returncode}").splitlines()[0]
        raise CrossCheckError(f"go build of {src} failed: {first}")
    return binary


def command(binary: Path, topo, pki, kiosk_ids: list[str], size: int, concurrency: int, duration_s: float) -> list[str]:
    """One connection per kiosk, dialled from its address with its certificate to its store router."""
    pairs = []
    for kid in kiosk_ids:
        k = topo.node(kid)
        r = topo.node(k.upstream or "")
        chain, key = pki.node_paths(kid)
        pairs.append(f"https://{r.address}:{r.port}/bench/blob?size={size}@{k.address}@{chain}@{key}")
    chain, key = pki.node_paths(kiosk_ids[0])
    return [
        str(binary),
        "-c",
        str(concurrency),
        "-conns",
        str(len(kiosk_ids)),
        "-d",
        f"{duration_s:g}s",
        "-ca",
        str(pki.network_ca_path),
        "-cert",
        str(chain),
        "-key",
        str(key),
        "-pairs",
        ",".join(pairs),
    ]


def parse(stdout: str) -> dict:
    """The client's one JSON line: ok, fail, rps, MBps, p50_ms, p99_ms."""
    for line in reversed(stdout.strip().splitlines()):
        try:
            out = json.loads(line)
        except ValueError:
            continue
        if isinstance(out, dict) and "rps" in out:
            return out
    raise CrossCheckError(f"the compiled client printed no result: {stdout.strip()[-300:]!r}")


def compare(generator: float | None, client: float | None) -> dict:
    """Both konbini ÷ HAProxy throughput ratios and whether they agree (within AGREE of each other)."""
    if generator is None or client is None or not client:
        return {"generator": generator, "compiled_client": client, "agree": None}
    return {"generator": generator, "compiled_client": client, "agree": abs(generator - client) / client <= AGREE}


def run(
    cmd: list[str],
    duration: float,
    front: Callable[[str], object],
    cost_processes: Callable[[object], list[CostProcess]],
    phase: str,
) -> dict:
    """One run of the compiled client against `phase`'s relays (`front(phase)`, started and
    stopped here), with its CPU in the cost model beside theirs."""
    server = front(phase)
    server.start()
    try:
        window = CostWindow(cost_processes(server))
        children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        window.begin()
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
        except subprocess.TimeoutExpired:
            raise CrossCheckError(f"the compiled client did not finish within {duration + 60:.0f} s") from None
        window.finish()
        children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    finally:
        server.stop()
    if done.returncode != 0:
        raise CrossCheckError(f"the compiled client failed (exit {done.returncode}): {done.stderr.strip()[-300:]}")
    result = parse(done.stdout)
    client_cpu = (children1.ru_utime + children1.ru_stime) - (children0.ru_utime + children0.ru_stime)
    client = CostProcess("compiled client", "client", 0)
    result["costs"] = window.model(int(result.get("ok", 0)), extra=[(client, client_cpu)])
    return result
