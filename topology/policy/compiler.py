"""The policy compiler: a topology's allow-lists as fast per-node checks, a reachability matrix
and the security-annex audit. Pure: no I/O, so every decision is testable without a socket.

Deny by default. A server checks, from cheapest to dearest (DESIGN §3 "deny early and cheaply"):
1. the peer address before the TLS handshake (`AllowList.check_address`);
2. the certificate identity after it, which must be an allowed source *and* own that address
   (`AllowList.check_identity`);
3. method and path of every request (`AllowList.check_request`).
Every allowing `Decision` names the config entry that allowed it ("nodes.ocsp.allow[0]"), so a
decision traces back to one line of the topology file. The nftables ruleset and the probes
compile from `reachability`, the same data, so the three layers cannot drift.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass

from topology.spec.kinds import KINDS, Side
from topology.spec.model import AllowRule, Mode, Node, Topology, field_path

# "METHOD /path", a trailing `*` matching any suffix.
_REQUEST_PATTERN = re.compile(r"(GET|POST|PUT|DELETE|HEAD) (/[^\s*]*)(\*?)")

# Dot segments and encoded dots/slashes/backslashes could make a path that matches a prefix
# here resolve elsewhere on a later hop; such paths are never allowed.
_UNSAFE_PATH = re.compile(r"(?:^|/)\.\.?(?:/|$)|%2[eEfF]|%5[cC]|\\")


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str | None = None  # on denial: "peer-address", "peer-identity" or "request-not-allowed"
    rule: str | None = None  # on allowance: the config entry that allowed it, e.g. "nodes.ocsp.allow[0]"


DENY_ADDRESS = Decision(False, "peer-address")
DENY_IDENTITY = Decision(False, "peer-identity")
DENY_REQUEST = Decision(False, "request-not-allowed")
DENY_PRINCIPAL = Decision(False, "principal-not-allowed")  # a person's certificate this surface does not admit
# A principal no admin rule names (store staff at the store console) gets through TLS so that each
# request is refused with a reason it can read (`principal-not-allowed`), counted like any denial.
ADMIT_TO_REFUSE = Decision(True, rule=None)


def rule_label(node_id: str, index: int) -> str:
    """How decisions name an allow entry: "nodes.ocsp.allow[0]", the field path in the topology file."""
    return field_path(("nodes", node_id, "allow", index))


def parse_request_pattern(pattern: str) -> tuple[str, str, bool]:
    """Split a request pattern: "POST /v1/*" -> ("POST", "/v1/", True), i.e. method, path, is-a-prefix."""
    m = _REQUEST_PATTERN.fullmatch(pattern)
    if m is None:
        raise ValueError(
            f"{pattern!r} is not 'METHOD /path' (GET, POST, PUT, DELETE or HEAD; a trailing * matches any suffix)"
        )
    return m[1], m[2], m[3] == "*"


class _RequestRules:
    """One identity's allowed requests: exact (method, path) pairs, then path prefixes per method."""

    __slots__ = ("exact", "prefixes")

    def __init__(self) -> None:
        self.exact: dict[tuple[str, str], Decision] = {}
        self.prefixes: dict[str, list[tuple[str, Decision]]] = {}

    def add(self, pattern: str, decision: Decision) -> None:
        method, path, is_prefix = parse_request_pattern(pattern)
        if is_prefix:
            self.prefixes.setdefault(method, []).append((path, decision))
        else:
            self.exact.setdefault((method, path), decision)

    def match(self, method: str, path: str) -> Decision:
        decision = self.exact.get((method, path))
        if decision is not None:
            return decision
        for prefix, decision in self.prefixes.get(method, ()):
            if path.startswith(prefix):
                return decision
        return DENY_REQUEST


class AllowList:
    """Who may talk to one server node, and what they may ask. Built by `compile_allowlists`."""

    __slots__ = ("node_id", "port", "sources", "_by_address", "_by_identity", "_requests")

    def __init__(self, node: Node, topo: Topology, mode: Mode) -> None:
        if node.port is None:
            raise ValueError(f"server node {node.id!r} has no port")
        self.node_id = node.id
        self.port = node.port
        # identity -> its address in this mode; what nftables and the probes need too
        self.sources: dict[str, str] = {}
        self._by_address: dict[str, Decision] = {}
        self._by_identity: dict[str, tuple[str, Decision]] = {}
        self._requests: dict[str, _RequestRules] = {}
        for index, rule in enumerate(node.allow):
            allowed = Decision(True, rule=rule_label(node.id, index))
            for source_id in rule.sources:
                source = topo.nodes.get(source_id)
                if source is None:
                    raise ValueError(f"{allowed.rule} allows unknown node {source_id!r}")
                address = source.address_in(mode)
                self.sources.setdefault(source_id, address)
                # the first rule naming a source is the one that lets it connect
                self._by_address.setdefault(address, allowed)
                self._by_identity.setdefault(source_id, (address, allowed))
                requests = self._requests.setdefault(source_id, _RequestRules())
                for pattern in rule.requests:
                    requests.add(pattern, allowed)

    def check_address(self, ip: str) -> Decision:
        """Before the handshake: is `ip` the address of some allowed source node?"""
        return self._by_address.get(ip, DENY_ADDRESS)

    def check_identity(self, ip: str, identity: str) -> Decision:
        """After the handshake: `identity` (node id from the peer certificate) is allowed and sits at `ip`."""
        entry = self._by_identity.get(identity)
        if entry is None or entry[0] != ip:
            return DENY_IDENTITY
        return entry[1]

    def check_request(self, identity: str, method: str, path: str) -> Decision:
        """Some rule that lists `identity` has a pattern matching `method path` (query string ignored)."""
        requests = self._requests.get(identity)
        if requests is None:
            return DENY_IDENTITY
        if "?" in path:
            path = path.partition("?")[0]
        if not path.startswith("/") or (("/." in path or "%" in path or "\\" in path) and _UNSAFE_PATH.search(path)):
            return DENY_REQUEST
        return requests.match(method, path)

    def __repr__(self) -> str:
        return f"AllowList({self.node_id!r}, sources={sorted(self.sources)})"


def compile_allowlists(topo: Topology, mode: Mode = Mode.LOOPBACK, only=None) -> dict[str, AllowList]:
    """One `AllowList` per server node (of the ids `only`, if given); `mode` netns uses the
    namespace addresses."""
    nodes = topo.nodes.values() if only is None else (topo.nodes[i] for i in only)
    return {node.id: AllowList(node, topo, mode) for node in nodes if node.is_server}


class OnFirstCheck:
    """A node's `AllowList` or `AdminAllowList`, compiled at its first check: a node process of a
    national file holds 12,000 of them, most never asked (their nodes are never dialled in a run),
    and compiling them was a fifth of its start. The topology was validated when it was loaded
    (every source a node, every pattern well formed), so compiling later cannot fail where
    compiling at start would have passed."""

    __slots__ = ("port", "_compile", "_compiled")

    def __init__(self, port: int, compile: Callable[[], AllowList | AdminAllowList]) -> None:
        self.port = port
        self._compile = compile
        self._compiled: AllowList | AdminAllowList | None = None

    @property
    def compiled(self) -> AllowList | AdminAllowList:
        if self._compiled is None:
            self._compiled = self._compile()
        return self._compiled

    def check_address(self, ip: str) -> Decision:
        return self.compiled.check_address(ip)

    def check_identity(self, ip: str, identity: str) -> Decision:
        return self.compiled.check_identity(ip, identity)

    def check_request(self, identity: str, method: str, path: str) -> Decision:
        return self.compiled.check_request(identity, method, path)

    def __repr__(self) -> str:
        return repr(self.compiled)


def allowlists_on_first_check(topo: Topology, mode: Mode, only=None) -> dict[str, OnFirstCheck]:
    """`compile_allowlists(topo, mode, only)`, each compiled at its first check (`OnFirstCheck`)."""
    return {
        node.id: OnFirstCheck(node.port, functools.partial(AllowList, node, topo, mode))
        for node in (topo.nodes.values() if only is None else (topo.nodes[i] for i in only))
        if node.is_server
    }


def admin_allowlists_on_first_check(topo: Topology, mode: Mode, only=None) -> dict[str, OnFirstCheck]:
    """`compile_admin_allowlists(topo, mode, only)`, each compiled at its first check (`OnFirstCheck`)."""
    return {
        node.id: OnFirstCheck(node.admin_port, functools.partial(AdminAllowList, node, topo, mode))
        for node in (topo.nodes.values() if only is None else (topo.nodes[i] for i in only))
        if node.admin_port is not None
    }


def admin_label(node_id: str, index: int) -> str:
    """How decisions name an admin entry: "nodes.kiosk-a1-1.admin[0]"."""
    return field_path(("nodes", node_id, "admin", index))


class AdminAllowList:
    """Who may use one node's administration / maintenance surface (`Node.admin`), with
    `AllowList`'s interface so the same `NodeServer` enforces it, in the same order: the console
    address before TLS, then the certificate (a principal, never a node's), then each request."""

    __slots__ = ("node_id", "port", "consoles", "_nodes", "_by_address", "_principals", "_requests")

    def __init__(self, node: Node, topo: Topology, mode: Mode) -> None:
        if node.admin_port is None:
            raise ValueError(f"node {node.id!r} has no admin_port")
        self.node_id = node.id
        self.port = node.admin_port
        self.consoles: dict[str, str] = {}  # console node id -> its address in this mode
        self._nodes = topo.nodes.keys()  # a view, not a copy per surface
        self._by_address: dict[str, Decision] = {}
        self._principals: dict[tuple[str, str], Decision] = {}  # (principal, console address)
        self._requests: dict[str, _RequestRules] = {}
        for index, rule in enumerate(node.admin):
            allowed = Decision(True, rule=admin_label(node.id, index))
            for console_id in rule.at:
                console = topo.nodes.get(console_id)
                if console is None:
                    raise ValueError(f"{allowed.rule} names unknown console {console_id!r}")
                address = console.address_in(mode)
                self.consoles.setdefault(console_id, address)
                self._by_address.setdefault(address, allowed)
                for principal in rule.principals:
                    self._principals.setdefault((principal, address), allowed)
            for principal in rule.principals:
                requests = self._requests.setdefault(principal, _RequestRules())
                for pattern in rule.requests:
                    requests.add(pattern, allowed)

    def check_address(self, ip: str) -> Decision:
        return self._by_address.get(ip, DENY_ADDRESS)

    def check_identity(self, ip: str, identity: str) -> Decision:
        if not identity or identity in self._nodes or ip not in self._by_address:
            return DENY_IDENTITY  # a node's certificate is never a person's
        if identity in self._requests:  # a listed principal, from one of its own consoles only
            return self._principals.get((identity, ip), DENY_IDENTITY)
        return ADMIT_TO_REFUSE

    def check_request(self, identity: str, method: str, path: str) -> Decision:
        if identity in self._nodes:
            return DENY_IDENTITY
        requests = self._requests.get(identity)
        if requests is None:
            return DENY_PRINCIPAL
        path = path.partition("?")[0]
        if not path.startswith("/") or _UNSAFE_PATH.search(path):
            return DENY_REQUEST
        return requests.match(method, path)

    def principals(self) -> set[str]:
        return set(self._requests)

    def __repr__(self) -> str:
        return (
            f"AdminAllowList({self.node_id!r}, principals={sorted(self._requests)}, consoles={sorted(self.consoles)})"
        )


def compile_admin_allowlists(topo: Topology, mode: Mode = Mode.LOOPBACK, only=None) -> dict[str, AdminAllowList]:
    """One `AdminAllowList` per node with an `admin_port` (store controllers, kiosks); `only`: of
    these node ids only (a process serving some nodes of a large topology)."""
    nodes = topo.nodes.values() if only is None else (topo.nodes[i] for i in only)
    return {node.id: AdminAllowList(node, topo, mode) for node in nodes if node.admin_port is not None}


@dataclass(frozen=True)
class Reach:
    src: str
    dst: str
    port: int
    proto: str
    allowed: bool
    rule: str | None  # the allowing config entry, None when denied


def _first_rule(dst: Node, src_id: str) -> tuple[int, AllowRule] | None:
    for index, rule in enumerate(dst.allow):
        if src_id in rule.sources:
            return index, rule
    return None


def _servers(topo: Topology):
    """The server nodes, in file order; a server without a port is an error."""
    for node in topo.nodes.values():
        if node.is_server:
            if node.port is None:
                raise ValueError(f"server node {node.id!r} has no port")
            yield node


def reachability(topo: Topology) -> list[Reach]:
    """Every (source node, server node) pair on the destination's port: allowed iff an allow rule says so."""
    matrix: list[Reach] = []
    for dst in _servers(topo):
        for src in topo.nodes.values():
            if src.id == dst.id:
                continue
            found = _first_rule(dst, src.id)
            if found is None:
                matrix.append(Reach(src.id, dst.id, dst.port, "h2+tls", False, None))
            else:
                index, rule = found
                matrix.append(Reach(src.id, dst.id, rule.port or dst.port, rule.proto, True, rule_label(dst.id, index)))
    return matrix


def allowed_reachability(topo: Topology) -> list[Reach]:
    """The allowed entries of `reachability`, in its order, without walking every pair: from each
    server's allow entries (a national part has millions of pairs and a few thousand allowed ones,
    which the kernel rulesets need; docs/national.md)."""
    position = {node_id: i for i, node_id in enumerate(topo.nodes)}
    out: list[Reach] = []
    for dst in _servers(topo):
        first: dict[str, int] = {}
        for index, rule in enumerate(dst.allow):
            for src in rule.sources:
                if src in position and src != dst.id:
                    first.setdefault(src, index)
        for src in sorted(first, key=position.__getitem__):
            rule = dst.allow[first[src]]
            out.append(Reach(src, dst.id, rule.port or dst.port, rule.proto, True, rule_label(dst.id, first[src])))
    return out


def allowed_admin_reachability(topo: Topology) -> list[Reach]:
    """The allowed entries of `admin_reachability`, in its order, from the admin entries alone."""
    position = {node_id: i for i, node_id in enumerate(topo.nodes)}
    out: list[Reach] = []
    for dst in topo.nodes.values():
        if dst.admin_port is None:
            continue
        consoles = {c: index for index, rule in reversed(list(enumerate(dst.admin))) for c in rule.at}
        for src in sorted((c for c in consoles if c in position and c != dst.id), key=position.__getitem__):
            out.append(Reach(src, dst.id, dst.admin_port, "h2+tls", True, admin_label(dst.id, consoles[src])))
    return out


def admin_reachability(topo: Topology) -> list[Reach]:
    """Every (node, admin surface) pair on the admin port: allowed iff the node is a console an
    admin rule names. Kept apart from `reachability`: these are people's paths, not the network's."""
    matrix: list[Reach] = []
    for dst in topo.nodes.values():
        if dst.admin_port is None:
            continue
        consoles = {c: index for index, rule in reversed(list(enumerate(dst.admin))) for c in rule.at}
        for src in topo.nodes.values():
            if src.id == dst.id:
                continue
            index = consoles.get(src.id)
            label = admin_label(dst.id, index) if index is not None else None
            matrix.append(Reach(src.id, dst.id, dst.admin_port, "h2+tls", index is not None, label))
    return matrix


@dataclass(frozen=True)
class PrincipalReach:
    """One (principal, console, surface) triple: may that person, at that console, use it?"""

    principal: str
    console: str
    dst: str
    allowed: bool
    requests: tuple[str, ...]  # the patterns allowed (empty when refused)
    rule: str | None


def principal_matrix(topo: Topology, principals: tuple[str, ...]) -> list[PrincipalReach]:
    """For every admin surface and each of its consoles: which of `principals` it admits, for what."""
    out: list[PrincipalReach] = []
    for dst in topo.nodes.values():
        consoles = dict.fromkeys(c for rule in dst.admin for c in rule.at)
        for console in consoles:
            for principal in principals:
                rules = [(i, r) for i, r in enumerate(dst.admin) if principal in r.principals and console in r.at]
                patterns = tuple(p for _, r in rules for p in r.requests)
                out.append(
                    PrincipalReach(
                        principal,
                        console,
                        dst.id,
                        bool(rules),
                        patterns,
                        admin_label(dst.id, rules[0][0]) if rules else None,
                    )
                )
    return out


# ---------------------------------------------------------------------------------------------
# Security-annex audit (DESIGN §2): which parts of the policy break which requirement.


@dataclass(frozen=True)
class Violation:
    rule: str  # requirement ID, e.g. "SEC-SN-3"
    path: tuple[str | int, ...]  # the config field that breaks it
    message: str


def _who(node: Node) -> str:
    """How messages name a node: "kiosk-a1-1" as is, "municipality muni-a" with the kind its id lacks."""
    return node.id if node.kind in node.id else f"{node.kind} {node.id}"


def _side(node: Node) -> Side:
    return KINDS[node.kind].side


def allow_violation(src: Node, dst: Node) -> tuple[str, str] | None:
    """The requirement broken by letting `src` connect to `dst`, the most specific one first."""
    isolated = KINDS[src.kind]
    if isolated.reaches_nothing:
        return isolated.reaches_nothing, f"{isolated.title} {src.id} must reach nothing, yet {_who(dst)} allows it"
    if _side(src) == Side.STORE and _side(dst) == Side.CENTER:
        return "SEC-SN-3", f"store-side {_who(src)} must not reach {_who(dst)}; stores go through the EC center"
    if _side(src) == Side.CENTER and _side(dst) == Side.STORE:
        return "SEC-EC-2", f"{_who(src)} must not reach store-side {_who(dst)}"
    accepts = KINDS[dst.kind].accepts
    if accepts is not None and not (
        src.kind in accepts.kinds and (accepts.same is None or getattr(src, accepts.same) == getattr(dst, accepts.same))
    ):
        # a relay's id names its kind; the center side's may not
        name = dst.id if KINDS[dst.kind].relays else _who(dst)
        return accepts.rule, f"{name} accepts only {accepts.says}, not {_who(src)}"
    return None


def _admin_violation(dst: Node, principal: str) -> tuple[str, str] | None:
    """Who may use which surface: the operator administers the store controller (SEC-ST-3), maintenance
    staff maintain kiosks (SEC-KI-4); store staff use neither (SEC-ST-3/KI-6)."""
    kind = KINDS[dst.kind]
    if kind.admin_principal is not None and principal != kind.admin_principal:
        rule = "SEC-ST-3/KI-6" if principal == "store-staff" else kind.admin_rule or "SEC-ST-3/KI-6"
        return rule, f"only the {kind.admin_principal} principal may use {_who(dst)}'s admin surface, not {principal!r}"
    return None


def _line_violation(a: Node, b: Node) -> tuple[str, str] | None:
    for x, y in ((a, b), (b, a)):
        if _side(x) == Side.STORE and _side(y) == Side.CENTER:
            return "SEC-SN-3", f"line joins store-side {_who(x)} to {_who(y)}; stores go through the EC center"
        only = KINDS[x.kind].lines_only_to
        if only is not None and y.kind not in only:
            return (
                KINDS[x.kind].reaches_nothing or "SEC-SN-1",
                f"{KINDS[x.kind].title} {x.id} may be joined only to its {' or '.join(only).replace('-', ' ')}, not {_who(y)}",
            )
    return None


def annex_violations(topo: Topology, skip: frozenset[str] = frozenset()) -> list[Violation]:
    """Every place the topology's policy breaks a security-annex rule. Unknown node ids are skipped
    (the loader reports them); an empty list means the policy passes the audit. `skip`: nodes
    audited through another that stands for them (members of one compact-format group, whose
    first member carries the group's verdict), with their lines."""
    found: list[Violation] = []
    for dst in topo.nodes.values():
        if dst.id in skip:
            continue
        for index, rule in enumerate(dst.allow):
            for source_index, source_id in enumerate(rule.sources):
                src = topo.nodes.get(source_id)
                if src is None or src.id == dst.id:
                    continue
                broken = allow_violation(src, dst)
                if broken:
                    found.append(
                        Violation(broken[0], ("nodes", dst.id, "allow", index, "from", source_index), broken[1])
                    )
        want, rule_id = KINDS[dst.kind].upstream, KINDS[dst.kind].upstream_rule
        if want is not None and rule_id is not None:
            for hop_index, hop in enumerate(dst.hops):
                if hop not in topo.nodes or topo.nodes[hop].kind == want:
                    continue
                message = f"a {dst.kind}'s upstream must be a {want}, not {_who(topo.nodes[hop])}"
                where = ("nodes", dst.id, "upstreams", hop_index) if dst.upstreams else ("nodes", dst.id, "upstream")
                found.append(Violation(rule_id, where, message))
        for index, rule in enumerate(dst.admin):
            for principal_index, principal in enumerate(rule.principals):
                broken = _admin_violation(dst, principal)
                if broken:
                    found.append(
                        Violation(
                            broken[0], ("nodes", dst.id, "admin", index, "principals", principal_index), broken[1]
                        )
                    )
    for index, line in enumerate(topo.lines):
        if line.a in skip or line.b in skip:
            continue
        a, b = topo.nodes.get(line.a), topo.nodes.get(line.b)
        if a is not None and b is not None:
            broken = _line_violation(a, b)
            if broken:
                found.append(Violation(broken[0], ("lines", index), f"{line.id}: {broken[1]}"))
    return found
