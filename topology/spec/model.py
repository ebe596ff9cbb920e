"""The topology file's shape: nodes, lines and per-hop allow-lists, as typed structs.

The file is YAML; `topology.spec.load` parses it, keeps line numbers for error messages and
builds these structs. Everything downstream (launcher, policy compiler, kiosk) reads only
these structs, never the raw YAML.
"""

from __future__ import annotations

import functools
import ipaddress
from enum import StrEnum
from typing import Annotated, Literal, get_args

import msgspec

from topology.spec.kinds import KINDS, NodeKind, Side, kind_names

# Views of the kind table (topology/spec/kinds.py) that the loader and the compiler ask most.
SERVER_KINDS = kind_names(listens=True)  # they listen (run a server); the others only open connections
RELAY_KINDS = kind_names(relays=True)  # they forward every allowed request to their `upstream`
# The relay kinds as a type, for the keys of a file's `upstream_connections:` (msgspec checks them).
RelayKind = Literal["store-router", "ec-router", "dmz-relay"]
assert frozenset(get_args(RelayKind)) == RELAY_KINDS, "a relay kind in the table is a RelayKind too"
# an administration (store controller) or maintenance (kiosk) surface on `admin_port`
ADMIN_KINDS = frozenset(k.name for k in KINDS.values() if k.admin_principal is not None)
# The store side of the closed network (SEC-SN-3, SEC-ST-*) and the center side (SEC-EC-2).
STORE_KINDS = kind_names(side=Side.STORE)
CENTER_KINDS = kind_names(side=Side.CENTER)


class Mode(StrEnum):
    """Where a topology runs, spelt as the CLI and the files spell it (DESIGN §4)."""

    LOOPBACK = "loopback"  # every node on its own 127.x.y.z address; the app enforces the allow-lists
    NETNS = "netns"  # one namespace per site, veth lines, nftables in each (root)
    CLUSTER = "cluster"  # a Kubernetes pod: binds all, dials Services by name (gateway/node/cluster.py)


# How a node with several upstreams uses them: the first that answers ("failover", in the
# order given) or spread connections over all of them ("balance").
UpstreamPolicy = Literal["failover", "balance"]

# How a relay connects to its next hops: one upstream connection per downstream connection
# ("paired"), or many downstream connections' streams multiplexed over a few ("pooled").
UpstreamMode = Literal["paired", "pooled"]

LineKind = Literal["lan", "wifi", "closed-line", "dmz", "dedicated-line", "lgwan"]

TlsVersion = Literal["1.2", "1.3"]

VACCINATION_FEE = 120  # yen per copy, fixed by seed 000 §13; the file format refuses any other


class Impairment(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """tc netem settings for one line (netns mode). Strings as tc takes them: '20ms', '0.1%', '10mbit'."""

    delay: str | None = None
    jitter: str | None = None
    loss: str | None = None
    rate: str | None = None


class Line(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    id: str
    a: str
    b: str
    kind: LineKind = "lan"
    impair: Impairment = Impairment()


class AllowRule(msgspec.Struct, forbid_unknown_fields=True, frozen=True, rename={"sources": "from"}):
    """One allow-list entry on the receiving node: who may connect, on which port, and ask what.

    `requests` are "METHOD /path" patterns; a trailing `*` matches any suffix.
    """

    sources: tuple[str, ...]
    requests: tuple[str, ...]
    port: int | None = None  # None: the node's own port
    proto: Literal["h2+tls"] = "h2+tls"


class AdminRule(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Who may use a node's administration or maintenance surface (SEC-ST-3/KI-6, SEC-KI-4).

    People, not nodes: `principals` are client-certificate names ("operator", "maintenance"),
    each connecting from the console of a node listed in `at` (its address), to the node's
    `admin_port`, asking `requests` ("METHOD /path", a trailing `*` matching any suffix).
    """

    principals: tuple[str, ...]
    at: tuple[str, ...]
    requests: tuple[str, ...]


class Hours(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    open: str = "06:30"  # HH:MM Asia/Tokyo
    close: str = "23:00"


class Municipality(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Business data of a municipality node (BIZ-1..3)."""

    code: str
    participating: bool = True
    # ISO dates (inclusive) bounding participation; None: no bound (BIZ-2)
    participating_from: str | None = None
    participating_until: str | None = None
    hours: Hours = Hours()
    # certificate type -> fee per copy in yen
    certificates: dict[str, int] = {}
    name: str | None = (
        None  # what residents call it, e.g. 高松市; reports, the graph, settlement and the kiosk screen show it
    )

    @property
    def display(self) -> str:
        """The name with the code, "高松市 (372013)", or the code alone."""
        return f"{self.name} ({self.code})" if self.name else self.code


class Node(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    id: str
    kind: NodeKind
    site: str
    address: str  # loopback mode, inside 127.0.0.0/8
    netns_address: str | None = None  # netns mode, inside 198.18.0.0/15; derived when absent
    port: int | None = None  # servers only
    upstream: str | None = None  # relays and kiosks: the next hop towards the issuance center
    # several next hops (redundancy); the loader keeps `upstream` == upstreams[0] and vice versa
    upstreams: tuple[str, ...] = ()
    upstream_policy: UpstreamPolicy = "failover"
    operator: str | None = None  # store/EC nodes: the operator they belong to
    allow: tuple[AllowRule, ...] = ()
    admin_port: int | None = None  # store controllers and kiosks: the administration / maintenance surface
    admin: tuple[AdminRule, ...] = ()  # who may use it; empty: no one
    municipality: Municipality | None = None
    upstream_connections: UpstreamConnections | None = None  # relays: None takes the file's, or the kind's default

    @property
    def is_server(self) -> bool:
        return self.kind in SERVER_KINDS

    @property
    def hops(self) -> tuple[str, ...]:
        """Every next hop, in the declared order: `upstreams`, or the one `upstream`."""
        if self.upstreams:
            return self.upstreams
        return (self.upstream,) if self.upstream is not None else ()

    def address_in(self, mode: Mode) -> str:
        """The node's address in `mode`: loopback or netns (derived when the file gives none)."""
        if mode == Mode.LOOPBACK:
            return self.address
        if mode == Mode.NETNS:
            return self.netns_address or derive_netns_address(self.address)
        raise ValueError(f"unknown mode {str(mode)!r}; expected 'loopback' or 'netns'")


Count = Annotated[int, msgspec.Meta(ge=1)]
Seconds = Annotated[float, msgspec.Meta(gt=0)]


class Limits(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """What one node grants a single peer before it closes the connection (docs/hostile.md).

    Floods are counted per connection over `flood_window` seconds; one more than the `max_*` in a
    window closes it with GOAWAY ENHANCE_YOUR_CALM. Timeouts are in seconds.
    """

    max_connections_per_peer: Count = 256  # per peer address, before the TLS handshake
    max_concurrent_streams: Count = 1000  # SETTINGS_MAX_CONCURRENT_STREAMS
    max_header_list_size: Count = 16 * 1024  # decoded bytes (SETTINGS_MAX_HEADER_LIST_SIZE); an HPACK bomb stops here
    handshake_timeout: Seconds = 5.0  # TCP accepted -> TLS handshake done
    preface_timeout: Seconds = 5.0  # TLS done -> the client's preface and SETTINGS
    headers_timeout: Seconds = 10.0  # a frame or header block begun -> complete (slowloris)
    idle_timeout: Seconds = 600.0  # no stream open and nothing received
    slow_read_timeout: Seconds = 30.0  # a response stalled on a zero window, or a write the peer never reads
    flood_window: Seconds = 10.0
    max_resets: Count = 500  # RST_STREAM from the peer (Rapid Reset, CVE-2023-44487)
    max_pings: Count = 100
    max_settings: Count = 100
    max_empty_data: Count = 100  # DATA frames with no payload and no END_STREAM


class UpstreamConnections(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """How a relay connects to its next hops (docs/pooling.md). Pooled: streams of every downstream
    connection share up to `connections` connections per next hop, each carrying at most `streams`
    at once (or fewer, if the next hop's max_concurrent_streams says so); one with no stream for
    `idle_timeout` seconds is closed."""

    mode: UpstreamMode = "pooled"
    streams: Count = 100
    connections: Count = 8
    idle_timeout: Seconds = 60.0


# Each relay kind's way unless the file says otherwise: a store router pairs (a store's few kiosks
# gain nothing from sharing), the EC routers and DMZ relays pool, as Envoy and HAProxy do.
UPSTREAM_DEFAULTS = {
    "store-router": UpstreamConnections(mode="paired"),
    "ec-router": UpstreamConnections(),
    "dmz-relay": UpstreamConnections(),
}


LIMIT_SCOPES = ("defaults", *KINDS)  # keys of the topology's `limits:` mapping


class Topology(msgspec.Struct, forbid_unknown_fields=True, frozen=True, dict=True):
    name: str
    nodes: dict[str, Node]
    lines: tuple[Line, ...] = ()
    service_hours: Hours = Hours()
    state_dir: str = ".konbini"
    ledger: str | None = None  # SQLite file; None: <state_dir>/ledger.sqlite; ":memory:" for comparison runs
    source: str = "<memory>"  # the file it was loaded from
    limits: dict[str, Limits] = {}  # "defaults" and node kinds, each already merged over the defaults
    upstream_connections: dict[str, UpstreamConnections] = {}  # relay kind -> how its nodes connect upstream
    tls_min_version: TlsVersion = "1.3"  # SEC-SN-2: TLS 1.3 only, unless a topology asks for a 1.2 floor
    # the issuance center relies on a card's OCSP answer until the response's nextUpdate (10 minutes)
    # instead of asking at every issuance: cheaper, and a revocation is seen up to that much later
    ocsp_cache: bool = False
    # allow entry label ("nodes.x.allow[0]") -> "file:line" of the template it was expanded from
    rule_origins: dict[str, str] = {}

    def limits_for(self, kind: str) -> Limits:
        return self.limits.get(kind) or self.limits.get("defaults") or Limits()

    def upstream_connections_for(self, node: Node) -> UpstreamConnections:
        """The node's own `upstream_connections`, else the file's for its kind, else the kind's default."""
        return (
            node.upstream_connections
            or self.upstream_connections.get(node.kind)
            or UPSTREAM_DEFAULTS.get(node.kind, UpstreamConnections(mode="paired"))
        )

    def node(self, node_id: str) -> Node:
        return self.nodes[node_id]

    def of_kind(self, kind: str) -> list[Node]:
        """This kind's nodes in file order (a new list: the caller may change it)."""
        return list(self._kind_index.get(kind, ()))

    @functools.cached_property
    def _kind_index(self) -> dict[str, list[Node]]:
        """Kind -> its nodes, built once: each of a national process's 87 municipalities scanned all
        248,000 nodes at start (35 ms each)."""
        index: dict[str, list[Node]] = {}
        for n in self.nodes.values():
            index.setdefault(n.kind, []).append(n)
        return index

    def build_indexes(self) -> None:
        """Build the lookups by address and by kind now: a launcher calls it before forking node
        processes, which inherit them instead of building them each (0.7 s a process, national)."""
        _ = self._address_index, self._kind_index

    def by_address(self, address: str) -> Node | None:
        return self._address_index.get(address)

    @functools.cached_property
    def _address_index(self) -> dict[str, Node]:
        """Address (loopback or netns) -> node, built once: a linear scan per lookup does not scale."""
        index: dict[str, Node] = {}
        for n in reversed(list(self.nodes.values())):  # the first node in file order wins, as the scan found
            index[n.address_in(Mode.NETNS)] = n
            index[n.address] = n
        return index

    def municipalities(self) -> dict[str, Node]:
        """Municipality nodes by municipality code."""
        return {n.municipality.code: n for n in self.of_kind("municipality") if n.municipality}


def derive_netns_address(loopback: str) -> str:
    """127.A.B.C -> 198.18.B.C, or 198.19.B.C when A is odd; keeps netns addresses unique when loopback ones are."""
    a, b, c = ipaddress.IPv4Address(loopback).packed[1:]
    return str(ipaddress.IPv4Address(bytes([198, 18 + (a & 1), b, c])))


def field_path(path: tuple[str | int, ...]) -> str:
    """A field's name as error messages and rule labels print it: ("nodes", "ocsp", "allow", 0) -> "nodes.ocsp.allow[0]"."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out
