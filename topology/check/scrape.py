"""One Prometheus scrape of a node, as the monitoring principal: HTTP/1.1 (h11) over mutual TLS
to the node's metrics port, from the monitoring address (topology/policy/monitoring.py).

In netns mode only the monitoring namespace holds that address, so `scrape_in_namespace` runs
`ip netns exec <prefix>monitoring python -m topology.check.scrape …` and reads the text back;
`policy check --netns` uses it to read the servers' denial counters from outside their processes.
"""

from __future__ import annotations

import argparse
import json
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import h11
from prometheus_client.parser import text_string_to_metric_families

from topology.pki import PKI
from topology.policy.monitoring import METRICS_PORT, MONITORING_PRINCIPAL
from topology.spec.load import load_topology

SCRAPE_TIMEOUT = 5.0


class ScrapeError(Exception):
    """The scrape was refused or failed (one line)."""


def scrape(pki: PKI, node_id: str, address: str, source: str, timeout: float = SCRAPE_TIMEOUT) -> str:
    """GET /metrics from `source`; the body, or ScrapeError."""
    chain, key = pki.principal_paths(MONITORING_PRINCIPAL)
    ctx = ssl.create_default_context(cafile=str(pki.network_ca_path))
    ctx.load_cert_chain(str(chain), str(key))
    ctx.set_alpn_protocols(["http/1.1"])
    try:
        with socket.create_connection((address, METRICS_PORT), timeout=timeout, source_address=(source, 0)) as tcp:
            with ctx.wrap_socket(tcp, server_hostname=node_id) as tls:
                status, body = exchange(tls, node_id)
    except (OSError, h11.ProtocolError) as exc:
        raise ScrapeError(f"scrape of {node_id} at {address}:{METRICS_PORT} from {source} failed: {exc}") from None
    if status != 200:
        raise ScrapeError(f"scrape of {node_id} answered HTTP {status}")
    return body.decode()


def exchange(tls: ssl.SSLSocket, node_id: str) -> tuple[int, bytes]:
    """One `GET /metrics` over h11: the status and the whole body, read to the message's end (its
    length or last chunk), not to the connection's close, so a node that keeps it open is no hang."""
    conn = h11.Connection(h11.CLIENT)
    tls.sendall(
        conn.send(h11.Request(method="GET", target="/metrics", headers=[("host", node_id), ("accept", "text/plain")]))
    )
    tls.sendall(conn.send(h11.EndOfMessage()))
    status, body = 0, b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(tls.recv(65536))
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
            return status, body


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample (0.0 when the series does not exist yet)."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def scrape_in_namespace(namespace: str, topology: str, state_dir: Path, node_id: str, address: str, source: str) -> str:
    """`scrape` run inside `namespace` (netns mode's monitoring namespace); ScrapeError if it fails."""
    done = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            namespace,
            sys.executable,
            "-m",
            "topology.check.scrape",
            "--topology",
            topology,
            "--state",
            str(state_dir),
            "--node",
            node_id,
            "--address",
            address,
            "--source",
            source,
        ],
        capture_output=True,
        text=True,
        timeout=SCRAPE_TIMEOUT + 10,
        check=False,
    )
    if done.returncode != 0:
        raise ScrapeError((done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1])
    return done.stdout


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m topology.check.scrape")
    p.add_argument("--topology", required=True)
    p.add_argument("--state", required=True)
    p.add_argument("--node", required=True)
    p.add_argument("--address", required=True)
    p.add_argument("--source", required=True)
    args = p.parse_args(argv)
    pki = PKI.ensure(Path(args.state), load_topology(args.topology))
    try:
        sys.stdout.write(scrape(pki, args.node, args.address, args.source))
    except ScrapeError as exc:
        print(json.dumps({"error": str(exc)}), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
