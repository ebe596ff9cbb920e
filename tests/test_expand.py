"""The compact topology format: inheritance, store ranges, pools and role-based allow-lists expand
to exactly the explicit topology, and problems inside templates and ranges name file:line:field."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from topology.cli.expand import write_expanded
from topology.cli.graph import svg
from topology.cli.main import main
from topology.policy.compiler import annex_violations, compile_allowlists, reachability
from topology.spec.expand import json_schema, member_names
from topology.spec.load import DEFAULT_TOPOLOGY, check_file, load_topology

COMPACT_DEFAULT = """\
name: default
state_dir: .konbini
service_hours: {open: "06:30", close: "23:00"}
defaults:
  port: 8443
kinds:
  issuance-center:
    allow:
      - from: {kind: dmz-relay}
        requests: ["POST /v1/*", "GET /bench/*", "POST /bench/*"]
        port: 8443
  ec-router:
    allow:
      - from: {kind: store-router, same: operator}
        requests: ["POST /v1/*", "GET /bench/*", "POST /bench/*"]
        port: 8443
  dmz-relay:
    allow:
      - from: {kind: ec-router, same: operator}
        requests: ["POST /v1/*", "GET /bench/*", "POST /bench/*"]
        port: 8443
  store-router:
    allow:
      - from: {kind: kiosk, same: site}
        requests: ["POST /v1/*", "GET /bench/*", "POST /bench/*"]
        port: 8443
  store-controller:
    allow:
      - from: {kind: kiosk, same: site}
        requests: ["POST /v1/heartbeat", "POST /v1/fault"]
        port: 8443
  municipality:
    allow:
      - from: {kind: issuance-center}
        requests: ["POST /v1/document"]
        port: 8443
line_kinds:
  dedicated-line: {impair: {delay: 2ms}}
pools:
  stores-a: 127.18.11.0-127.18.13.255
  stores-b: 127.18.21.0-127.18.23.255
groups:
  stores-a:
    range: a[1-3]
    pool: stores-a
    operator: a
    upstream: ec-router-a
    kiosks: 2
    layout: {block: 256, store-router: 1, store-controller: 2, wifi: 3, kiosk: 11}
  stores-b:
    range: b[1-3]
    pool: stores-b
    operator: b
    upstream: ec-router-b
    kiosks: 2
    layout: {block: 256, store-router: 1, store-controller: 2, wifi: 3, kiosk: 11}
nodes:
  issuance-center: {kind: issuance-center, site: center, address: 127.18.0.1}
  ocsp:
    kind: ocsp
    site: center
    address: 127.18.0.2
    allow:
      - {from: issuance-center, requests: ["POST /ocsp"], port: 8443}
      - {from: issuance-center, requests: ["GET /crl"], port: 8443}
  muni-a:
    kind: municipality
    site: lgwan-a
    address: 127.18.0.11
    municipality:
      code: "131016"
      name: 千代田区
      certificates: {residence-record: 200, seal-registration: 200, tax-certificate: 300, family-register: 450, vaccination: 120}
  muni-b:
    kind: municipality
    site: lgwan-b
    address: 127.18.0.12
    municipality:
      code: "141003"
      name: 横浜市
      hours: {open: "08:30", close: "19:00"}
      certificates: {residence-record: 200, seal-registration: 200, tax-certificate: 300, vaccination: 120}
  muni-c:
    kind: municipality
    site: lgwan-c
    address: 127.18.0.13
    municipality:
      code: "271004"
      name: 大阪市
      participating: false
      certificates: {residence-record: 200, seal-registration: 200, tax-certificate: 300, family-register: 450, vaccination: 120}
  ec-router-a: {kind: ec-router, site: ec-a, operator: a, address: 127.18.10.1, upstream: dmz-relay-a}
  dmz-relay-a: {kind: dmz-relay, site: dmz-a, operator: a, address: 127.18.10.2, upstream: issuance-center}
  ec-router-b: {kind: ec-router, site: ec-b, operator: b, address: 127.18.20.1, upstream: dmz-relay-b}
  dmz-relay-b: {kind: dmz-relay, site: dmz-b, operator: b, address: 127.18.20.2, upstream: issuance-center}
lines:
  - {id: lan-center-ocsp, a: issuance-center, b: ocsp, kind: lan}
  - {id: lgwan-a, a: issuance-center, b: muni-a, kind: lgwan}
  - {id: lgwan-b, a: issuance-center, b: muni-b, kind: lgwan}
  - {id: lgwan-c, a: issuance-center, b: muni-c, kind: lgwan}
  - {id: dedicated-a, a: dmz-relay-a, b: issuance-center, kind: dedicated-line}
  - {id: dmz-a, a: ec-router-a, b: dmz-relay-a, kind: dmz}
  - {id: dedicated-b, a: dmz-relay-b, b: issuance-center, kind: dedicated-line}
  - {id: dmz-b, a: ec-router-b, b: dmz-relay-b, kind: dmz}
"""


def write(tmp_path: Path, text: str, name: str = "compact.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def line_of(text: str, needle: str) -> int:
    hits = [i for i, line in enumerate(text.splitlines(), 1) if needle in line]
    assert len(hits) == 1, f"{needle!r} is on lines {hits}"
    return hits[0]


def _without_annex_fields(topo):
    """The default file may carry the administration surface (admin_port/admin), which the compact default leaves out."""
    return {k: msgspec.structs.replace(n, admin_port=None, admin=()) for k, n in topo.nodes.items()}


def test_compact_default_expands_to_exactly_the_explicit_default(tmp_path):
    compact = load_topology(write(tmp_path, COMPACT_DEFAULT))
    explicit = load_topology(DEFAULT_TOPOLOGY)
    assert _without_annex_fields(compact) == _without_annex_fields(explicit)
    assert sorted(compact.lines, key=lambda x: x.id) == sorted(explicit.lines, key=lambda x: x.id)
    assert (compact.name, compact.service_hours, compact.state_dir) == (
        explicit.name,
        explicit.service_hours,
        explicit.state_dir,
    )


def test_expand_output_loads_back_to_the_same_topology(tmp_path):
    compact = load_topology(write(tmp_path, COMPACT_DEFAULT))
    out = tmp_path / "expanded.yaml"
    with out.open("w") as f:
        write_expanded(compact, f)
    again = load_topology(out)
    assert again.nodes == compact.nodes and again.lines == compact.lines
    assert "# allow[0] from" in out.read_text()  # an auditor sees where a templated entry came from


def test_template_rules_remember_their_file_line(tmp_path):
    path = write(tmp_path, COMPACT_DEFAULT)
    topo = load_topology(path)
    lines = COMPACT_DEFAULT.splitlines()
    router_template = lines.index("  store-router:") + 3  # the allow entry's `- from:` line, 1-based
    assert topo.rule_origins["nodes.store-router-b2.allow[0]"] == f"{path}:{router_template}"
    assert topo.rule_origins["nodes.ec-router-a.allow[0]"].endswith(f":{lines.index('  ec-router:') + 3}")
    assert "nodes.ocsp.allow[0]" not in topo.rule_origins  # written out by hand: no template


def test_role_templates_resolve_to_the_right_ids(tmp_path):
    topo = load_topology(write(tmp_path, COMPACT_DEFAULT))
    assert topo.node("ec-router-a").allow[0].sources == ("store-router-a1", "store-router-a2", "store-router-a3")
    assert topo.node("store-router-b3").allow[0].sources == ("kiosk-b3-1", "kiosk-b3-2")
    assert topo.node("issuance-center").allow[0].sources == ("dmz-relay-a", "dmz-relay-b")


def test_member_ids_addresses_and_certificate_names_are_derived():
    assert member_names("a[00001-00003]") == ["a00001", "a00002", "a00003"]
    assert member_names("x[8-11]") == ["x8", "x9", "x10", "x11"]
    with pytest.raises(ValueError):
        member_names("a[3-1]")


SMALL = """\
name: small
defaults: {port: 8443}
kinds:
  store-router:
    allow: [{from: {kind: kiosk, same: site}, requests: ["POST /v1/*"]}]
  store-controller:
    allow: [{from: {kind: kiosk, same: site}, requests: ["POST /v1/heartbeat"]}]
  ec-router:
    allow: [{from: {kind: store-router, same: operator}, requests: ["POST /v1/*"]}]
  dmz-relay:
    allow: [{from: {kind: ec-router, same: operator}, requests: ["POST /v1/*"]}]
  issuance-center:
    allow: [{from: {kind: dmz-relay}, requests: ["POST /v1/*"]}]
pools:
  stores: 127.64.0.0/28
groups:
  shops: {range: "s[01-02]", pool: stores, operator: a, upstream: ec-router-a, kiosks: 2}
nodes:
  issuance-center: {kind: issuance-center, site: center, address: 127.18.0.1}
  issuance-center-2: {kind: issuance-center, site: center-2, address: 127.18.0.3}
  ec-router-a: {kind: ec-router, site: ec-a, operator: a, address: 127.18.10.1, upstreams: [dmz-relay-a1, dmz-relay-a2]}
  dmz-relay-a1: {kind: dmz-relay, site: dmz-a1, operator: a, address: 127.18.10.2, upstreams: [issuance-center, issuance-center-2]}
  dmz-relay-a2: {kind: dmz-relay, site: dmz-a2, operator: a, address: 127.18.10.3, upstreams: [issuance-center, issuance-center-2]}
lines:
  - {id: dmz-a1, a: ec-router-a, b: dmz-relay-a1, kind: dmz}
  - {id: dmz-a2, a: ec-router-a, b: dmz-relay-a2, kind: dmz}
  - {id: ded-a1, a: dmz-relay-a1, b: issuance-center, kind: dedicated-line}
  - {id: ded-a2, a: dmz-relay-a2, b: issuance-center, kind: dedicated-line}
  - {id: ded-a1-2, a: dmz-relay-a1, b: issuance-center-2, kind: dedicated-line}
  - {id: ded-a2-2, a: dmz-relay-a2, b: issuance-center-2, kind: dedicated-line}
"""


def test_group_members_get_addresses_from_their_pool_block_by_block(tmp_path):
    topo = load_topology(write(tmp_path, SMALL))
    assert topo.node("store-router-s01").address == "127.64.0.0"
    assert topo.node("kiosk-s01-2").address == "127.64.0.4"
    assert topo.node("store-router-s02").address == "127.64.0.8"
    assert topo.by_address("127.64.0.12").id == "kiosk-s02-2"
    assert topo.by_address("198.18.0.12").id == "kiosk-s02-2"  # netns address, indexed too


class _CountedWalks(dict):
    """A topology's nodes that count how often something walks them."""

    walks = 0

    def values(self):
        type(self).walks += 1
        return super().values()


def test_lookups_by_kind_and_address_walk_the_nodes_once_built_before_a_fork():
    """A national node process looked its 87 municipalities' peers up by kind, 248,000 nodes a
    walk, and built the address index again in each of 20 processes: the launcher builds both before forking."""
    topo = load_topology(DEFAULT_TOPOLOGY)
    topo = msgspec.structs.replace(topo, nodes=_CountedWalks(topo.nodes))
    topo.build_indexes()
    built = _CountedWalks.walks
    kiosks = topo.of_kind("kiosk")
    assert [n.id for n in kiosks] == [n.id for n in topo.nodes.values() if n.kind == "kiosk"]  # file order
    kiosks.clear()  # the caller's own list
    assert topo.of_kind("kiosk") and topo.of_kind("no-such-kind") == []
    assert topo.by_address(topo.node("ocsp").address).id == "ocsp"
    assert _CountedWalks.walks == built + 1  # the comparison above, no lookup


def test_range_overflowing_its_pool_names_the_range_line(tmp_path):
    text = SMALL.replace('range: "s[01-02]"', 'range: "s[01-03]"')
    problems = check_file(write(tmp_path, text))
    assert [p.field for p in problems][:1] == ["groups.shops.range"]
    assert problems[0].line == line_of(text, "shops:") and "overflow pool stores" in problems[0].message


def test_duplicate_derived_ids_are_caught(tmp_path):
    text = SMALL.replace(
        "pools:\n  stores: 127.64.0.0/28", "pools:\n  stores: 127.64.0.0/28\n  more: 127.65.0.0/28"
    ).replace(
        "groups:\n",
        'groups:\n  again: {range: "s[02-02]", pool: more, operator: a, upstream: ec-router-a, kiosks: 1}\n',
    )
    problems = check_file(write(tmp_path, text))
    assert any(
        p.field == "groups.shops.range" and "derived id 'store-router-s02' is already taken" in p.message
        for p in problems
    ), problems


def test_template_naming_an_unknown_group_names_file_line_field(tmp_path):
    text = SMALL.replace("from: {kind: store-router, same: operator}", "from: {kind: store-router, group: shopz}")
    path = write(tmp_path, text)
    problems = check_file(path)
    hit = [p for p in problems if "unknown group 'shopz'" in p.message]
    assert hit and hit[0].file == str(path) and hit[0].line == line_of(text, "group: shopz")
    assert hit[0].field == "kinds.ec-router.allow[0].from[0]"


def test_problem_inside_a_member_template_points_at_the_template(tmp_path):
    text = SMALL.replace(
        'store-controller:\n    allow: [{from: {kind: kiosk, same: site}, requests: ["POST /v1/heartbeat"]}]',
        'store-controller:\n    allow: [{from: {kind: kiosk, same: site}, requests: ["FETCH /v1/heartbeat"]}]',
    )
    problems = check_file(write(tmp_path, text))
    assert len(problems) == 1 and problems[0].line == line_of(text, "FETCH")


def test_redundant_upstreams_are_all_reachable_and_nothing_else(tmp_path):
    topo = load_topology(write(tmp_path, SMALL))
    ec = topo.node("ec-router-a")
    assert ec.upstream == "dmz-relay-a1" and ec.hops == ("dmz-relay-a1", "dmz-relay-a2")
    allowed = {(r.src, r.dst) for r in reachability(topo) if r.allowed}
    assert {("ec-router-a", "dmz-relay-a1"), ("ec-router-a", "dmz-relay-a2")} <= allowed
    assert {("dmz-relay-a1", "issuance-center-2"), ("dmz-relay-a2", "issuance-center")} <= allowed
    assert not any(dst.startswith("dmz-relay") and src != "ec-router-a" for src, dst in allowed)
    assert not any(dst.startswith("issuance-center") and not src.startswith("dmz-relay") for src, dst in allowed)
    allow = compile_allowlists(topo)
    assert allow["dmz-relay-a2"].check_identity("127.18.10.1", "ec-router-a").allowed
    assert annex_violations(topo) == []


def test_every_upstream_is_checked_for_its_kind_and_its_line(tmp_path):
    text = SMALL.replace("upstreams: [dmz-relay-a1, dmz-relay-a2]", "upstreams: [dmz-relay-a1, issuance-center]")
    problems = check_file(write(tmp_path, text))
    fields = {p.field for p in problems}
    assert "nodes.ec-router-a.upstreams[1]" in fields
    assert any(p.rule == "SEC-EC-3" and p.field == "nodes.ec-router-a.upstreams[1]" for p in problems)


def test_one_municipality_may_run_several_document_servers(tmp_path):
    text = DEFAULT_TOPOLOGY.read_text()
    server2 = (
        text[text.index("  muni-b:") : text.index("  muni-c:")]
        .replace("muni-b:", "muni-b2:")
        .replace("127.18.0.12", "127.18.0.14")
    )
    text = (
        text.replace("  muni-c:", server2 + "  muni-c:")
        + "  - {id: lgwan-b2, a: issuance-center, b: muni-b2, kind: lgwan}\n"
    )
    topo = load_topology(write(tmp_path, text))
    assert [n.id for n in topo.of_kind("municipality") if n.municipality.code == "141003"] == ["muni-b", "muni-b2"]
    different = text.replace('hours: {open: "08:30", close: "19:00"}', 'hours: {open: "09:00", close: "19:00"}', 1)
    assert any("duplicate municipality code" in p.message for p in check_file(write(tmp_path, different, "bad.yaml")))


def test_schema_describes_the_compact_format(capsys):
    schema = json_schema()
    top = schema["$defs"]["CompactTopology"]["properties"]
    assert {"groups", "pools", "kinds", "defaults", "municipalities", "nodes", "lines"} <= set(top)
    assert main(["schema"]) == 0 and '"StoreGroup"' in capsys.readouterr().out


def test_graph_draws_operators_not_stores(tmp_path):
    drawing = svg(load_topology(write(tmp_path, SMALL)))
    assert "operator a" in drawing and "2 stores, 4 kiosks" in drawing
    assert "store-router-s01" not in drawing and "closed-line x2" in drawing
    assert main(["graph", str(write(tmp_path, SMALL)), "--out", str(tmp_path / "t.html")]) == 0
    assert (tmp_path / "t.html").read_text().startswith("<!doctype html>")


def test_compact_stores_have_the_admin_surfaces_the_annex_requires(tmp_path):
    """Issue #28: a compact store has its controller's admin API and its kiosks' maintenance
    endpoint, exactly as the hand-written default's stores; `admin: false` leaves them out."""
    compact = load_topology(write(tmp_path, COMPACT_DEFAULT))
    assert compact.nodes == load_topology(DEFAULT_TOPOLOGY).nodes
    bare = load_topology(
        write(
            tmp_path, COMPACT_DEFAULT.replace("    operator: b\n", "    operator: b\n    admin: false\n"), "bare.yaml"
        )
    )
    assert bare.node("kiosk-b1-1").admin_port is None and not bare.node("store-controller-b1").admin
    assert bare.node("kiosk-a1-1").admin and bare.node("store-controller-a1").admin_port == 9440


def test_check_names_the_annex_items_a_file_cannot_show_and_why(tmp_path, capsys):
    path = write(
        tmp_path,
        COMPACT_DEFAULT.replace("    operator: a\n", "    operator: a\n    admin: false\n").replace(
            "    operator: b\n", "    operator: b\n    admin: false\n"
        ),
    )
    assert main(["check", str(path)]) == 0
    cannot = {line.split()[2]: line for line in capsys.readouterr().out.splitlines() if line.startswith("cannot show")}
    assert set(cannot) == {"SEC-ST-3/KI-6", "SEC-KI-4", "SEC-KI-7", "SEC-KI-8"}
    assert "admin: false" in cannot["SEC-KI-4"] and "admin API" in cannot["SEC-KI-8"]
