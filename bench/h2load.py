"""The h2load cross-check: relay-small and relay-64k driven by nghttp2's h2load through a
cleartext-h2 → mTLS HAProxy shim (h2load has no client-certificate option), and its summary parsed."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from pathlib import Path

from bench.baselines.haproxy import HAProxyProcess, config
from topology.spec.model import Topology

SHIM_PORT = 9080


def run_h2load(
    topo: Topology,
    pki,
    state_dir: Path,
    kiosk_id: str,
    front: Callable[[str], object],
    phases: list[str],
    duration: float,
) -> dict:
    """Every phase's relays (`front(phase)`, started and stopped here) driven by h2load from `kiosk_id`'s address."""
    out: dict = {
        "note": "h2load has no client-certificate option; it drives a local HAProxy shim (cleartext h2 on the "
        f"kiosk's address, mTLS as {kiosk_id} to its store router), so figures include one extra hop",
        "runs": [],
    }
    cfg = state_dir / "haproxy" / "h2load-shim.cfg"
    text = config(topo, pki, state_dir, shim=(kiosk_id, SHIM_PORT))
    # keep only the shim frontend/backend: the relays are whichever phase runs
    shim_only = text.split("frontend h2load-shim", 1)[1]
    head = text.split("\nfrontend ", 1)[0]
    cfg.write_text(head + "\nfrontend h2load-shim" + shim_only)
    k = topo.node(kiosk_id)
    for phase in phases:
        server = front(phase)
        server.start()
        shim = HAProxyProcess(cfg, [(k.address, SHIM_PORT)])
        try:
            shim.start()
            for size in (0, 64 * 1024):
                url = f"http://{k.address}:{SHIM_PORT}/bench/blob?size={size}"
                cmd = ["h2load", "-D", str(int(duration)), "--warm-up-time", "1", "-c", "4", "-m", "16", url]
                res = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
                out["runs"].append({"phase": phase, "size": size, "command": " ".join(cmd), **parse_h2load(res.stdout)})
        finally:
            shim.stop()
            server.stop()
    return out


def parse_h2load(text: str) -> dict:
    out: dict = {}
    m = re.search(r"finished in [\d.]+\w*, ([\d.]+) req/s, ([\d.]+)(\w+)/s", text)
    if m:
        unit = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3}.get(m[3], 1)
        out["rps"] = float(m[1])
        out["bytes_per_s"] = float(m[2]) * unit
    m = re.search(
        r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", text
    )
    if m:
        out.update(total=int(m[1]), succeeded=int(m[4]), failed=int(m[5]), errored=int(m[6]))
    m = re.search(r"time for request:\s+([\d.]+)(\w+)\s+([\d.]+)(\w+)\s+([\d.]+)(\w+)", text)
    if m:
        scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}
        out["min_ms"] = float(m[1]) * scale.get(m[2], 1)
        out["max_ms"] = float(m[3]) * scale.get(m[4], 1)
        out["mean_ms"] = float(m[5]) * scale.get(m[6], 1)
    if not out:
        out["raw_tail"] = text[-500:]
    return out
