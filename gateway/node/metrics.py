"""A node's Prometheus metrics: one registry per node, served as text on the scrape port.

Many nodes share one process in loopback mode, so each `NodeServer` owns its own
`CollectorRegistry` instead of the library's global one. Labels carry only bounded, opaque
values: reason codes, methods, certificate types, line ids. Never a card, PIN, name or session.
Who may scrape is decided by `topology.policy.monitoring`; the serving is in `server.py`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import h11
import trio
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

disable_created_metrics()  # no `*_created` series: a scrape shows only what konbini counts

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
REQUEST_HEAD_LIMIT = 8 * 1024  # a scrape's request line and headers; more is refused
METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "HEAD"})  # anything else is labelled "other"


class NodeMetrics:
    """The counters one node keeps; the node's code increments them where the event happens.

    Made at the node's first use of them (a connection, a scrape), not at start: a registry of
    fifteen series was a quarter of a national file's start (docs/performance.md), for nodes most
    of which are never dialled. Until then no attribute but the node's names exists; the first lookup of
    any other builds them all (`__getattr__` is only called for names not found)."""

    def __init__(self, node_id: str, kind: str) -> None:
        self.node_id, self.kind = node_id, kind
        self._collectors: list = []  # registered when the registry is made
        self._children: dict = {}  # (family, label) -> its child, for `labelled`

    def register(self, collector) -> None:
        """A collector read at scrape time (an app with state of its own)."""
        if "registry" in self.__dict__:
            self.registry.register(collector)
        else:
            self._collectors.append(collector)

    def __getattr__(self, name: str):
        if name.startswith("_") or "registry" in self.__dict__:
            raise AttributeError(name)
        self._build()
        return getattr(self, name)

    def _build(self) -> None:
        self.registry = r = CollectorRegistry()
        Gauge("konbini_node_info", "This node (value 1).", ["node", "kind"], registry=r).labels(
            self.node_id, self.kind
        ).set(1)
        self.requests = Counter("konbini_requests", "HTTP/2 requests received, allowed or not.", ["method"], registry=r)
        self.denials = Counter(
            "konbini_denials", "Refused connections, streams and requests, by reason code.", ["reason"], registry=r
        )
        self.streams_in_flight = Gauge("konbini_streams_in_flight", "Requests being handled now.", registry=r)
        self.tls_handshakes = Counter(
            "konbini_tls_handshakes", "TLS handshakes as a server, by result.", ["result"], registry=r
        )
        self.tls_resumed = Counter(
            "konbini_tls_resumed", "TLS handshakes (result ok) that resumed a session ticket.", registry=r
        )
        self.connections = Counter(
            "konbini_connections", "Connections admitted (address, certificate and ALPN allowed).", registry=r
        )
        self.connections_open = Gauge("konbini_connections_open", "Admitted connections open now.", registry=r)
        # relays
        self.bytes_relayed = Counter(
            "konbini_relayed_bytes", "Body bytes forwarded, by direction.", ["direction"], registry=r
        )
        self.upstream_failures = Counter(
            "konbini_upstream_failures", "Next hop unreachable, unavailable or late, by reason.", ["reason"], registry=r
        )
        # the issuance center
        self.issuances = Counter(
            "konbini_issuances",
            "Documents delivered with their signed binding, by certificate type.",
            ["cert_type"],
            registry=r,
        )
        self.refusals = Counter(
            "konbini_refusals", "Issuance-protocol refusals, by reason code (BIZ-2).", ["reason"], registry=r
        )
        self.misdeliveries = Counter(
            "konbini_misdelivery_reports", "Documents a kiosk refused as not its own (INT-1).", registry=r
        )
        self.notices = Counter(
            "konbini_notices", "Completion notices received, by result (new or duplicate).", ["result"], registry=r
        )
        self.scrapes = Counter("konbini_scrapes", "Metrics scrapes served.", registry=r)
        for collector in self._collectors:
            r.register(collector)

    def request(self, method: str) -> None:
        self.labelled(self.requests, method if method in METHODS else "other").inc()

    def labelled(self, family, label: str):
        """`family.labels(label)`, looked up once: `labels` builds a key tuple and takes the
        family's lock on every call, too much to do per request (docs/performance.md)."""
        try:
            return self._children[family, label]
        except KeyError:
            child = self._children[family, label] = family.labels(label)
            return child

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


# Apps not started by a NodeServer (unit tests drive them directly) count into this one.
DETACHED = NodeMetrics("-", "-")


class ImpairmentStatus:
    """The impairment daemon's counters (its status.json) for the lines that touch one node.

    A custom collector: read at scrape time, so nothing polls the file in between."""

    def __init__(self, status_file: Path, line_ids: set[str]) -> None:
        self.status_file = Path(status_file)
        self.line_ids = line_ids

    def collect(self) -> Iterator[Metric]:
        try:
            status = json.loads(self.status_file.read_text())
        except (OSError, ValueError):
            status = {}
        labels = ["line", "dir"]
        packets = CounterMetricFamily(
            "konbini_impair_packets", "Packets the impairment daemon queued, by line and direction.", labels=labels
        )
        released = CounterMetricFamily("konbini_impair_released", "Packets released after their delay.", labels=labels)
        dropped = CounterMetricFamily("konbini_impair_dropped", "Packets the daemon dropped.", labels=labels)
        nbytes = CounterMetricFamily("konbini_impair_bytes", "Bytes queued by the daemon.", labels=labels)
        held = GaugeMetricFamily("konbini_impair_held", "Packets held now.", labels=labels)
        for q in status.get("queues", ()):
            if q.get("line") not in self.line_ids:
                continue
            key = [str(q["line"]), str(q.get("dir", ""))]
            packets.add_metric(key, q.get("packets", 0))
            released.add_metric(key, q.get("released", 0))
            dropped.add_metric(key, q.get("dropped", 0))
            nbytes.add_metric(key, q.get("bytes", 0))
            held.add_metric(key, q.get("held_now", 0))
        yield from (packets, released, dropped, nbytes, held)


async def read_request_head(stream: trio.abc.Stream) -> tuple[str, str] | None:
    """An HTTP/1.1 request's method and target, once h11 has its head; None if it is not one
    (malformed, over REQUEST_HEAD_LIMIT, or the peer closed first)."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=REQUEST_HEAD_LIMIT)
    try:
        while (event := conn.next_event()) is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(4096))
    except h11.RemoteProtocolError:
        return None
    if not isinstance(event, h11.Request):
        return None
    return event.method.decode("ascii", "replace"), event.target.decode("ascii", "replace")


def http_response(status: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> bytes:
    reason = {200: "OK", 400: "Bad Request", 403: "Forbidden"}.get(status, "Error")
    head = f"HTTP/1.1 {status} {reason}\r\ncontent-type: {content_type}\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
    return head.encode() + body
