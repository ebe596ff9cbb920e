"""Cluster mode: a node in a Kubernetes pod, where the topology's addresses mean nothing.

In a pod a node cannot hold its loopback or netns address. So in cluster mode it binds all
addresses (or `--bind`), dials each upstream by its Service name (the node id, which its
certificate carries: `topology/export/names.py`), and identifies a peer by its client
certificate alone. The address half of every allow-list is the NetworkPolicy's, compiled from
the same reachability matrix (`topology/export/netpol.py`), so it is checked before a packet
reaches the pod; the node still checks the certificate and every request, per hop.

`ByCertificate` is that split as an allow-list: the same `Decision`s as the wrapped list, the
address check answered "left to NetworkPolicy", the identity check made as if the peer sat at
its own topology address. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Callable

from topology.policy.compiler import (
    DENY_IDENTITY,
    Decision,
    OnFirstCheck,
    allowlists_on_first_check,
    compile_allowlists,
)
from topology.policy.monitoring import MetricsAllowList
from topology.spec.model import Mode, Topology

CLUSTER = Mode.CLUSTER
BIND_ALL = "0.0.0.0"
# The topology addresses the wrapped lists are compiled with; in cluster mode they only pair each
# identity with "its" address inside the compiled lists, and are never compared with a socket's.
POLICY_MODE = Mode.LOOPBACK
BY_NETWORK_POLICY = Decision(True, rule="networkpolicy")  # what check_address answers in cluster mode


class ByCertificate:
    """An allow-list whose address check is NetworkPolicy's: identity and requests as the wrapped one."""

    __slots__ = ("inner", "_address_of")

    def __init__(self, inner, address_of: Callable[[str], str | None]) -> None:
        self.inner = inner
        self._address_of = address_of  # identity -> the address the wrapped list expects it at

    @property
    def port(self) -> int:
        return self.inner.port

    def check_address(self, ip: str) -> Decision:
        return BY_NETWORK_POLICY

    def check_identity(self, ip: str, identity: str) -> Decision:
        address = self._address_of(identity)
        return DENY_IDENTITY if address is None else self.inner.check_identity(address, identity)

    def check_request(self, *request: str) -> Decision:
        return self.inner.check_request(*request)

    def __repr__(self) -> str:
        return f"ByCertificate({self.inner!r})"


def node_allowlists(topo: Topology, mode: Mode, only=None) -> dict[str, OnFirstCheck | ByCertificate]:
    """Every server node's allow-list for `mode` (of the ids `only`, if given), each compiled at its first check; in
    cluster mode checked by certificate."""
    if mode != CLUSTER:
        return allowlists_on_first_check(topo, mode, only)
    return {
        node_id: ByCertificate(allow, allow.sources.get)
        for node_id, allow in compile_allowlists(topo, POLICY_MODE, only).items()
    }


def scrape_allowlist(topo: Topology, mode: Mode) -> MetricsAllowList | ByCertificate:
    """The metrics port's checks: in cluster mode the monitoring certificate from any pod NetworkPolicy lets in."""
    if mode != CLUSTER:
        return MetricsAllowList(topo, mode)
    inner = MetricsAllowList(topo, POLICY_MODE)
    return ByCertificate(inner, lambda identity: inner.address)
