"""Who may scrape a node's metrics: one monitoring principal, from one address, on one port.

Every server node serves Prometheus text on `METRICS_PORT` (HTTP/1.1 over mutual TLS, beside its
HTTP/2 port). That port is not a line of the topology: no topology node may connect to it, so
metrics can never become a path around the EC center (SEC-SN-3, SEC-EC-2). Only the
"monitoring" principal's certificate, connecting from `MONITORING_ADDRESS` (an address no node
holds), may ask `GET /metrics`, and the answer is the node's own counters, never a forward.
The checks run in the same order and with the same `Decision`s as the allow-lists
(`compiler.AllowList`); `metrics_reachability` is the pairs they allow and deny, for tests.
Pure: no I/O.
"""

from __future__ import annotations

from topology.policy.compiler import (
    DENY_ADDRESS,
    DENY_IDENTITY,
    DENY_REQUEST,
    Decision,
    Reach,
)
from topology.spec.model import Mode, Topology, derive_netns_address

METRICS_PORT = 9464  # the same on every node: each node has its own address in every mode
MONITORING_PRINCIPAL = "monitoring"  # the client certificate's CN (topology/pki.py PRINCIPALS)
MONITORING_ADDRESS = "127.9.0.1"  # loopback mode; netns mode derives 198.19.0.1, held by no namespace
METRICS_PATH = "/metrics"
RULE = "monitoring"  # what an allowing decision names: this module, not a line of the topology file

ALLOW = Decision(True, rule=RULE)


def monitoring_address(mode: Mode) -> str:
    if mode == Mode.LOOPBACK:
        return MONITORING_ADDRESS
    if mode == Mode.NETNS:
        return derive_netns_address(MONITORING_ADDRESS)
    raise ValueError(f"unknown mode {str(mode)!r}; expected 'loopback' or 'netns'")


class MetricsAllowList:
    """The scrape port's checks: address before TLS, identity after, then the one request."""

    __slots__ = ("address", "port")

    def __init__(self, topo: Topology, mode: Mode) -> None:
        self.address = monitoring_address(mode)
        self.port = METRICS_PORT
        # the address index, not a scan: every server builds one of these (a scan made `up` O(n²))
        holder = topo.by_address(self.address)
        if holder is not None and holder.address_in(mode) == self.address:
            raise ValueError(f"node {holder.id!r} holds {self.address}, the monitoring principal's address; move it")

    def check_address(self, ip: str) -> Decision:
        return ALLOW if ip == self.address else DENY_ADDRESS

    def check_identity(self, ip: str, identity: str) -> Decision:
        return ALLOW if ip == self.address and identity == MONITORING_PRINCIPAL else DENY_IDENTITY

    def check_request(self, method: str, target: str) -> Decision:
        return ALLOW if method == "GET" and target.partition("?")[0] == METRICS_PATH else DENY_REQUEST


def metrics_reachability(topo: Topology) -> list[Reach]:
    """The monitoring principal may reach every server node's metrics port; no topology node may."""
    matrix: list[Reach] = []
    for dst in topo.nodes.values():
        if not dst.is_server:
            continue
        matrix.append(Reach(MONITORING_PRINCIPAL, dst.id, METRICS_PORT, "http/1.1+tls", True, RULE))
        matrix.extend(
            Reach(src.id, dst.id, METRICS_PORT, "http/1.1+tls", False, None)
            for src in topo.nodes.values()
            if src.id != dst.id
        )
    return matrix
