"""The compiled policy checked pair by pair against the expected matrix, in-process.

For every (source node, server node) pair of `reachability` and every (console, admin surface)
pair of `admin_reachability`, the compiled allow-lists (the objects the servers enforce with)
are asked what the server would do, step by step as `NodeServer` asks: is a listener on the
expected port, is the peer address admitted before TLS, is its certificate after it, and is each
request the topology file allows answered (and a request it does not, refused)? Admin surfaces
are asked the same for every principal: allowed exactly where `principal_matrix` says.
Pure: no sockets, so `konbini policy mutate` can run it for every mutant in milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass

from topology.policy.compiler import (
    AdminAllowList,
    AllowList,
    admin_reachability,
    parse_request_pattern,
    principal_matrix,
    reachability,
)
from topology.spec.model import Mode, Topology

PRINCIPALS = ("operator", "store-staff", "maintenance", "monitoring")
STRAY_REQUEST = ("DELETE", "/konbini-mutation-probe")  # allowed nowhere


@dataclass(frozen=True)
class MatrixResult:
    kind: str  # "pair" | "admin-pair" | "principal"
    src: str
    dst: str
    expected: str
    observed: str

    @property
    def ok(self) -> bool:
        return self.expected == self.observed


def _sample(pattern: str) -> tuple[str, str]:
    method, path, prefix = parse_request_pattern(pattern)
    return method, path + ("x" if prefix else "")


def _session(lists, dst: str, port: int, address: str, identity: str, requests: tuple[str, ...]) -> str:
    """What the server at `dst` does with this peer: "answers" every request in `requests` (and
    refuses a stray one), or the first step that refuses it."""
    allow = lists.get(dst)
    if allow is None or allow.port != port:
        return "no-listener"
    if not allow.check_address(address).allowed:
        return "refused:address"
    if not allow.check_identity(address, identity).allowed:
        return "refused:identity"
    for pattern in requests:
        if not allow.check_request(identity, *_sample(pattern)).allowed:
            return f"refused:{pattern}"
    if allow.check_request(identity, *STRAY_REQUEST).allowed:
        return "answers-stray-request"
    return "answers" if requests else "refused:every-request"


def check_matrix(
    topo: Topology, lists: dict[str, AllowList], admin: dict[str, AdminAllowList], mode: Mode = Mode.LOOPBACK
) -> list[MatrixResult]:
    """Expected from `topo` (the file), observed from `lists`/`admin` (the compiled policy)."""
    out: list[MatrixResult] = []
    for r in reachability(topo):
        src, dst = topo.node(r.src), topo.node(r.dst)
        requests = tuple(p for rule in dst.allow if r.src in rule.sources for p in rule.requests)
        expected = "answers" if r.allowed else "refused"
        observed = _session(lists, r.dst, r.port, src.address_in(mode), r.src, requests or ("POST /v1/session",))
        out.append(
            MatrixResult(
                "pair",
                r.src,
                r.dst,
                expected,
                "answers"
                if observed == "answers"
                else ("refused" if not r.allowed and observed.startswith(("refused", "no-listener")) else observed),
            )
        )
    for r in admin_reachability(topo):
        src = topo.node(r.src)
        # the console's own node certificate is never admitted; an admitted console is shown by the principals below
        observed = _session(admin, r.dst, r.port, src.address_in(mode), r.src, ("GET /",))
        out.append(
            MatrixResult(
                "admin-pair",
                r.src,
                r.dst,
                "refused",
                "refused" if observed.startswith(("refused", "no-listener")) else observed,
            )
        )
        if not r.allowed:  # any principal from a non-console address: refused before TLS
            observed = _session(admin, r.dst, r.port, src.address_in(mode), PRINCIPALS[0], ("GET /",))
            out.append(
                MatrixResult(
                    "admin-pair",
                    f"{PRINCIPALS[0]}@{r.src}",
                    r.dst,
                    "refused",
                    "refused" if observed.startswith(("refused", "no-listener")) else observed,
                )
            )
    for p in principal_matrix(topo, PRINCIPALS):
        dst = topo.node(p.dst)
        surface = tuple(dict.fromkeys(q for rule in dst.admin for q in rule.requests))  # every request the surface has
        if p.allowed:
            observed = _session(
                admin, p.dst, dst.admin_port or 0, topo.node(p.console).address_in(mode), p.principal, p.requests
            )
        else:  # refused means refused for each request the surface serves anyone
            answered = [
                q
                for q in surface
                if _session(admin, p.dst, dst.admin_port or 0, topo.node(p.console).address_in(mode), p.principal, (q,))
                == "answers"
            ]
            observed = f"answers {answered[0]}" if answered else "refused"
        expected = "answers" if p.allowed else "refused"
        out.append(
            MatrixResult(
                "principal",
                f"{p.principal}@{p.console}",
                p.dst,
                expected,
                "answers"
                if observed == "answers"
                else ("refused" if not p.allowed and observed.startswith(("refused", "no-listener")) else observed),
            )
        )
    return out
