"""Read a topology file into `model.Topology`, reporting every problem with file, line and field.

Three passes, each collecting problems rather than stopping at the first:
1. YAML -> plain data, remembering the line of every mapping key and list item;
2. plain data -> typed structs (msgspec), one node / line at a time so one bad node does not
   hide the others;
3. meaning: references, addresses, lines, allow-lists, business data, then the security-annex
   audit from `topology.policy`, whose problems name the requirement they break.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any, TypeVar, overload

import msgspec
import yaml

from topology.policy import compiler as policy
from topology.spec import expand as compact
from topology.spec.kinds import KINDS
from topology.spec.model import (
    ADMIN_KINDS,
    LIMIT_SCOPES,
    RELAY_KINDS,
    VACCINATION_FEE,
    Hours,
    Limits,
    Line,
    Mode,
    Municipality,
    Node,
    TlsVersion,
    Topology,
    UpstreamConnections,
    field_path,
)

DEFAULT_TOPOLOGY = Path(__file__).parent.parent / "default.yaml"  # topology/default.yaml, where users find it

FieldPath = tuple[str | int, ...]

_LOOPBACK = ipaddress.IPv4Network("127.0.0.0/8")
_NETNS = ipaddress.IPv4Network("198.18.0.0/15")
_NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")  # also a TLS identity and a netns name part
_HHMM = re.compile(r"(?:[01][0-9]|2[0-3]):[0-5][0-9]")
_TOP_FIELDS = {f.encode_name for f in msgspec.structs.fields(Topology)} - {"source", "rule_origins"}
_FORWARDING_KINDS = frozenset(k.name for k in KINDS.values() if k.upstream is not None)


@dataclass(frozen=True)
class Problem:
    file: str
    line: int  # 1-based; 0 when the problem is the file itself
    field: str
    message: str
    rule: str | None = None  # the security-annex requirement broken, e.g. "SEC-SN-3"

    def __str__(self) -> str:
        text = f"{self.file}:{self.line}: {self.field}: {self.message}"
        return f"{text} [{self.rule}]" if self.rule else text


class TopologyError(Exception):
    """A topology file with problems; `str()` lists them one per line."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


def load_topology(path: str | Path) -> Topology:
    """The file's topology, or `TopologyError` with every problem in it."""
    topo, problems = _load(Path(path))
    if problems or topo is None:
        raise TopologyError(problems)
    return topo


def check_file(path: str | Path) -> list[Problem]:
    """Every problem in the file, in line order; empty when it is good."""
    return _load(Path(path))[1]


def read_yaml(path: str | Path) -> Any:
    """The file as plain data, with the scalars the loader reads (what `konbini schema` describes)."""
    return yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader


def load_checked(path: str | Path) -> tuple[Topology | None, list[Problem]]:
    """The file's topology (None when it has a problem) and every problem in it, in line order."""
    return _load(Path(path))


# ---------------------------------------------------------------------------------------------
# Pass 1: YAML with line numbers.


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core-schema scalars. YAML 1.1 would read `19:00` as the integer
    1140 and `no` as false, which turns opening hours and ids into surprises."""


_Loader.yaml_implicit_resolvers = {}
for _tag, _pattern, _first in (
    ("null", r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
    ("bool", r"^(?:true|True|TRUE|false|False|FALSE)$", list("tTfF")),
    ("int", r"^(?:[-+]?(?:0|[1-9][0-9]*)|0x[0-9a-fA-F]+)$", list("-+0123456789")),
    ("float", r"^(?:[-+]?(?:\.[0-9]+|[0-9]+\.[0-9]*|[0-9]+)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$",
     list("-+0123456789.")),
):  # fmt: skip
    _Loader.add_implicit_resolver(f"tag:yaml.org,2002:{_tag}", re.compile(_pattern), _first)


class _Document:
    """The file being checked: the line of every field it spells out, and the problems found so far."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.lines: dict[FieldPath, int] = {}
        self.problems: list[Problem] = []

    def line_of(self, path: FieldPath) -> int:
        """The line of `path`, or of its nearest ancestor the file spells out."""
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return 1

    def report(self, path: FieldPath, message: str, rule: str | None = None) -> None:
        self.problems.append(Problem(self.file, self.line_of(path), field_path(path) or "document", message, rule))

    def read(self, path: Path) -> Any:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            self.problems.append(Problem(self.file, 0, "file", f"cannot read: {getattr(e, 'strerror', None) or e}"))
            return None
        loader = _Loader(text)
        try:
            root = loader.get_single_node()
            if root is None:
                self.problems.append(Problem(self.file, 1, "document", "the file is empty"))
                return None
            return self._plain(loader, root, (), set())
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            line = mark.line + 1 if mark else 1
            message = ": ".join(str(m) for m in (e.context, e.problem) if m)
            self.problems.append(Problem(self.file, line, "yaml", message or "syntax error"))
            return None
        finally:
            loader.dispose()

    def _plain(self, loader: _Loader, node: yaml.Node, path: FieldPath, active: set[int]) -> Any:
        if id(node) in active:
            self.report(path, "recursive alias")
            return None
        if isinstance(node, yaml.ScalarNode):
            return loader.construct_object(node, deep=True)
        active = active | {id(node)}
        if isinstance(node, yaml.SequenceNode):
            items = []
            for index, item in enumerate(node.value):
                self.lines[path + (index,)] = item.start_mark.line + 1
                items.append(self._plain(loader, item, path + (index,), active))
            return items
        assert isinstance(node, yaml.MappingNode)
        mapping: dict[str, Any] = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                self.problems.append(
                    Problem(self.file, line, field_path(path) or "document", "keys must be plain strings")
                )
                continue
            key = key_node.value  # as written: a key is a name, never a number or a boolean
            if key in mapping:
                self.problems.append(Problem(self.file, line, field_path(path + (key,)), "duplicate key"))
                continue
            self.lines[path + (key,)] = line
            mapping[key] = self._plain(loader, value_node, path + (key,), active)
        return mapping


# ---------------------------------------------------------------------------------------------
# Pass 2: plain data -> structs.

_MSGSPEC_AT = re.compile(r"^(.*) - at `\$(.*)`$", re.S)
_MSGSPEC_STEP = re.compile(r"\.([^.\[]+)|\[(\d+)\]|\[\.\.\.\]")
_MSGSPEC_FIELD = re.compile(r"(?:unknown|missing required) field `([^`]+)`")

_T = TypeVar("_T")


@overload
def _convert(doc: _Document, value: Any, type_: type[_T], path: FieldPath) -> _T | None: ...
@overload
def _convert(doc: _Document, value: Any, type_: Any, path: FieldPath) -> Any: ...  # a union or a Literal


def _convert(doc: _Document, value: Any, type_: Any, path: FieldPath) -> Any:
    try:
        return msgspec.convert(value, type_)
    except msgspec.ValidationError as e:
        message, where = str(e), ""
        if m := _MSGSPEC_AT.match(message):
            message, where = m[1], m[2]
        steps: list[str | int] = []
        for step in _MSGSPEC_STEP.finditer(where):
            if step[0] == "[...]":  # msgspec does not name dict keys; stop at the dict
                break
            steps.append(step[1] if step[1] is not None else int(step[2]))
        full = path + tuple(steps)
        if m := _MSGSPEC_FIELD.search(message):  # the field path names it; say what is wrong
            full += (m[1],)
            message = "unknown field" if "unknown" in message else "missing required field"
        doc.report(full, message)
        return None


def _kind(value: Any) -> str:
    return "nothing" if value is None else type(value).__name__


def _drop_bad_fees(doc: _Document, raw: dict[str, Any], path: FieldPath) -> None:
    """Report and drop bad fees before conversion: msgspec's message would not say which certificate type."""
    muni = raw.get("municipality")
    certificates = muni.get("certificates") if isinstance(muni, dict) else None
    if not isinstance(certificates, dict):
        return
    for kind, fee in list(certificates.items()):
        where = path + ("municipality", "certificates", kind)
        if not isinstance(fee, int) or isinstance(fee, bool):
            doc.report(where, f"fee must be a whole number of yen, got {fee!r}")
        elif fee < 0:
            doc.report(where, f"fee must not be negative, got {fee}")
        else:
            continue
        del certificates[kind]


def _node(doc: _Document, node_id: str, raw: Any) -> Node | None:
    path: FieldPath = ("nodes", node_id)
    if not _NODE_ID.fullmatch(node_id):
        doc.report(path, "node id must be 1-63 letters, digits, '-' or '_', starting with a letter or digit")
    if not isinstance(raw, dict):
        doc.report(path, f"expected the node's fields, got {_kind(raw)}")
        return None
    if raw.get("id", node_id) != node_id:
        doc.report(path + ("id",), f"id {raw['id']!r} differs from the key {node_id!r}; leave it out")
    raw = {**raw, "id": node_id}
    upstreams = raw.get("upstreams")
    if isinstance(upstreams, list) and upstreams and "upstream" not in raw:
        raw["upstream"] = upstreams[0]  # several upstreams: `upstream` is the first, for one-hop readers
    if isinstance(raw.get("allow"), list):
        raw["allow"] = [
            {**rule, "from": [rule["from"]]} if isinstance(rule, dict) and isinstance(rule.get("from"), str) else rule
            for rule in raw["allow"]
        ]  # `from: x` is short for `from: [x]`
    _drop_bad_fees(doc, raw, path)
    return _convert(doc, raw, Node, path)


def _limits(doc: _Document, raw: Any) -> dict[str, Limits]:
    """`limits: {defaults: {...}, <node kind>: {...}}`; a kind's fields override the file's defaults."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        doc.report(("limits",), f"expected a mapping of defaults / node kind -> limits, got {_kind(raw)}")
        return {}
    defaults = _convert(doc, raw.get("defaults") or {}, Limits, ("limits", "defaults")) or Limits()
    out = {"defaults": defaults}
    for scope, fields in raw.items():
        if scope not in LIMIT_SCOPES:
            doc.report(
                ("limits", scope), f"unknown node kind; expected defaults or one of {', '.join(LIMIT_SCOPES[1:])}"
            )
        elif scope != "defaults" and (own := _convert(doc, fields or {}, Limits, ("limits", scope))) is not None:
            out[scope] = msgspec.structs.replace(defaults, **{k: getattr(own, k) for k in fields or {}})
    return out


def _upstream_connections(doc: _Document, raw: Any) -> dict[str, UpstreamConnections]:
    """`upstream_connections: {<relay kind>: {mode: pooled|paired, ...}}`: how each kind's relays connect."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        doc.report(("upstream_connections",), f"expected a mapping of relay kind -> settings, got {_kind(raw)}")
        return {}
    out = {}
    for kind, fields in raw.items():
        where = ("upstream_connections", kind)
        if kind not in RELAY_KINDS:
            doc.report(where, f"not a relay kind; expected one of {', '.join(sorted(RELAY_KINDS))}")
        elif (own := _convert(doc, fields or {}, UpstreamConnections, where)) is not None:
            out[kind] = own
    return out


@dataclass
class _Parsed:
    topo: Topology
    declared: set[str]  # every node id the file names, including nodes that failed to convert
    line_paths: list[FieldPath]  # where the file spells out topo.lines[i]: ("lines", n), or a group's range
    derived_netns: set[str]  # nodes whose netns address the file leaves out
    bulk: frozenset[str] = frozenset()  # compact-format members checked once at their template (expand.py)
    pooled: frozenset[str] = frozenset()  # compact-format members: addresses from a pool, netns ones derived, unchecked


def _parse(doc: _Document, data: Any, source: str) -> _Parsed | None:
    if not isinstance(data, dict):
        doc.report((), f"expected a mapping with name, nodes and lines, got {_kind(data)}")
        return None
    expanded = None
    if compact.is_compact(data):
        expanded = compact.expand(data, doc.file, doc.report, lambda v, t, p: _convert(doc, v, t, p), doc.line_of)
        for member_path, template_path in expanded.member_paths.items():
            doc.lines[member_path] = doc.line_of(template_path)
    fields = _TOP_FIELDS | compact.COMPACT_FIELDS if expanded is not None else _TOP_FIELDS
    for key in data.keys() - fields:
        doc.report((key,), f"unknown field; expected one of {', '.join(sorted(fields))}")
    for key in ("name", "nodes"):
        if key not in data:
            doc.report((key,), "missing required field")
    name = _convert(doc, data.get("name", ""), str, ("name",))
    state_dir = _convert(doc, data.get("state_dir", ".konbini"), str, ("state_dir",))
    ledger = _convert(doc, data.get("ledger"), str | None, ("ledger",))
    hours = _convert(doc, data.get("service_hours", {}), Hours, ("service_hours",))
    limits = _limits(doc, data.get("limits"))
    upstream_connections = _upstream_connections(doc, data.get("upstream_connections"))
    tls_min = _convert(doc, data.get("tls_min_version", "1.3"), TlsVersion, ("tls_min_version",))
    ocsp_cache = _convert(doc, data.get("ocsp_cache", False), bool, ("ocsp_cache",))

    raw_nodes = (expanded.raw_nodes if expanded is not None else data.get("nodes")) or {}
    if not isinstance(raw_nodes, dict):
        doc.report(("nodes",), f"expected a mapping of node id -> node, got {_kind(raw_nodes)}")
        raw_nodes = {}
    nodes: dict[str, Node] = {}
    derived: set[str] = set()
    for node_id, raw in raw_nodes.items():
        node = _node(doc, node_id, raw)
        if node is None:
            continue
        if node.netns_address is None and _ipv4(node.address) is not None:
            node = msgspec.structs.replace(node, netns_address=node.address_in(Mode.NETNS))
            derived.add(node_id)
        nodes[node_id] = node
    declared = set(raw_nodes)
    if expanded is not None:
        for node_id, node in expanded.members.items():
            nodes.setdefault(node_id, node)
        declared.update(expanded.members)

    raw_lines = (expanded.raw_lines if expanded is not None else data.get("lines")) or []
    if not isinstance(raw_lines, list):
        doc.report(("lines",), f"expected a list of lines, got {_kind(raw_lines)}")
        raw_lines = []
    lines: list[Line] = []
    line_paths: list[FieldPath] = []
    for index, raw in enumerate(raw_lines):
        line = _convert(doc, raw, Line, ("lines", index))
        if line is not None:
            lines.append(line)
            line_paths.append(("lines", index))
    if expanded is not None:
        lines.extend(expanded.member_lines)
        line_paths.extend(expanded.member_line_paths)

    topo = Topology(
        name=name or "",
        nodes=nodes,
        lines=tuple(lines),
        service_hours=hours or Hours(),
        state_dir=state_dir or ".konbini",
        ledger=ledger or None,
        source=source,
        limits=limits,
        upstream_connections=upstream_connections,
        tls_min_version=tls_min or "1.3",
        ocsp_cache=bool(ocsp_cache),
        rule_origins=expanded.origins if expanded is not None else {},
    )
    if expanded is None:
        return _Parsed(topo, declared, line_paths, derived)
    return _Parsed(topo, declared, line_paths, derived, frozenset(expanded.bulk), frozenset(expanded.members))


# ---------------------------------------------------------------------------------------------
# Pass 3: what the structs mean.


def _ipv4(text: str) -> ipaddress.IPv4Address | None:
    try:
        return ipaddress.IPv4Address(text)
    except ValueError:
        return None


def _check_addresses(doc: _Document, parsed: _Parsed) -> None:
    loopback: dict[ipaddress.IPv4Address, str] = {}
    netns: dict[ipaddress.IPv4Address, str] = {}
    bulk = parsed.bulk
    for node in parsed.topo.nodes.values():
        if node.id in bulk:
            continue  # allocated from a pool, block by block: unique by construction
        path: FieldPath = ("nodes", node.id)
        address = _ipv4(node.address)
        if address is None:
            doc.report(path + ("address",), f"{node.address!r} is not an IPv4 address")
        elif address not in _LOOPBACK:
            doc.report(path + ("address",), f"{address} is outside 127.0.0.0/8 (loopback mode)")
        elif address in loopback:
            doc.report(path + ("address",), f"address {address} is already {loopback[address]}'s")
            continue  # its derived netns address repeats the clash; one problem is enough
        else:
            loopback[address] = node.id
        if node.netns_address is None or node.id in parsed.pooled:
            continue  # a pool's members: 198.18.0.0/15 holds 131,072 addresses, a national file far more
        derived = node.id in parsed.derived_netns
        where = path + (("address",) if derived else ("netns_address",))
        what = f"derived netns address {node.netns_address}" if derived else f"netns address {node.netns_address}"
        ns = _ipv4(node.netns_address)
        if ns is None:
            doc.report(where, f"{node.netns_address!r} is not an IPv4 address")
        elif ns not in _NETNS:
            doc.report(where, f"{what} is outside 198.18.0.0/15 (netns mode)")
        elif ns in netns:
            doc.report(where, f"{what} is already {netns[ns]}'s; set netns_address explicitly")
        else:
            netns[ns] = node.id


def _check_node(doc: _Document, parsed: _Parsed, node: Node, joined: set[frozenset[str]]) -> None:
    path: FieldPath = ("nodes", node.id)
    declared = parsed.declared
    if node.is_server and node.port is None:
        doc.report(path + ("port",), f"a {node.kind} is a server and needs a port")
    elif not node.is_server and node.port is not None:
        doc.report(path + ("port",), f"a {node.kind} does not listen; remove the port")
    elif node.port is not None and not 0 < node.port < 65536:
        doc.report(path + ("port",), f"port {node.port} is outside 1-65535")

    if node.kind in _FORWARDING_KINDS:
        if node.upstream is None:
            doc.report(
                path + ("upstream",), f"a {node.kind} needs an upstream: the next hop towards the issuance center"
            )
        if node.upstreams and node.upstream != node.upstreams[0]:
            doc.report(path + ("upstream",), f"upstream {node.upstream} is not the first of upstreams; leave it out")
        if len(set(node.hops)) != len(node.hops):
            doc.report(path + ("upstreams",), "the same upstream is named twice")
        for index, hop in enumerate(node.hops):
            at = path + (("upstreams", index) if node.upstreams else ("upstream",))
            if hop not in declared:
                doc.report(at, f"unknown node {hop!r}")
            elif hop == node.id:
                doc.report(at, "a node cannot be its own upstream")
            elif frozenset((node.id, hop)) not in joined:
                doc.report(at, f"upstream {hop} is not joined to {node.id} by a line")
    elif node.hops:
        doc.report(path + ("upstream",), f"a {node.kind} forwards nothing; remove the upstream")
    if node.upstream_connections is not None and node.kind not in RELAY_KINDS:
        doc.report(path + ("upstream_connections",), f"a {node.kind} relays nothing; remove upstream_connections")

    if node.allow and not node.is_server:
        doc.report(path + ("allow",), f"a {node.kind} does not listen; it cannot have an allow-list")
    for index, rule in enumerate(node.allow):
        where = path + ("allow", index)
        if not rule.sources:
            doc.report(where + ("from",), "empty: allows no one")
        if not rule.requests:
            doc.report(where + ("requests",), "empty: allows nothing")
        if rule.port is not None and not 0 < rule.port < 65536:
            doc.report(where + ("port",), f"port {rule.port} is outside 1-65535")
        elif rule.port is not None and node.port is not None and rule.port != node.port:
            doc.report(where + ("port",), f"port {rule.port} is not the port {node.id} listens on ({node.port})")
        for source_index, source in enumerate(rule.sources):
            at = where + ("from", source_index)
            if source not in declared:
                doc.report(at, f"allow-list entry for an unknown peer {source!r}")
            elif source == node.id:
                doc.report(at, "a node cannot allow itself")
            elif frozenset((node.id, source)) not in joined:
                doc.report(at, f"peer {source} is not joined to {node.id} by a line")
        for request_index, pattern in enumerate(rule.requests):
            try:
                policy.parse_request_pattern(pattern)
            except ValueError as e:
                doc.report(where + ("requests", request_index), str(e))

    if node.kind == "municipality" and node.municipality is None:
        doc.report(path + ("municipality",), "a municipality node needs municipality: data (code, hours, certificates)")
    elif node.kind != "municipality" and node.municipality is not None:
        doc.report(path + ("municipality",), f"a {node.kind} is not a municipality; remove municipality:")
    if node.municipality is not None:
        _check_hours(doc, node.municipality.hours, path + ("municipality", "hours"))
        _check_participation(doc, node.municipality, path + ("municipality",))


def _check_admin(doc: _Document, parsed: _Parsed, node: Node) -> None:
    """The administration / maintenance surface: only where ADMIN_KINDS have one, on its own port,
    used by principals (never node ids) from the console of a node in the same site."""
    path: FieldPath = ("nodes", node.id)
    if node.admin_port is not None:
        if node.kind not in ADMIN_KINDS:
            doc.report(path + ("admin_port",), f"a {node.kind} has no administration surface; remove admin_port")
        elif not 0 < node.admin_port < 65536:
            doc.report(path + ("admin_port",), f"port {node.admin_port} is outside 1-65535")
        elif node.admin_port == node.port:
            doc.report(path + ("admin_port",), f"admin_port {node.admin_port} is the node's own port; use another")
    if node.admin and node.admin_port is None:
        doc.report(path + ("admin",), f"{node.id} has no admin_port for these rules to guard")
    for index, rule in enumerate(node.admin):
        where = path + ("admin", index)
        if not rule.principals:
            doc.report(where + ("principals",), "empty: admits no one")
        for i, name in enumerate(rule.principals):
            if name in parsed.declared:
                doc.report(where + ("principals", i), f"{name!r} is a node; admin rules name principals (people)")
        if not rule.at:
            doc.report(where + ("at",), "empty: no console to connect from")
        for i, console in enumerate(rule.at):
            if console not in parsed.declared:
                doc.report(where + ("at", i), f"unknown node {console!r}")
            elif console in parsed.topo.nodes and parsed.topo.nodes[console].site != node.site:
                doc.report(where + ("at", i), f"console {console} is not in {node.id}'s site {node.site!r}")
        if not rule.requests:
            doc.report(where + ("requests",), "empty: allows nothing")
        for i, pattern in enumerate(rule.requests):
            try:
                policy.parse_request_pattern(pattern)
            except ValueError as e:
                doc.report(where + ("requests", i), str(e))


def _check_participation(doc: _Document, muni: Municipality, path: FieldPath) -> None:
    """Participation dates are ISO dates, in order; the vaccination fee is 120 yen (seed 000 §13)."""
    days = {}
    for name in ("participating_from", "participating_until"):
        value = getattr(muni, name)
        if value is None:
            continue
        try:
            days[name] = date.fromisoformat(value)
        except ValueError:
            doc.report(path + (name,), f"{value!r} is not a date (YYYY-MM-DD)")
    if len(days) == 2 and days["participating_until"] < days["participating_from"]:
        doc.report(
            path + ("participating_until",),
            f"{muni.participating_until} is before participating_from {muni.participating_from}",
        )
    fee = muni.certificates.get("vaccination")
    if fee is not None and fee != VACCINATION_FEE:
        doc.report(
            path + ("certificates", "vaccination"),
            f"the vaccination certificate costs {VACCINATION_FEE} yen per copy (seed 000 §13), got {fee}",
        )


def _check_hours(doc: _Document, hours: Hours, path: FieldPath) -> bool:
    good = True
    for name in ("open", "close"):
        value = getattr(hours, name)
        if not _HHMM.fullmatch(value):
            doc.report(path + (name,), f"{value!r} is not HH:MM (00:00-23:59)")
            good = False
    if good and hours.open >= hours.close:
        doc.report(path + ("close",), f"closes at {hours.close}, not after it opens at {hours.open}")
        good = False
    return good


def _check_meaning(doc: _Document, parsed: _Parsed) -> None:
    topo = parsed.topo
    bulk = parsed.bulk
    # lines between two members of one group are made by the expansion and needed by no check
    joined = {frozenset((line.a, line.b)) for line in topo.lines if line.a not in bulk or line.b not in bulk}
    seen_lines: set[str] = set()
    for line, path in zip(topo.lines, parsed.line_paths, strict=True):
        if line.id in seen_lines:
            doc.report(path + ("id",) if path[0] == "lines" else path, f"duplicate line id {line.id!r}")
        seen_lines.add(line.id)
        if line.a in bulk or line.b in bulk:
            continue  # a group member's line, made by the expansion between nodes it made
        for end in ("a", "b"):
            if getattr(line, end) not in parsed.declared:
                doc.report(path + (end,), f"line to nowhere: unknown node {getattr(line, end)!r}")
        if line.a == line.b:
            doc.report(path + ("b",), f"line joins {line.a} to itself")

    _check_addresses(doc, parsed)
    for node in topo.nodes.values():
        if node.id not in bulk:
            _check_node(doc, parsed, node, joined)
        _check_admin(doc, parsed, node)

    service_ok = _check_hours(doc, topo.service_hours, ("service_hours",))
    codes: dict[str, str] = {}
    for node in topo.nodes.values():
        muni = node.municipality
        if muni is None:
            continue
        path = ("nodes", node.id, "municipality")
        if muni.code in codes and topo.nodes[codes[muni.code]].municipality != muni:
            doc.report(
                path + ("code",),
                f"duplicate municipality code {muni.code!r}, already {codes[muni.code]}'s "
                "(several document servers of one municipality carry the same municipality data)",
            )
        codes.setdefault(muni.code, node.id)
        hours, service = muni.hours, topo.service_hours
        if service_ok and _HHMM.fullmatch(hours.open) and _HHMM.fullmatch(hours.close):
            if hours.open < service.open or hours.close > service.close:
                doc.report(
                    path + ("hours",),
                    f"{hours.open}-{hours.close} is wider than the service hours {service.open}-{service.close}; "
                    "a municipality may only narrow them",
                )

    for violation in policy.annex_violations(topo, skip=bulk):
        where = violation.path
        if where[0] == "lines":  # policy counts converted lines; the file may hold broken ones too
            where = parsed.line_paths[int(where[1])] + where[2:]
        doc.report(where, violation.message, violation.rule)


def _load(path: Path) -> tuple[Topology | None, list[Problem]]:
    doc = _Document(str(path))
    data = doc.read(path)
    if data is None and doc.problems:  # unreadable or not YAML: nothing more to say
        return None, doc.problems
    parsed = _parse(doc, data, str(path))
    if parsed is not None:
        _check_meaning(doc, parsed)
    problems = sorted(doc.problems, key=lambda p: p.line)
    return (parsed.topo if parsed is not None and not problems else None), problems
