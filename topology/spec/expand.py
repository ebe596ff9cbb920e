"""The compact topology format: inheritance, ranges of stores, address pools, role-based allow-lists.

Theory of operation. A compact file says each thing once and the expansion writes it out in
full, as exactly the `model.Topology` an explicit file of the same network would load to, so
the launcher, the policy compiler, nftables and the probes never see the difference.

- Inheritance, containerlab style: `defaults` < `kinds.<node kind>` < a group's `kinds` < the
  node itself. A field set lower replaces the one above whole (an allow-list is replaced, not
  appended to). `defaults.port` applies to the kinds that listen only.
- `line_kinds.<line kind>.impair`: impairments of every line of that kind that sets none.
- `pools`: named address ranges inside 127.0.0.0/8 ("127.64.0.0/14" or "first-last"); groups
  and the municipality generator take consecutive blocks from them in file order.
- `groups`: ranges of stores, `range: a[00001-21000]`; member `a00001` is the site `store-a00001`
  with `store-router-a00001`, `store-controller-a00001`, `wifi-a00001`, `kiosk-a00001-<k>` and the
  lines a hand-written store has (`closed-…`, `lan-…-k<k>`, `lan-…-ctl`, `lan-…-k<k>-ctl`, `wifi-…`).
- Allow-list `from` entries may be roles instead of ids: `{kind: kiosk, same: site}` (the kiosks of
  this store), `{kind: store-router, same: operator}` (this operator's store routers), `{group: g,
  kind: store-router}`, `{kind: dmz-relay}`. Every entry a role produces remembers the template's
  file:line (`Topology.rule_origins`).
- `municipalities`: a seeded generator (count, how many take part, hours and fees to choose from).

Members of a group are built straight into structs and checked once, at the template (the first
member stands for all: they differ only in derived ids and addresses); that is what keeps a
55,000-store file under ten seconds. This module does no I/O and reports through callbacks, so
the loader (`load.py`) stays the one place that turns problems into file:line:field.
"""

from __future__ import annotations

import ipaddress
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import msgspec

from topology.spec.kinds import NodeKind
from topology.spec.model import (
    SERVER_KINDS,
    AdminRule,
    Hours,
    Impairment,
    Limits,
    LineKind,
    Municipality,
    RelayKind,
    TlsVersion,
    UpstreamConnections,
    UpstreamPolicy,
)
from topology.spec.model import AdminRule as AdminStruct
from topology.spec.model import AllowRule as AllowStruct
from topology.spec.model import Line as LineStruct
from topology.spec.model import Node as NodeStruct

FieldPath = tuple[str | int, ...]
Report = Callable[[FieldPath, str], None]
Convert = Callable[[Any, Any, FieldPath], Any]

COMPACT_FIELDS = frozenset({"defaults", "kinds", "line_kinds", "pools", "groups", "municipalities"})

# ---------------------------------------------------------------------------------------------
# The file-format structs (also what `konbini schema` emits).


class Role(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """An allow-list source by role: every node matching all the given fields."""

    kind: NodeKind | None = None
    group: str | None = None  # a member of this group
    operator: str | None = None
    same: Literal["site", "operator"] | None = None  # relative to the node whose allow-list this is


class AllowTemplate(msgspec.Struct, forbid_unknown_fields=True, frozen=True, rename={"sources": "from"}):
    sources: tuple[str | Role, ...]
    requests: tuple[str, ...]
    port: int | None = None
    proto: Literal["h2+tls"] = "h2+tls"


class NodeFields(msgspec.Struct, forbid_unknown_fields=True, frozen=True, omit_defaults=True):
    """What `defaults`, `kinds` and a group's `kinds` may set for the nodes below them."""

    port: int | None = None
    operator: str | None = None
    upstream: str | None = None
    upstreams: tuple[str, ...] | None = None
    upstream_policy: UpstreamPolicy | None = None
    allow: tuple[AllowTemplate, ...] | None = None
    municipality: Municipality | None = None


class ExplicitNode(NodeFields, forbid_unknown_fields=True, frozen=True, omit_defaults=True):
    kind: NodeKind = "kiosk"
    site: str = ""
    address: str = ""
    netns_address: str | None = None
    admin_port: int | None = None
    admin: tuple[AdminRule, ...] = ()
    upstream_connections: UpstreamConnections | None = None


class LineFields(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    impair: Impairment = Impairment()


class ExplicitLine(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    id: str
    a: str
    b: str
    kind: LineKind = "lan"
    impair: Impairment | None = None  # None: line_kinds.<kind>.impair


class KioskMix(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """How many kiosks each store has: `counts[i]` with relative weight `weights[i]`, drawn with `seed`."""

    counts: tuple[int, ...]
    weights: tuple[float, ...]
    seed: int = 0


class Layout(msgspec.Struct, forbid_unknown_fields=True, frozen=True, rename="kebab"):
    """Each store's block of addresses and the offset of each node in it (kiosk k at kiosk + k - 1)."""

    block: int = 8
    store_router: int = 0
    store_controller: int = 1
    wifi: int = 2
    kiosk: int = 3


class StoreGroup(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    range: str  # "a[00001-21000]": member names a00001 ... a21000
    pool: str
    operator: str
    upstream: str | None = None  # the store routers' next hop (an EC router)
    upstreams: tuple[str, ...] | None = None
    upstream_policy: UpstreamPolicy | None = None
    kiosks: int | KioskMix = 2
    layout: Layout = Layout()
    kinds: dict[NodeKind, NodeFields] = {}  # this group's own overrides
    admin: bool = True  # the annex's admin surfaces, as `store_admin` gives them; false: none


# Every member store's administration surfaces, as the hand-written stores have them: the
# controller's admin API for the operator and each kiosk's maintenance endpoint for maintenance
# staff, both at the store console (the controller). The annex requires them (SEC-ST-3/KI-6,
# SEC-KI-4, SEC-KI-7, SEC-KI-8), so a compact store has them unless its group says `admin: false`.
ADMIN_PORT = 9440
CONTROLLER_ADMIN = ("GET /admin/*", "POST /admin/*", "PUT /admin/*")
KIOSK_MAINTENANCE = ("POST /maintenance/*", "GET /maintenance/*")


def store_admin(kind: str, controller: str) -> dict[str, Any]:
    """The admin fields of a member store's `kind` node whose console is `controller`."""
    principal, requests = (
        ("operator", CONTROLLER_ADMIN) if kind == "store-controller" else ("maintenance", KIOSK_MAINTENANCE)
    )
    return {"admin_port": ADMIN_PORT, "admin": (AdminStruct((principal,), (controller,), requests),)}


class MunicipalityGenerator(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """`count` municipalities, `participating` of them taking part, hours and fees drawn with `seed`."""

    count: int
    pool: str
    center: tuple[str, ...]  # joined by an lgwan line to each of these (issuance centers)
    participating: int | None = None  # None: all
    seed: int = 0
    id: str = "muni-{n:04d}"  # n counts from 1
    site: str = "lgwan-{n:04d}"
    hours: tuple[Hours, ...] = (Hours(),)
    certificates: dict[str, tuple[int, ...]] = {}  # type -> fees to choose from
    impair: Impairment = Impairment()


class CompactTopology(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The whole file. Every field of the explicit format is here too: an explicit file is a compact one."""

    name: str
    nodes: dict[str, ExplicitNode] = {}
    lines: tuple[ExplicitLine, ...] = ()
    service_hours: Hours = Hours()
    state_dir: str = ".konbini"
    ledger: str | None = None
    limits: dict[str, Limits] = {}
    upstream_connections: dict[RelayKind, UpstreamConnections] = {}
    tls_min_version: TlsVersion = "1.3"
    ocsp_cache: bool = False
    defaults: NodeFields = NodeFields()
    kinds: dict[NodeKind, NodeFields] = {}
    line_kinds: dict[LineKind, LineFields] = {}
    pools: dict[str, str] = {}
    groups: dict[str, StoreGroup] = {}
    municipalities: MunicipalityGenerator | None = None


def json_schema() -> dict[str, Any]:
    schema = msgspec.json.schema(CompactTopology)
    # `from: x` is short for `from: [x]` (a role too); the loader lists it before conversion
    properties = schema["$defs"]["AllowTemplate"]["properties"]
    listed = properties["from"]
    properties["from"] = {"anyOf": [*listed["items"]["anyOf"], listed]}
    return schema


# ---------------------------------------------------------------------------------------------
# The expansion.

_RANGE = re.compile(r"([A-Za-z0-9_-]*)\[(\d+)-(\d+)\]([A-Za-z0-9_-]*)")
_LOOPBACK = ipaddress.IPv4Network("127.0.0.0/8")
_THE_STORES_KIOSKS = Role(
    kind="kiosk", same="site"
)  # within a group: its own kiosks (explicit kiosks cannot stand at a member's site)
_INHERITED = ("port", "operator", "upstream", "upstreams", "upstream_policy", "allow", "municipality")
_MEMBER_ID = re.compile(r"kiosk-(?P<kiosk>.+)-(?P<k>[0-9]+)|(?:store-router|store-controller|wifi)-(?P<member>.+)")
_GROUP_KINDS = frozenset({"store-router", "store-controller", "wifi", "kiosk"})  # the nodes a group makes


@dataclass
class Expanded:
    """The expansion's result, for the loader: explicit nodes still raw (the loader converts and checks
    them as in an explicit file), group members already built."""

    raw_nodes: dict[str, Any]
    raw_lines: list[Any]
    members: dict[str, NodeStruct] = field(default_factory=dict)
    member_lines: list[LineStruct] = field(default_factory=list)
    member_line_paths: list[FieldPath] = field(default_factory=list)
    bulk: set[str] = field(default_factory=set)  # members checked at their template, not one by one
    origins: dict[str, str] = field(default_factory=dict)
    member_paths: dict[FieldPath, FieldPath] = field(default_factory=dict)  # a sample member's path -> its template's


class _Pool:
    def __init__(self, first: int, last: int) -> None:
        self.first, self.last, self.next = first, last, first

    def take(self, count: int) -> int | None:
        if self.next + count - 1 > self.last:
            return None
        start, self.next = self.next, self.next + count
        return start


def _pool(text: str) -> _Pool:
    if "-" in text:
        first, last = (int(ipaddress.IPv4Address(p.strip())) for p in text.split("-", 1))
    else:
        net = ipaddress.IPv4Network(text, strict=True)
        first, last = int(net.network_address), int(net.broadcast_address)
    if not (int(_LOOPBACK.network_address) <= first <= last <= int(_LOOPBACK.broadcast_address)):
        raise ValueError(f"{text!r} is not a range inside 127.0.0.0/8")
    return _Pool(first, last)


def _ip(n: int) -> str:
    return f"{n >> 24}.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"


def _netns_ip(n: int) -> str:
    """`model.derive_netns_address` on an integer: 127.A.B.C -> 198.18.B.C (198.19 when A is odd)."""
    return f"198.{18 + ((n >> 16) & 1)}.{(n >> 8) & 255}.{n & 255}"


def member_names(text: str) -> list[str]:
    """ "a[001-003]" -> ["a001", "a002", "a003"]; the width of the first number pads every member."""
    m = _RANGE.fullmatch(text)
    if m is None:
        raise ValueError(f"{text!r} is not a range like a[00001-21000]")
    start, end = int(m[2]), int(m[3])
    if end < start:
        raise ValueError(f"range {text!r} ends before it starts")
    width = len(m[2]) if m[2].startswith("0") else 0
    return [f"{m[1]}{i:0{width}d}{m[4]}" for i in range(start, end + 1)]


def _role_text(role: Role) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in msgspec.structs.asdict(role).items() if v is not None) + "}"


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, (str, dict)) else value


def _normalize_allow(raw: Any) -> Any:
    """`from: x` is short for `from: [x]`, a role too."""
    if not isinstance(raw, list):
        return raw
    return [{**r, "from": _as_list(r["from"])} if isinstance(r, dict) and "from" in r else r for r in raw]


class _Expansion:
    def __init__(
        self, data: dict[str, Any], file: str, report: Report, convert: Convert, line_of: Callable[[FieldPath], int]
    ):
        self.data, self.file, self.report, self.convert, self.line_of = data, file, report, convert, line_of
        self.out = Expanded(raw_nodes={}, raw_lines=[])
        self.pools: dict[str, _Pool] = {}
        self._origin_text: dict[FieldPath, str] = {}
        self._indexed_kinds: set[str] = set()
        self.broken_groups = False
        self._claimed_members: dict[
            str, list[tuple[str, int]]
        ] = {}  # member name -> (the clash to report, kiosk number or 0: all)
        self._claims_indexed = False
        self.used: set[FieldPath] = set()  # inherited fields some node took, e.g. ("kinds", "kiosk", "upstream")
        # role indexes over every node: (kind) / (kind, "site", site) / (kind, "operator", op) -> ids
        self.index: dict[tuple[str, ...], list[str]] = {}

    # -- inheritance ------------------------------------------------------------------------

    def _fields(self, raw: Any, path: FieldPath) -> dict[str, Any]:
        """A NodeFields mapping as written (validated by conversion, reported at its own lines)."""
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            self.report(path, "expected a mapping of node fields")
            return {}
        fields: dict[str, Any] = {**raw, "allow": _normalize_allow(raw["allow"])} if "allow" in raw else dict(raw)
        if self.convert(fields, NodeFields, path) is None:
            return {}
        return fields

    def run(self) -> Expanded:
        d = self.data
        self.defaults = self._fields(d.get("defaults"), ("defaults",))
        kinds = d.get("kinds") or {}
        self.kinds: dict[str, dict[str, Any]] = {}
        if isinstance(kinds, dict):
            for kind, raw in kinds.items():
                if self.convert(kind, NodeKind, ("kinds", kind)) is not None:
                    self.kinds[kind] = self._fields(raw, ("kinds", kind))
        else:
            self.report(("kinds",), "expected a mapping of node kind -> fields")
        line_kinds = self.convert(d.get("line_kinds") or {}, dict[LineKind, LineFields], ("line_kinds",)) or {}
        self.line_impair = {k: v.impair for k, v in line_kinds.items()}
        for name, text in (d.get("pools") or {}).items():
            try:
                self.pools[name] = _pool(str(text))
            except ValueError as e:
                self.report(("pools", name), str(e))
        self._check_pool_overlap()

        raw_nodes = d.get("nodes") or {}
        if isinstance(raw_nodes, dict):
            for node_id, raw in raw_nodes.items():
                self.out.raw_nodes[node_id] = self._inherit(node_id, raw)
        else:
            self.out.raw_nodes = raw_nodes  # the loader says what is wrong with it
        self._explicit_lines(d.get("lines"))

        self._index_explicit()
        built: list[tuple[str, StoreGroup, list[str], int, list[int]]] = []
        for name, raw in (d.get("groups") or {}).items():
            group = self.convert(raw, StoreGroup, ("groups", name))
            if group is not None:
                placed = self._place(name, group)
                if placed is not None and self._buildable(name, group) and self._ids_free(name, placed[0], placed[2]):
                    built.append((name, group, *placed))
                else:
                    self.broken_groups = (
                        True  # roles that would match its members stay quiet: one problem, not a cascade
                    )
        self.built = built
        self._municipalities(d.get("municipalities"))
        for name, group, members, start, kiosks in built:
            self._build_group(name, group, members, start, kiosks)
        self._resolve_explicit_roles()
        self._check_explicit_outside_pools()
        self._check_unused_fields(built)
        return self.out

    def _check_unused_fields(self, built: list[tuple[str, StoreGroup, list[str], int, list[int]]]) -> None:
        """A field under `defaults` or `kinds` that no node takes is a mistake the file cannot show:
        a kiosk's allow-list, a group member's upstream. Each is a problem at its own line."""
        if self.broken_groups:
            return  # the broken group's members would have taken some: one problem, not a cascade
        levels: list[tuple[FieldPath, str | None, dict[str, Any]]] = [(("defaults",), None, self.defaults)]
        levels += [(("kinds", kind), kind, fields) for kind, fields in self.kinds.items()]
        levels += [
            (("groups", name, "kinds", kind), kind, msgspec.to_builtins(fields))
            for name, group, *_ in built
            for kind, fields in group.kinds.items()
        ]
        for path, kind, fields in levels:
            for key in _INHERITED:
                if fields.get(key) is None or path + (key,) in self.used:
                    continue
                if kind is not None and kind not in SERVER_KINDS and key in ("port", "allow"):
                    why = f"a {kind} does not listen"
                elif path[0] == "groups" and kind not in _GROUP_KINDS:
                    why = f"a group makes no {kind}"
                elif path[0] == "groups" or (kind in _GROUP_KINDS and key not in ("port", "allow")):
                    takes = "only port and allow" if kind in SERVER_KINDS else "nothing"
                    why = f"a group's {kind}s take {takes} from kinds; the rest comes from the group"
                else:
                    why = "every node it would apply to sets its own, or there is none"
                self.report(path + (key,), f"has no effect: {why}")

    def _check_explicit_outside_pools(self) -> None:
        """Members are unique by construction; an explicit node could still sit on a member's address."""
        taken = [(p.first, p.next - 1, name) for name, p in self.pools.items() if p.next > p.first]
        if not taken or not isinstance(self.out.raw_nodes, dict):
            return
        for node_id, raw in self.out.raw_nodes.items():
            try:
                at = int(ipaddress.IPv4Address(raw.get("address"))) if isinstance(raw, dict) else None
            except ValueError:
                continue
            for first, last, name in taken:
                if at is not None and first <= at <= last:
                    self.report(
                        ("nodes", node_id, "address"),
                        f"address {raw['address']} is inside pool {name}, given to a group's members",
                    )

    def _check_pool_overlap(self) -> None:
        spans = sorted((p.first, p.last, name) for name, p in self.pools.items())
        for (_, last, a), (first, _, b) in zip(spans, spans[1:], strict=False):
            if first <= last:
                self.report(("pools", b), f"pool {b} overlaps pool {a}")

    def _inherit(self, node_id: str, raw: Any) -> Any:
        if not isinstance(raw, dict):
            return raw
        kind = raw.get("kind")
        merged: dict[str, Any] = {}
        taken: dict[str, FieldPath] = {}
        levels: tuple[tuple[dict[str, Any], FieldPath], ...] = (
            (self.defaults, ("defaults",)),
            (self.kinds.get(kind, {}), ("kinds", kind)) if isinstance(kind, str) else ({}, ()),
        )
        for level, where in levels:
            for key in _INHERITED:
                if key in level and key not in raw:
                    if key in ("port", "allow") and kind not in SERVER_KINDS:
                        continue
                    merged[key] = level[key]
                    taken[key] = where + (key,)
        self.used.update(taken.values())
        origin = taken.get("allow")
        merged.update(raw)
        if "allow" in raw:
            merged["allow"] = _normalize_allow(raw["allow"])
        if (
            "upstreams" in merged
            and "upstream" not in merged
            and isinstance(merged["upstreams"], list)
            and merged["upstreams"]
        ):
            merged["upstream"] = merged["upstreams"][0]
        if origin is not None:
            merged["__origin__"] = origin
        return merged

    def _explicit_lines(self, raw_lines: Any) -> None:
        if not isinstance(raw_lines, list):
            self.out.raw_lines = raw_lines
            return
        for raw in raw_lines:
            if isinstance(raw, dict) and "impair" not in raw:
                impair = self.line_impair.get(raw.get("kind", "lan"))
                if impair is not None and impair != Impairment():
                    raw = {**raw, "impair": msgspec.to_builtins(impair)}
            self.out.raw_lines.append(raw)

    # -- groups -----------------------------------------------------------------------------

    def _place(self, name: str, group: StoreGroup) -> tuple[list[str], int, list[int]] | None:
        path: FieldPath = ("groups", name)
        try:
            members = member_names(group.range)
        except ValueError as e:
            self.report(path + ("range",), str(e))
            return None
        lay = group.layout
        if isinstance(group.kiosks, int):
            kiosks = [group.kiosks] * len(members)
        else:
            mix = group.kiosks
            if len(mix.counts) != len(mix.weights) or not mix.counts or min(mix.weights) < 0 or sum(mix.weights) <= 0:
                self.report(path + ("kiosks",), "counts and weights must be non-empty lists of the same length")
                return None
            rng = random.Random(mix.seed)
            total = sum(mix.weights)
            cuts = [sum(mix.weights[: i + 1]) / total for i in range(len(mix.weights))]
            kiosks = []
            for _ in members:
                r = rng.random()
                kiosks.append(next((c for c, cut in zip(mix.counts, cuts, strict=True) if r < cut), mix.counts[-1]))
        most = max(kiosks, default=0)
        if min(kiosks, default=1) < 1:
            self.report(path + ("kiosks",), "a store needs at least one kiosk")
            return None
        offsets = [lay.store_router, lay.store_controller, lay.wifi] + [lay.kiosk + k for k in range(most)]
        if len(set(offsets)) != len(offsets) or min(offsets) < 0 or max(offsets) >= lay.block:
            self.report(
                path + ("layout",),
                f"offsets must be distinct and inside the block of {lay.block} ({most} kiosks from offset {lay.kiosk})",
            )
            return None
        pool = self.pools.get(group.pool)
        if pool is None:
            self.report(
                path + ("pool",),
                f"unknown pool {group.pool!r}" + (f"; pools: {', '.join(self.pools)}" if self.pools else ""),
            )
            return None
        need = len(members) * lay.block
        start = pool.take(need)
        if start is None:
            left = pool.last - pool.next + 1
            self.report(
                path + ("range",),
                f"{len(members)} stores x {lay.block} addresses = {need} overflow pool {group.pool} ({left} of {pool.last - pool.first + 1} addresses left)",
            )
            return None
        return members, start, kiosks

    def _buildable(self, name: str, group: StoreGroup) -> bool:
        """What `_build_group` needs, checked before any role can count the group's members."""
        self._current = name
        path: FieldPath = ("groups", name)
        if not (group.upstreams or group.upstream):
            self.report(path + ("upstream",), "a store group needs an upstream: its EC router")
            return False
        fields = {k: self._member_fields(group, k) for k in ("store-router", "store-controller", "wifi", "kiosk")}
        for kind, (merged, _) in fields.items():
            if kind in SERVER_KINDS and merged.get("port") is None:
                self.report(path, f"the group's {kind}s need a port (set defaults.port or kinds.{kind}.port)")
                return False
        return all(
            self._allow_templates(merged.get("allow"), where.get("allow")) is not None
            for merged, where in fields.values()
        )

    def _ids_free(self, name: str, members: list[str], kiosks: list[int]) -> bool:
        """Whether the ids the group derives are its own. Checked before building, so that a clash is
        one problem at the range and the group is not half made (a cascade of follow-on problems)."""
        claimed = self._claimed_members
        if not self._claims_indexed:  # once: explicit ids that have a member's shape
            self._claims_indexed = True
            for node_id in self.out.raw_nodes if isinstance(self.out.raw_nodes, dict) else ():
                if m := _MEMBER_ID.fullmatch(node_id):
                    where = f"derived id {node_id!r} is already taken by the node on line {self.line_of(('nodes', node_id))}"
                    claimed.setdefault(m["kiosk"] or m["member"], []).append((where, int(m["k"] or 0)))
        for member, count in zip(members, kiosks, strict=True):
            for where, k in claimed.get(member, ()):
                if k <= count:  # kiosk-<m>-<k> clashes only when the member has k kiosks
                    self.report(("groups", name, "range"), where)
                    return False
        line = self.line_of(("groups", name, "range"))
        for member in members:
            claimed.setdefault(member, []).append(
                (f"derived id 'store-router-{member}' is already taken by group {name} (line {line})", 0)
            )
        return True

    def _member_fields(self, group: StoreGroup, kind: str) -> tuple[dict[str, Any], dict[str, FieldPath]]:
        """defaults < kinds < the group's kinds, converted; and where each allow-list came from."""
        merged: dict[str, Any] = {}
        where: dict[str, FieldPath] = {}
        levels = [(self.defaults, ("defaults",)), (self.kinds.get(kind, {}), ("kinds", kind))]
        own = group.kinds.get(cast(NodeKind, kind))
        if own is not None:
            levels.append((msgspec.to_builtins(own), ("groups", self._current, "kinds", kind)))
        for level, path in levels:
            for key in _INHERITED:
                if key in level and level[key] is not None:
                    if key in ("port", "allow") and kind not in SERVER_KINDS:
                        continue
                    merged[key] = level[key]
                    where[key] = path + (key,)
        return merged, where

    def _build_group(self, name: str, group: StoreGroup, members: list[str], start: int, kiosks: list[int]) -> None:
        self._current = name
        path: FieldPath = ("groups", name)
        lay = group.layout
        op = group.operator
        hops = tuple(group.upstreams or ((group.upstream,) if group.upstream else ()))  # _buildable: at least one
        policy = group.upstream_policy or "failover"
        fields = {k: self._member_fields(group, k) for k in ("store-router", "store-controller", "wifi", "kiosk")}
        for _, where in fields.values():
            self.used.update(where[k] for k in ("port", "allow") if k in where)  # all a member takes from kinds
        allow = {k: self._allow_templates(f[0].get("allow"), f[1].get("allow")) or [] for k, f in fields.items()}
        nodes, lines = self.out.members, self.out.member_lines
        raw_nodes = self.out.raw_nodes if isinstance(self.out.raw_nodes, dict) else {}
        bulk_add = self.out.bulk.add
        line_paths = self.out.member_line_paths
        imp = self.line_impair
        no_imp = Impairment()
        closed_imp, lan_imp, wifi_imp = (imp.get(k, no_imp) for k in ("closed-line", "lan", "wifi"))
        range_path = path + ("range",)
        rport, cport = fields["store-router"][0]["port"], fields["store-controller"][0]["port"]
        first = True
        for index, m in enumerate(members):
            base = start + index * lay.block
            site = f"store-{m}"
            router, ctl, wifi = f"store-router-{m}", f"store-controller-{m}", f"wifi-{m}"
            kiosk_ids = [f"kiosk-{m}-{k}" for k in range(1, kiosks[index] + 1)]
            r_at, c_at, w_at = base + lay.store_router, base + lay.store_controller, base + lay.wifi
            made = [
                NodeStruct(
                    router,
                    "store-router",
                    site,
                    _ip(r_at),
                    netns_address=_netns_ip(r_at),
                    port=rport,
                    upstream=hops[0],
                    upstreams=hops if len(hops) > 1 else (),
                    upstream_policy=policy,
                    operator=op,
                    allow=self._rules(router, site, op, allow["store-router"], kiosk_ids, first),
                ),
                NodeStruct(
                    ctl,
                    "store-controller",
                    site,
                    _ip(c_at),
                    netns_address=_netns_ip(c_at),
                    port=cport,
                    operator=op,
                    allow=self._rules(ctl, site, op, allow["store-controller"], kiosk_ids, first),
                    **(store_admin("store-controller", ctl) if group.admin else {}),
                ),
                NodeStruct(wifi, "wifi", f"wifi-{m}", _ip(w_at), netns_address=_netns_ip(w_at), operator=op),
            ]
            for k, kid in enumerate(kiosk_ids):
                a = base + lay.kiosk + k
                made.append(
                    NodeStruct(
                        kid,
                        "kiosk",
                        site,
                        _ip(a),
                        netns_address=_netns_ip(a),
                        upstream=router,
                        operator=op,
                        **(store_admin("kiosk", ctl) if group.admin else {}),
                    )
                )
            for node in made:
                if node.id in nodes or node.id in raw_nodes:
                    self.report(range_path, f"derived id {node.id!r} is already taken")
                    self.broken_groups = True
                    return
                nodes[node.id] = node
                if not first:
                    bulk_add(node.id)
            for j, hop in enumerate(hops):
                lines.append(
                    LineStruct(
                        f"closed-{m}" if j == 0 else f"closed-{m}-{j + 1}", router, hop, "closed-line", closed_imp
                    )
                )
            for k, kid in enumerate(kiosk_ids, 1):
                lines.append(LineStruct(f"lan-{m}-k{k}", kid, router, "lan", lan_imp))
            lines.append(LineStruct(f"lan-{m}-ctl", ctl, router, "lan", lan_imp))
            for k, kid in enumerate(kiosk_ids, 1):
                lines.append(LineStruct(f"lan-{m}-k{k}-ctl", kid, ctl, "lan", lan_imp))
            lines.append(LineStruct(f"wifi-{m}", wifi, router, "wifi", wifi_imp))
            line_paths.extend([range_path] * (len(lines) - len(line_paths)))
            if first:
                for node in made:
                    self.out.member_paths[("nodes", node.id)] = range_path
                    for i in range(len(node.allow)):
                        src = fields[node.kind][1].get("allow")
                        if src is not None:
                            self.out.member_paths[("nodes", node.id, "allow", i)] = src + (i,)
            first = False

    def _allow_templates(self, raw: Any, where: FieldPath | None) -> list[tuple[AllowTemplate, FieldPath]] | None:
        if raw is None:
            return []
        converted = self.convert(raw, tuple[AllowTemplate, ...], where or ())
        if converted is None:
            return None
        return [(t, (where or ()) + (i,)) for i, t in enumerate(converted)]

    def _rules(
        self,
        node_id: str,
        site: str,
        operator: str | None,
        templates: list[tuple[AllowTemplate, FieldPath]],
        site_kiosks: list[str],
        first: bool,
    ) -> tuple[AllowStruct, ...]:
        rules = []
        origins = self.out.origins
        for i, (t, where) in enumerate(templates):
            origin = self._origin_text.get(where)
            if origin is None:
                origin = self._origin_text[where] = f"{self.file}:{self.line_of(where)}"
            if len(t.sources) == 1 and t.sources[0] == _THE_STORES_KIOSKS:
                rules.append(
                    AllowStruct(tuple(site_kiosks), t.requests, t.port, t.proto)
                )  # the common case, no look-up
                origins[f"nodes.{node_id}.allow[{i}]"] = origin
                continue
            sources: list[str] = []
            for j, source in enumerate(t.sources):
                if isinstance(source, str):
                    sources.append(source)
                elif (
                    source.kind == "kiosk"
                    and source.same == "site"
                    and source.group is None
                    and source.operator is None
                ):
                    sources.extend(
                        site_kiosks
                    )  # the common case, without a look-up; explicit kiosks at a store site are not allowed
                else:
                    sources.extend(self._resolve(source, site, operator, where + ("from", j), first))
            rules.append(AllowStruct(tuple(sources), t.requests, t.port, t.proto))
            origins[f"nodes.{node_id}.allow[{i}]"] = origin
        return tuple(rules)

    # -- roles ------------------------------------------------------------------------------

    def _add_index(self, node_id: str, kind: str, site: str | None, operator: str | None, group: str | None) -> None:
        idx = self.index
        idx.setdefault((kind,), []).append(node_id)
        if site is not None:
            idx.setdefault((kind, "site", site), []).append(node_id)
        if operator is not None:
            idx.setdefault((kind, "operator", operator), []).append(node_id)
        if group is not None:
            idx.setdefault((kind, "group", group), []).append(node_id)

    def _index_explicit(self) -> None:
        if isinstance(self.out.raw_nodes, dict):
            for node_id, raw in self.out.raw_nodes.items():
                if isinstance(raw, dict) and isinstance(raw.get("kind"), str):
                    self._add_index(node_id, raw["kind"], raw.get("site"), raw.get("operator"), None)

    def _ensure_group_index(self, kind: str) -> None:
        """Roles other than "the kiosks of this store" need a group's members indexed: done once per kind, on demand."""
        if kind in self._indexed_kinds:
            return
        self._indexed_kinds.add(kind)
        add = self._add_index
        for name, group, members, _, kiosks in self.built:
            op = group.operator
            for m, count in zip(members, kiosks, strict=True):
                if kind == "kiosk":
                    for k in range(1, count + 1):
                        add(f"kiosk-{m}-{k}", "kiosk", f"store-{m}", op, name)
                elif kind == "wifi":
                    add(f"wifi-{m}", "wifi", f"wifi-{m}", op, name)
                elif kind in ("store-router", "store-controller"):
                    add(f"{kind}-{m}", kind, f"store-{m}", op, name)

    def _resolve(self, role: Role, site: str | None, operator: str | None, where: FieldPath, report: bool) -> list[str]:
        groups = self.data.get("groups") or {}
        if role.group is not None and role.group not in groups:
            if report:
                self.report(
                    where,
                    f"template names an unknown group {role.group!r}"
                    + (f"; groups: {', '.join(groups)}" if groups else ""),
                )
            return []
        if role.kind is None:
            if report:
                self.report(where, "a role needs a kind")
            return []
        self._ensure_group_index(role.kind)
        kind = role.kind
        keys: list[tuple[str, ...]] = []
        if role.same == "site":
            keys.append((kind, "site", site or ""))
        if role.same == "operator":
            keys.append((kind, "operator", operator or ""))
        if role.operator is not None:
            keys.append((kind, "operator", role.operator))
        if role.group is not None:
            keys.append((kind, "group", role.group))
        lists = [self.index.get(k, []) for k in keys] or [self.index.get((kind,), [])]
        ids = lists[0]
        if len(lists) > 1:
            rest = set.intersection(*(set(x) for x in lists[1:]))
            ids = [n for n in ids if n in rest]
        if not ids and report and not self.broken_groups:
            self.report(where, f"role {_role_text(role)} matches no node")
        return list(ids)

    def _resolve_explicit_roles(self) -> None:
        if not isinstance(self.out.raw_nodes, dict):
            return
        for node_id, raw in self.out.raw_nodes.items():
            if not isinstance(raw, dict):
                continue
            origin = raw.pop("__origin__", None)
            rules = raw.get("allow")
            if not isinstance(rules, list):
                continue
            base: FieldPath = origin or ("nodes", node_id, "allow")
            out = []
            for i, rule in enumerate(rules):
                if not isinstance(rule, dict) or not isinstance(rule.get("from"), list):
                    out.append(rule)
                    continue
                sources: list[Any] = []
                templated = origin is not None
                for j, source in enumerate(rule["from"]):
                    if isinstance(source, dict):
                        templated = True
                        role = self.convert(source, Role, base + (i, "from", j))
                        if role is not None:
                            sources.extend(
                                self._resolve(role, raw.get("site"), raw.get("operator"), base + (i, "from", j), True)
                            )
                    else:
                        sources.append(source)
                if templated and not sources and self.broken_groups:
                    continue  # its roles would have matched the broken group's members: that group's problem stands for it
                if templated:
                    self.out.origins[f"nodes.{node_id}.allow[{len(out)}]"] = f"{self.file}:{self.line_of(base + (i,))}"
                out.append({**rule, "from": sources})
            raw["allow"] = out

    # -- municipalities ---------------------------------------------------------------------

    def _municipalities(self, raw: Any) -> None:
        if raw is None:
            return
        path: FieldPath = ("municipalities",)
        gen = self.convert(raw, MunicipalityGenerator, path)
        if gen is None:
            return
        pool = self.pools.get(gen.pool)
        if pool is None:
            self.report(path + ("pool",), f"unknown pool {gen.pool!r}")
            return
        start = pool.take(gen.count)
        if start is None:
            self.report(
                path + ("count",),
                f"{gen.count} municipalities overflow pool {gen.pool} ({pool.last - pool.next + 1} addresses left)",
            )
            return
        participating = gen.count if gen.participating is None else gen.participating
        if not 0 <= participating <= gen.count:
            self.report(path + ("participating",), f"must be between 0 and count ({gen.count})")
            return
        merged, where = self._member_fields(StoreGroup("x[1-1]", "", ""), "municipality")
        self.used.update(where[k] for k in ("port", "allow") if k in where)  # the generator makes the rest
        if merged.get("port") is None:
            self.report(path, "municipalities need a port (set defaults.port or kinds.municipality.port)")
            return
        rng = random.Random(gen.seed)
        order = sorted(range(gen.count), key=lambda _: rng.random())
        takes_part = set(order[:participating])
        templates = self._allow_templates(merged.get("allow"), where.get("allow"))
        if templates is None:
            return
        ids = [gen.id.format(n=n) for n in range(1, gen.count + 1)]
        raw_nodes = self.out.raw_nodes if isinstance(self.out.raw_nodes, dict) else {}
        if (clash := next((x for x in ids if x in raw_nodes or x in self.out.members), None)) is not None:
            self.report(
                path + ("id",), f"derived id {clash!r} is already taken"
            )  # before building: one problem, none half made
            return
        if len(set(ids)) < len(ids):
            self.report(path + ("id",), f"{gen.id!r} derives the same id twice; put {{n}} in it")
            return
        no_imp = Impairment()
        for i, node_id in enumerate(ids):
            n = i + 1
            site = gen.site.format(n=n)
            pref = 1 + i * 47 // gen.count  # spread over the 47 prefectures, as JIS X 0401 numbers them
            city = 100 + i - (((pref - 1) * gen.count + 46) // 47)
            code5 = f"{pref:02d}{city:03d}"
            check = (11 - sum(int(c) * w for c, w in zip(code5, (6, 5, 4, 3, 2), strict=True)) % 11) % 10  # JIS X 0402
            hours = gen.hours[int(rng.random() * len(gen.hours))]
            fees = {kind: fees[int(rng.random() * len(fees))] for kind, fees in gen.certificates.items() if fees}
            muni = Municipality(f"{code5}{check}", i in takes_part, None, None, hours, fees)
            rules = self._rules(node_id, site, None, templates, [], i == 0)
            node = NodeStruct(
                node_id,
                "municipality",
                site,
                _ip(start + i),
                netns_address=_netns_ip(start + i),
                port=merged["port"],
                allow=rules,
                municipality=muni,
            )
            self.out.members[node_id] = node
            self._add_index(node_id, "municipality", site, None, None)
            if i:
                self.out.bulk.add(node_id)
            else:
                self.out.member_paths[("nodes", node_id)] = path
                for r in range(len(rules)):
                    self.out.member_paths[("nodes", node_id, "allow", r)] = templates[r][1]
            for c, center in enumerate(gen.center):
                line_id = f"lgwan-{site.removeprefix('lgwan-')}" + (f"-{c + 1}" if c else "")
                self.out.member_lines.append(
                    LineStruct(
                        line_id,
                        center,
                        node_id,
                        "lgwan",
                        gen.impair if gen.impair != no_imp else self.line_impair.get("lgwan", no_imp),
                    )
                )
                self.out.member_line_paths.append(path)


def expand(
    data: dict[str, Any], file: str, report: Report, convert: Convert, line_of: Callable[[FieldPath], int]
) -> Expanded:
    """The compact file `data` written out: explicit nodes raw for the loader, group members built."""
    return _Expansion(data, file, report, convert, line_of).run()


def is_compact(data: Any) -> bool:
    return isinstance(data, dict) and not COMPACT_FIELDS.isdisjoint(data)
