"""The policy compiler on the default topology: address, identity and request checks, and the
reachability matrix the nftables rules and probes are built from."""

from __future__ import annotations

import pytest

from topology.policy.compiler import (
    DENY_ADDRESS,
    DENY_IDENTITY,
    DENY_REQUEST,
    Decision,
    annex_violations,
    compile_allowlists,
    parse_request_pattern,
    reachability,
)
from topology.spec.load import DEFAULT_TOPOLOGY, load_topology
from topology.spec.model import CENTER_KINDS, STORE_KINDS, AllowRule, Node, Topology

TOPO = load_topology(DEFAULT_TOPOLOGY)
LISTS = compile_allowlists(TOPO)
NETNS_LISTS = compile_allowlists(TOPO, mode="netns")


def addr(node_id: str) -> str:
    return TOPO.node(node_id).address


def allowed_sources(node: Node) -> set[str]:
    return {source for rule in node.allow for source in rule.sources}


# --- compile_allowlists ----------------------------------------------------------------------


def test_one_allow_list_per_server_node() -> None:
    assert set(LISTS) == {n.id for n in TOPO.nodes.values() if n.is_server}
    assert len(LISTS) == 21
    assert LISTS["store-router-a1"].port == 8443
    assert LISTS["store-router-a1"].sources == {"kiosk-a1-1": "127.18.11.11", "kiosk-a1-2": "127.18.11.12"}


def test_kiosk_may_reach_its_store_router() -> None:
    routers = LISTS["store-router-a1"]
    allowed = Decision(True, rule="nodes.store-router-a1.allow[0]")
    assert routers.check_address("127.18.11.11") == allowed
    assert routers.check_identity("127.18.11.11", "kiosk-a1-1") == allowed
    assert routers.check_request("kiosk-a1-1", "POST", "/v1/issue") == allowed


def test_kiosk_cannot_reach_issuance_center_directly() -> None:
    center = LISTS["issuance-center"]
    assert center.check_address(addr("kiosk-a1-1")) == DENY_ADDRESS
    assert center.check_address(addr("kiosk-a1-1")).reason == "peer-address"
    assert center.check_identity(addr("kiosk-a1-1"), "kiosk-a1-1") == DENY_IDENTITY
    assert center.check_request("kiosk-a1-1", "POST", "/v1/issue") == DENY_IDENTITY


def test_store_cannot_reach_issuance_center_directly() -> None:
    center = LISTS["issuance-center"]
    for node in TOPO.nodes.values():
        if node.kind in STORE_KINDS:
            assert center.check_address(node.address) == DENY_ADDRESS
            assert center.check_identity(node.address, node.id) == DENY_IDENTITY


def test_kiosk_of_another_store_is_refused_by_the_store_router() -> None:
    assert LISTS["store-router-a1"].check_address(addr("kiosk-a2-1")) == DENY_ADDRESS
    assert LISTS["store-router-a1"].check_identity(addr("kiosk-a2-1"), "kiosk-a2-1") == DENY_IDENTITY


def test_identity_must_own_the_address_it_connects_from() -> None:
    routers = LISTS["store-router-a1"]
    # kiosk-a1-1's certificate presented from kiosk-a1-2's address: both are allowed, the pair is not
    mismatch = routers.check_identity(addr("kiosk-a1-2"), "kiosk-a1-1")
    assert mismatch == DENY_IDENTITY
    assert mismatch.reason == "peer-identity"
    # a certificate for a node the list does not name, from an allowed address
    assert routers.check_identity(addr("kiosk-a1-1"), "kiosk-a2-1") == DENY_IDENTITY
    assert routers.check_identity(addr("kiosk-a1-1"), "") == DENY_IDENTITY


def test_issuance_center_is_reached_only_through_the_dmz_relays() -> None:
    center = LISTS["issuance-center"]
    for relay in ("dmz-relay-a", "dmz-relay-b"):
        decision = center.check_identity(addr(relay), relay)
        assert decision.allowed and decision.rule == "nodes.issuance-center.allow[0]"
    for other in ("ec-router-a", "store-router-a1", "ocsp", "muni-a"):
        assert center.check_address(addr(other)) == DENY_ADDRESS


def test_ocsp_and_municipalities_answer_only_the_issuance_center() -> None:
    ocsp = LISTS["ocsp"]
    assert ocsp.check_identity(addr("issuance-center"), "issuance-center").rule == "nodes.ocsp.allow[0]"
    assert ocsp.check_request("issuance-center", "POST", "/ocsp").allowed
    assert ocsp.check_request("issuance-center", "GET", "/ocsp") == DENY_REQUEST
    assert ocsp.check_request("issuance-center", "POST", "/ocsp/x") == DENY_REQUEST
    for muni in ("muni-a", "muni-b", "muni-c"):
        lst = LISTS[muni]
        assert lst.check_request("issuance-center", "POST", "/v1/document") == Decision(
            True, rule=f"nodes.{muni}.allow[0]"
        )
        assert lst.check_request("issuance-center", "POST", "/v1/documents") == DENY_REQUEST
        assert lst.check_address(addr("dmz-relay-a")) == DENY_ADDRESS


def test_store_controller_takes_only_heartbeats_and_faults() -> None:
    controller = LISTS["store-controller-a1"]
    for path in ("/v1/heartbeat", "/v1/fault"):
        assert controller.check_request("kiosk-a1-2", "POST", path).allowed
    for method, path in [
        ("POST", "/v1/issue"),
        ("GET", "/v1/heartbeat"),
        ("POST", "/v1/heartbeat/"),
        ("POST", "/v1/heartbeatx"),
    ]:
        assert controller.check_request("kiosk-a1-2", method, path) == DENY_REQUEST


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("POST", "/v1/issue", True),
        ("POST", "/v1/", True),  # the wildcard matches an empty suffix
        ("POST", "/v1/a/b/c", True),  # and one with slashes
        ("POST", "/v1/issue?copies=2", True),  # the query string is not part of the match
        ("POST", "/v1", False),  # "/v1/*" needs the slash
        ("POST", "/v10/issue", False),
        ("GET", "/v1/issue", False),  # method is part of the pattern
        ("post", "/v1/issue", False),  # and matched exactly
        ("PUT", "/v1/issue", False),
        ("GET", "/bench/blob", True),
        ("POST", "/bench/echo", True),
        ("HEAD", "/bench/blob", False),  # GET does not imply HEAD
        ("DELETE", "/bench/blob", False),
        ("GET", "/admin", False),
        ("POST", "/v1/../admin", False),  # dot segments could resolve elsewhere on a later hop
        ("POST", "/v1/./issue", False),
        ("POST", "/v1/..", False),
        ("POST", "/v1/%2e%2e/admin", False),  # and so could encoded ones
        ("POST", "/v1/%2E%2E%2Fadmin", False),
        ("POST", "/v1/a%5cb", False),
        ("POST", "/v1\\..\\admin", False),
        ("POST", "v1/issue", False),  # not an absolute path
        ("POST", "", False),
        ("POST", "/v1/file.pdf", True),  # a dot inside a segment is fine
        ("POST", "/v1/%20", True),
    ],
)
def test_request_patterns_and_wildcards(method: str, path: str, allowed: bool) -> None:
    decision = LISTS["store-router-a1"].check_request("kiosk-a1-1", method, path)
    if allowed:
        assert decision == Decision(True, rule="nodes.store-router-a1.allow[0]")
    else:
        assert decision == DENY_REQUEST
        assert decision.reason == "request-not-allowed"


def test_request_from_an_identity_the_list_does_not_name_is_refused() -> None:
    assert LISTS["store-router-a1"].check_request("kiosk-a2-1", "POST", "/v1/issue") == DENY_IDENTITY


def test_netns_mode_uses_namespace_addresses() -> None:
    routers = NETNS_LISTS["store-router-a1"]
    assert routers.check_address("198.18.11.11").allowed
    assert routers.check_identity("198.18.11.11", "kiosk-a1-1").allowed
    assert routers.check_address("127.18.11.11") == DENY_ADDRESS
    assert routers.check_identity("127.18.11.11", "kiosk-a1-1") == DENY_IDENTITY
    assert LISTS["store-router-a1"].check_address("198.18.11.11") == DENY_ADDRESS


@pytest.mark.parametrize("mode", ["loopback", "netns"])
def test_every_address_and_identity_decision_matches_the_file(mode: str) -> None:
    lists = compile_allowlists(TOPO, mode)
    for dst in TOPO.nodes.values():
        if not dst.is_server:
            continue
        allowed = allowed_sources(dst)
        for src in TOPO.nodes.values():
            ip = src.address_in(mode)
            assert lists[dst.id].check_address(ip).allowed == (src.id in allowed), (src.id, dst.id)
            for other in TOPO.nodes.values():
                expected = src.id in allowed and other.id == src.id
                assert lists[dst.id].check_identity(other.address_in(mode), src.id).allowed == expected


def test_decision_names_the_rule_that_allowed_it() -> None:
    topo = Topology(
        name="t",
        nodes={
            "srv": Node(
                id="srv",
                kind="issuance-center",
                site="c",
                address="127.0.0.1",
                port=8443,
                allow=(
                    AllowRule(sources=("r1",), requests=("GET /a",)),
                    AllowRule(sources=("r1", "r2"), requests=("POST /b/*",)),
                ),
            ),
            "r1": Node(id="r1", kind="dmz-relay", site="d", address="127.0.0.2", port=8443, upstream="srv"),
            "r2": Node(id="r2", kind="dmz-relay", site="d", address="127.0.0.3", port=8443, upstream="srv"),
        },
    )
    srv = compile_allowlists(topo)["srv"]
    assert srv.check_address("127.0.0.2").rule == "nodes.srv.allow[0]"  # the first rule naming r1
    assert srv.check_address("127.0.0.3").rule == "nodes.srv.allow[1]"
    assert srv.check_request("r1", "GET", "/a").rule == "nodes.srv.allow[0]"
    assert srv.check_request("r1", "POST", "/b/c").rule == "nodes.srv.allow[1]"
    assert srv.check_request("r2", "GET", "/a") == DENY_REQUEST  # rule 0 does not list r2


def test_compiling_a_rule_for_an_unknown_node_fails_loudly() -> None:
    topo = Topology(
        name="t",
        nodes={
            "srv": Node(
                id="srv",
                kind="ocsp",
                site="c",
                address="127.0.0.1",
                port=8443,
                allow=(AllowRule(sources=("ghost",), requests=("GET /",)),),
            )
        },
    )
    with pytest.raises(ValueError, match="ghost"):
        compile_allowlists(topo)


@pytest.mark.parametrize(
    ("pattern", "parsed"),
    [
        ("POST /v1/*", ("POST", "/v1/", True)),
        ("GET /", ("GET", "/", False)),
        ("HEAD /*", ("HEAD", "/", True)),
        ("DELETE /a/b", ("DELETE", "/a/b", False)),
    ],
)
def test_parse_request_pattern(pattern: str, parsed: tuple[str, str, bool]) -> None:
    assert parse_request_pattern(pattern) == parsed


@pytest.mark.parametrize("pattern", ["PATCH /x", "GET", "GET *", "GET /a*b", "GET /**", "get /x", "GET /x y"])
def test_parse_request_pattern_rejects_malformed(pattern: str) -> None:
    with pytest.raises(ValueError):
        parse_request_pattern(pattern)


# --- reachability ----------------------------------------------------------------------------

MATRIX = reachability(TOPO)


def test_reachability_covers_every_source_and_server_pair() -> None:
    servers = [n for n in TOPO.nodes.values() if n.is_server]
    assert len(MATRIX) == len(servers) * (len(TOPO.nodes) - 1)
    assert len({(r.src, r.dst) for r in MATRIX}) == len(MATRIX)
    assert all(r.port == 8443 and r.proto == "h2+tls" for r in MATRIX)


def test_reachability_allows_exactly_the_configured_pairs() -> None:
    allowed = {(r.src, r.dst) for r in MATRIX if r.allowed}
    expected = {(src, dst.id) for dst in TOPO.nodes.values() for src in allowed_sources(dst)}
    assert allowed == expected
    assert len(allowed) == 38
    assert all(r.rule == f"nodes.{r.dst}.allow[0]" for r in MATRIX if r.allowed)
    assert all(r.rule is None for r in MATRIX if not r.allowed)


def test_reachability_has_no_store_to_center_pair() -> None:
    kind = {n.id: n.kind for n in TOPO.nodes.values()}
    assert not [r for r in MATRIX if r.allowed and kind[r.src] in STORE_KINDS and kind[r.dst] in CENTER_KINDS]
    assert not [r for r in MATRIX if r.allowed and kind[r.src] in CENTER_KINDS and kind[r.dst] in STORE_KINDS]
    # and the forbidden pairs are listed, so probes can prove them closed
    assert any(r.src == "kiosk-a1-1" and r.dst == "issuance-center" and not r.allowed for r in MATRIX)


def test_wifi_reaches_nothing() -> None:
    assert not [r for r in MATRIX if r.allowed and r.src.startswith("wifi-")]
    assert sum(1 for r in MATRIX if r.src == "wifi-a1") == 21


def test_reachability_agrees_with_the_allow_lists() -> None:
    for r in MATRIX:
        assert LISTS[r.dst].check_address(addr(r.src)).allowed == r.allowed
        assert LISTS[r.dst].check_identity(addr(r.src), r.src).allowed == r.allowed


def test_default_topology_passes_the_security_annex_audit() -> None:
    assert annex_violations(TOPO) == []
