"""Kubernetes names for topology nodes: a node's Service is named after its id, unchanged.

Node certificates carry the id as their DNS SAN (`topology/pki.py`), and every client verifies
its upstream against that name (`gateway/transport/tls.py`). A cluster-mode node dials the
Service of that name, so the name it resolves and the name it verifies are one string, with
no SAN to add. An id that is no Kubernetes Service name (DNS-1035 label) is refused, never
renamed: a renamed Service would no longer match the certificate.
"""

from __future__ import annotations

import re

_DNS_1035 = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")


def check_name(what: str, name: str) -> None:
    """Raise ValueError naming `what` when `name` is no DNS-1035 label (what a Service name must be)."""
    if not _DNS_1035.fullmatch(name):
        raise ValueError(
            f"{what} {name!r} is not a Kubernetes name (lowercase letters, digits and '-', starting with a letter, "
            "at most 63): Services carry node ids unchanged because the certificates name them; rename it in the topology file"
        )


def service_name(node_id: str) -> str:
    """The Service (and DNS name) of a node in cluster mode: its id, checked."""
    check_name("node id", node_id)
    return node_id
