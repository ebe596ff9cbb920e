"""`konbini check`: the default topology is clean, and every kind of bad file is caught with
file, line, field and (for the security annex) the requirement it breaks."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import yaml

from topology.cli.check import check_main
from topology.spec.load import (
    DEFAULT_TOPOLOGY,
    Problem,
    TopologyError,
    check_file,
    load_topology,
)
from topology.spec.model import derive_netns_address

DEFAULT_TEXT = DEFAULT_TOPOLOGY.read_text()


def edited(tmp_path: Path, *replacements: tuple[str, str], append: str = "") -> tuple[Path, str]:
    """default.yaml with each `old` (which must occur exactly once) replaced by `new`."""
    text = DEFAULT_TEXT
    for old, new in replacements:
        assert text.count(old) == 1, f"{old!r} occurs {text.count(old)} times in default.yaml"
        text = text.replace(old, new)
    text += append
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return path, text


def line_of(text: str, needle: str) -> int:
    """1-based number of the only line containing `needle`."""
    hits = [i for i, line in enumerate(text.splitlines(), 1) if needle in line]
    assert len(hits) == 1, f"{needle!r} is on lines {hits}"
    return hits[0]


def only(problems: list[Problem], field: str) -> Problem:
    hits = [p for p in problems if p.field == field]
    assert len(hits) == 1, f"expected one problem on {field}, got {[str(p) for p in problems]}"
    return hits[0]


def line_in_node(text: str, node_id: str, needle: str) -> int:
    """1-based number of the first line containing `needle` inside node `node_id`'s block."""
    lines = text.splitlines()
    start = lines.index(f"  {node_id}:") if f"  {node_id}:" in lines else line_of(text, f"  {node_id}:  #") - 1
    return next(i for i in range(start, len(lines)) if needle in lines[i]) + 1


def line_index(line_id: str) -> int:
    return [line["id"] for line in yaml.safe_load(DEFAULT_TEXT)["lines"]].index(line_id)


# --- the default topology --------------------------------------------------------------------


def test_default_topology_has_no_problems() -> None:
    assert check_file(DEFAULT_TOPOLOGY) == []


def test_default_topology_has_the_documented_nodes_and_lines() -> None:
    topo = load_topology(DEFAULT_TOPOLOGY)
    assert Counter(n.kind for n in topo.nodes.values()) == {
        "kiosk": 12,
        "store-router": 6,
        "store-controller": 6,
        "wifi": 6,
        "ec-router": 2,
        "dmz-relay": 2,
        "issuance-center": 1,
        "ocsp": 1,
        "municipality": 3,
    }
    assert len(topo.lines) == 50
    assert sum(len(n.allow) for n in topo.nodes.values()) == 22
    assert topo.source == str(DEFAULT_TOPOLOGY)
    assert topo.node("kiosk-a1-1").address == "127.18.11.11"
    assert topo.node("kiosk-b3-2").address == "127.18.23.12"
    assert topo.node("dmz-relay-b").address == "127.18.20.2"
    assert all(n.port == 8443 for n in topo.nodes.values() if n.is_server)
    assert {n.id: n.upstream for n in topo.nodes.values() if n.id.endswith("a1") or n.id.startswith("kiosk-a1")} == {
        "store-router-a1": "ec-router-a",
        "store-controller-a1": None,
        "wifi-a1": None,
        "kiosk-a1-1": "store-router-a1",
        "kiosk-a1-2": "store-router-a1",
    }


def test_default_municipalities_carry_codes_hours_and_fees() -> None:
    topo = load_topology(DEFAULT_TOPOLOGY)
    munis = topo.municipalities()
    assert {code: node.id for code, node in munis.items()} == {
        "131016": "muni-a",
        "141003": "muni-b",
        "271004": "muni-c",
    }
    a, b, c = (topo.node(f"muni-{x}").municipality for x in "abc")
    assert a is not None and b is not None and c is not None
    assert a.certificates == {
        "residence-record": 200,
        "seal-registration": 200,
        "tax-certificate": 300,
        "family-register": 450,
        "vaccination": 120,
    }
    assert "family-register" not in b.certificates
    assert (b.hours.open, b.hours.close) == ("08:30", "19:00")
    assert (a.hours.open, a.hours.close) == ("06:30", "23:00")
    assert (a.participating, b.participating, c.participating) == (True, True, False)


def test_default_netns_addresses_are_derived_and_unique() -> None:
    topo = load_topology(DEFAULT_TOPOLOGY)
    for node in topo.nodes.values():
        assert node.netns_address == derive_netns_address(node.address)
        assert node.address_in("netns") == node.netns_address
    assert len({n.netns_address for n in topo.nodes.values()}) == len(topo.nodes)


def test_dedicated_line_carries_its_impairment() -> None:
    topo = load_topology(DEFAULT_TOPOLOGY)
    line = next(line for line in topo.lines if line.id == "dedicated-a")
    assert (line.a, line.b, line.kind, line.impair.delay) == ("dmz-relay-a", "issuance-center", "dedicated-line", "2ms")


def test_check_main_prints_a_summary_for_a_good_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert check_main(str(DEFAULT_TOPOLOGY)) == 0
    out, err = capsys.readouterr()
    assert out == "OK: default: 39 nodes, 50 lines, 22 allow rules\n"
    assert err == ""


# --- bad files: what the brief calls out -----------------------------------------------------


def test_unknown_upstream_names_file_line_and_field(tmp_path: Path) -> None:
    path, text = edited(
        tmp_path,
        (
            "address: 127.18.11.11\n    upstream: store-router-a1",
            "address: 127.18.11.11\n    upstream: store-router-a9",
        ),
    )
    problem = only(check_file(path), "nodes.kiosk-a1-1.upstream")
    assert problem.file == str(path)
    assert problem.line == line_of(text, "upstream: store-router-a9")
    assert "unknown node 'store-router-a9'" in problem.message
    assert str(problem).startswith(f"{path}:{problem.line}: nodes.kiosk-a1-1.upstream: ")


def test_duplicate_address_is_caught(tmp_path: Path) -> None:
    path, text = edited(tmp_path, ("address: 127.18.11.12", "address: 127.18.11.11"))
    problems = check_file(path)
    problem = only(problems, "nodes.kiosk-a1-2.address")
    assert problem.line == line_in_node(text, "kiosk-a1-2", "address:")
    assert "already kiosk-a1-1's" in problem.message
    assert len(problems) == 1  # the clash of the derived netns address is not reported twice


def test_duplicate_netns_address_is_caught(tmp_path: Path) -> None:
    path, text = edited(
        tmp_path,
        ("address: 127.18.0.2\n", "address: 127.18.0.2\n    netns_address: 198.18.0.1\n"),
    )
    problem = only(check_file(path), "nodes.ocsp.netns_address")
    assert problem.line == line_of(text, "netns_address: 198.18.0.1")
    assert "already issuance-center's" in problem.message


def test_line_to_nowhere_is_caught(tmp_path: Path) -> None:
    path, text = edited(tmp_path, ("b: muni-c, kind: lgwan", "b: muni-z, kind: lgwan"))
    problem = only(check_file(path), f"lines[{line_index('lgwan-c')}].b")
    assert problem.line == line_of(text, "b: muni-z")
    assert problem.message == "line to nowhere: unknown node 'muni-z'"


def test_allow_list_entry_for_unknown_peer_is_caught(tmp_path: Path) -> None:
    path, text = edited(
        tmp_path,
        (
            '- from: issuance-center\n        requests: ["POST /ocsp"]',
            '- from: [issuance-center, ocsp-admin]\n        requests: ["POST /ocsp"]',
        ),
    )
    problem = only(check_file(path), "nodes.ocsp.allow[0].from[1]")
    assert problem.line == line_of(text, "ocsp-admin")
    assert problem.message == "allow-list entry for an unknown peer 'ocsp-admin'"
    assert problem.rule is None


def test_allow_list_port_other_than_the_nodes_own_is_caught(tmp_path: Path) -> None:
    path, text = edited(
        tmp_path, ('requests: ["POST /ocsp"]\n        port: 8443', 'requests: ["POST /ocsp"]\n        port: 9443')
    )
    problem = only(check_file(path), "nodes.ocsp.allow[0].port")
    assert problem.line == line_of(text, "port: 9443")
    assert problem.message == "port 9443 is not the port ocsp listens on (8443)"


ANNEX_CASES = [
    pytest.param(
        ("from: [dmz-relay-a, dmz-relay-b]", "from: [dmz-relay-a, dmz-relay-b, store-router-a1]"),
        "nodes.issuance-center.allow[0].from[2]",
        "dmz-relay-b, store-router-a1]",
        "SEC-SN-3",
        id="store-router-allowed-at-issuance-center",
    ),
    pytest.param(
        (
            'from: [kiosk-a1-1, kiosk-a1-2]\n        requests: ["POST /v1/heartbeat"',
            'from: [kiosk-a1-1, kiosk-a1-2, issuance-center]\n        requests: ["POST /v1/heartbeat"',
        ),
        "nodes.store-controller-a1.allow[0].from[2]",
        "kiosk-a1-2, issuance-center]",
        "SEC-EC-2",
        id="issuance-center-allowed-at-store-controller",
    ),
    pytest.param(
        (
            "address: 127.18.11.11\n    upstream: store-router-a1\n",
            'address: 127.18.11.11\n    upstream: store-router-a1\n    allow:\n      - {from: wifi-a1, requests: ["GET /*"]}\n',
        ),
        "nodes.kiosk-a1-1.allow[0].from[0]",
        "from: wifi-a1",
        "SEC-ST-4",
        id="kiosk-reachable-from-wifi",
    ),
    pytest.param(
        (
            'from: [kiosk-a1-1, kiosk-a1-2]\n        requests: ["POST /v1/*"',
            'from: [kiosk-a1-1, kiosk-a1-2, wifi-a1]\n        requests: ["POST /v1/*"',
        ),
        "nodes.store-router-a1.allow[0].from[2]",
        "kiosk-a1-2, wifi-a1]",
        "SEC-ST-4",
        id="wifi-allowed-at-store-router",
    ),
    pytest.param(
        (
            "from: [store-router-a1, store-router-a2, store-router-a3]",
            "from: [store-router-a1, store-router-a2, store-router-a3, kiosk-a1-1]",
        ),
        "nodes.ec-router-a.allow[0].from[3]",
        "store-router-a3, kiosk-a1-1]",
        "SEC-EC-1",
        id="ec-router-accepting-a-kiosk",
    ),
    pytest.param(
        (
            "from: [store-router-b1, store-router-b2, store-router-b3]",
            "from: [store-router-b1, store-router-b2, store-router-b3, store-router-a1]",
        ),
        "nodes.ec-router-b.allow[0].from[3]",
        "store-router-b3, store-router-a1]",
        "SEC-EC-1",
        id="ec-router-accepting-another-operators-store",
    ),
    pytest.param(
        (
            'from: [kiosk-a1-1, kiosk-a1-2]\n        requests: ["POST /v1/*"',
            'from: [kiosk-a1-1, kiosk-a1-2, kiosk-a2-1]\n        requests: ["POST /v1/*"',
        ),
        "nodes.store-router-a1.allow[0].from[2]",
        "kiosk-a1-2, kiosk-a2-1]",
        "SEC-ST-2",
        id="store-router-accepting-another-stores-kiosk",
    ),
    pytest.param(
        ("- from: ec-router-a\n", "- from: [ec-router-a, store-router-a1]\n"),
        "nodes.dmz-relay-a.allow[0].from[1]",
        "from: [ec-router-a, store-router-a1]",
        "SEC-EC-3",
        id="dmz-relay-accepting-a-store-router",
    ),
    pytest.param(
        ("from: [dmz-relay-a, dmz-relay-b]", "from: [dmz-relay-a, dmz-relay-b, ec-router-a]"),
        "nodes.issuance-center.allow[0].from[2]",
        "dmz-relay-b, ec-router-a]",
        "SEC-EC-3",
        id="issuance-center-bypassing-the-dmz-relay",
    ),
    pytest.param(
        ("upstream: dmz-relay-a", "upstream: issuance-center  # shortcut"),
        "nodes.ec-router-a.upstream",
        "# shortcut",
        "SEC-EC-3",
        id="ec-router-forwarding-around-the-dmz-relay",
    ),
]


@pytest.mark.parametrize(("edit", "field", "line_needle", "rule"), ANNEX_CASES)
def test_security_annex_violation_names_its_rule(
    tmp_path: Path, edit: tuple[str, str], field: str, line_needle: str, rule: str
) -> None:
    path, text = edited(tmp_path, edit)
    annex = [p for p in check_file(path) if p.rule is not None]
    assert [(p.field, p.rule) for p in annex] == [(field, rule)]
    assert annex[0].line == line_of(text, line_needle)
    assert annex[0].file == str(path)
    assert str(annex[0]).endswith(f" [{rule}]")


def test_line_from_store_to_issuance_center_breaks_sec_sn_3(tmp_path: Path) -> None:
    path, text = edited(
        tmp_path, append="  - {id: shortcut, a: store-router-a1, b: issuance-center, kind: closed-line}\n"
    )
    problem = only(check_file(path), "lines[50]")
    assert (problem.rule, problem.line) == ("SEC-SN-3", line_of(text, "id: shortcut"))


def test_line_from_wifi_to_kiosk_breaks_sec_st_4(tmp_path: Path) -> None:
    path, text = edited(tmp_path, append="  - {id: wifi-k, a: wifi-a1, b: kiosk-a1-1, kind: wifi}\n")
    problem = only(check_file(path), "lines[50]")
    assert (problem.rule, problem.line) == ("SEC-ST-4", line_of(text, "id: wifi-k"))


STRAY_LINE = "  - {id: stray, a: kiosk-a1-1, b: nowhere, kind: lan}\n"


def test_check_main_prints_each_problem_to_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = edited(tmp_path, ("address: 127.18.11.12", "address: 127.18.11.11"), append=STRAY_LINE)
    assert check_main(str(path)) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [str(p) for p in check_file(path)]
    assert len(err.splitlines()) == 2


def test_load_topology_raises_with_every_problem(tmp_path: Path) -> None:
    path, _ = edited(tmp_path, ("address: 127.18.11.12", "address: 127.18.11.11"), append=STRAY_LINE)
    with pytest.raises(TopologyError) as caught:
        load_topology(path)
    assert len(caught.value.problems) == 2
    assert str(caught.value) == "\n".join(str(p) for p in caught.value.problems)


# --- bad files: structure and business data --------------------------------------------------


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "t.yaml"
    path.write_text(text)
    return path


SMALL = """\
name: small
nodes:
  center:
    kind: issuance-center
    site: center
    address: 127.0.0.1
    port: 8443
"""


def test_small_file_is_clean(tmp_path: Path) -> None:
    assert check_file(write(tmp_path, SMALL)) == []


def test_missing_file_is_one_problem(tmp_path: Path) -> None:
    problems = check_file(tmp_path / "nope.yaml")
    assert len(problems) == 1
    assert (problems[0].line, problems[0].field) == (0, "file")
    assert "No such file" in problems[0].message


def test_yaml_syntax_error_names_its_line(tmp_path: Path) -> None:
    problems = check_file(write(tmp_path, "name: x\nnodes:\n  a: [1,\n  b: }\n"))
    assert len(problems) == 1
    assert problems[0].field == "yaml"
    assert problems[0].line == 4


def test_empty_file_is_a_problem(tmp_path: Path) -> None:
    assert [p.message for p in check_file(write(tmp_path, "# nothing\n"))] == ["the file is empty"]


def test_struct_errors_name_the_field_and_its_line(tmp_path: Path) -> None:
    text = SMALL.replace("    port: 8443\n", "    port: 8443\n    colour: red\n").replace(
        "kind: issuance-center", "kind: issuance-centre"
    )
    problems = check_file(write(tmp_path, text))
    # msgspec stops at the first error inside one node; the kind comes first
    problem = only(problems, "nodes.center.kind")
    assert problem.line == 4
    assert "issuance-centre" in problem.message
    text = SMALL + "    colour: red\n"
    problem = only(check_file(write(tmp_path, text)), "nodes.center.colour")
    assert (problem.line, problem.message) == (8, "unknown field")


def test_missing_required_field_points_at_the_node(tmp_path: Path) -> None:
    problem = only(check_file(write(tmp_path, SMALL.replace("    site: center\n", ""))), "nodes.center.site")
    assert (problem.line, problem.message) == (3, "missing required field")


def test_one_bad_node_does_not_hide_the_others(tmp_path: Path) -> None:
    text = SMALL + "  other:\n    kind: ocsp\n    address: 127.0.0.2\n    port: 8443\n    upstream: nowhere\n"
    text = text.replace("    site: center\n", "", 1)
    fields = {p.field for p in check_file(write(tmp_path, text))}
    assert {"nodes.center.site", "nodes.other.site"} <= fields


def test_duplicate_key_is_caught(tmp_path: Path) -> None:
    problem = only(check_file(write(tmp_path, SMALL + "    port: 9443\n")), "nodes.center.port")
    assert (problem.line, problem.message) == (8, "duplicate key")


def test_unquoted_times_stay_times(tmp_path: Path) -> None:
    # YAML 1.1 would read 19:00 as the integer 1140
    text = SMALL.replace("name: small\n", "name: small\nservice_hours: {open: 06:30, close: 19:00}\n")
    topo = load_topology(write(tmp_path, text))
    assert (topo.service_hours.open, topo.service_hours.close) == ("06:30", "19:00")


@pytest.mark.parametrize(
    ("hours", "field", "message"),
    [
        ('{open: "6:30", close: "23:00"}', "service_hours.open", "'6:30' is not HH:MM (00:00-23:59)"),
        ('{open: "06:30", close: "24:00"}', "service_hours.close", "'24:00' is not HH:MM (00:00-23:59)"),
        ('{open: "23:00", close: "06:30"}', "service_hours.close", "closes at 06:30, not after it opens at 23:00"),
        ('{open: "10:00", close: "10:00"}', "service_hours.close", "closes at 10:00, not after it opens at 10:00"),
    ],
)
def test_bad_hours_are_caught(tmp_path: Path, hours: str, field: str, message: str) -> None:
    text = SMALL.replace("name: small\n", f"name: small\nservice_hours: {hours}\n")
    problem = only(check_file(write(tmp_path, text)), field)
    assert (problem.line, problem.message) == (2, message)


def test_municipality_problems_are_caught(tmp_path: Path) -> None:
    path, text = edited(
        tmp_path,
        ('code: "141003"', 'code: "131016"'),
        (
            "        tax-certificate: 300\n        vaccination: 120\n\n  muni-c",
            "        tax-certificate: -300\n        vaccination: 1.5\n\n  muni-c",
        ),
        ('hours: {open: "08:30", close: "19:00"}', 'hours: {open: "05:30", close: "19:00"}'),
    )
    problems = check_file(path)
    assert only(problems, "nodes.muni-b.municipality.code").line == line_in_node(text, "muni-b", "code:")
    assert "already muni-a's" in only(problems, "nodes.muni-b.municipality.code").message
    fee = only(problems, "nodes.muni-b.municipality.certificates.tax-certificate")
    assert (fee.line, fee.message) == (line_of(text, "tax-certificate: -300"), "fee must not be negative, got -300")
    fee = only(problems, "nodes.muni-b.municipality.certificates.vaccination")
    assert (fee.line, fee.message) == (line_of(text, "vaccination: 1.5"), "fee must be a whole number of yen, got 1.5")
    hours = only(problems, "nodes.muni-b.municipality.hours")
    assert hours.line == line_of(text, "05:30")
    assert "a municipality may only narrow them" in hours.message


def test_municipality_node_without_municipality_data(tmp_path: Path) -> None:
    text = SMALL + "  muni:\n    kind: municipality\n    site: lgwan\n    address: 127.0.0.2\n    port: 8443\n"
    problem = only(check_file(write(tmp_path, text)), "nodes.muni.municipality")
    assert problem.line == 8


def test_ports_and_upstreams_are_checked(tmp_path: Path) -> None:
    path, text = edited(
        tmp_path,
        ("address: 127.18.0.2\n    port: 8443\n", "address: 127.18.0.2\n"),  # ocsp: a server without a port
        ("address: 127.18.11.3\n", "address: 127.18.11.3\n    port: 8443\n"),  # wifi-a1: not a server
        (
            "address: 127.18.11.12\n    upstream: store-router-a1\n",
            "address: 127.18.11.12\n",
        ),  # kiosk-a1-2: no upstream
    )
    problems = check_file(path)
    assert only(problems, "nodes.ocsp.port").message == "a ocsp is a server and needs a port"
    assert only(problems, "nodes.ocsp.port").line == line_of(text, "  ocsp:")
    assert only(problems, "nodes.wifi-a1.port").line == line_in_node(text, "wifi-a1", "port:")
    assert only(problems, "nodes.kiosk-a1-2.upstream").line == line_of(text, "  kiosk-a1-2:")


def test_upstream_and_allowed_peer_must_be_joined_by_a_line(tmp_path: Path) -> None:
    path, text = edited(tmp_path, ("  - {id: closed-a1, a: store-router-a1, b: ec-router-a, kind: closed-line}\n", ""))
    problems = check_file(path)
    upstream = only(problems, "nodes.store-router-a1.upstream")
    assert upstream.message == "upstream ec-router-a is not joined to store-router-a1 by a line"
    assert upstream.line == line_in_node(text, "store-router-a1", "upstream:")
    peer = only(problems, "nodes.ec-router-a.allow[0].from[0]")
    assert peer.message == "peer store-router-a1 is not joined to ec-router-a by a line"
    assert peer.line == line_of(text, "from: [store-router-a1, store-router-a2, store-router-a3]")


@pytest.mark.parametrize("pattern", ["FETCH /x", "GET x", "GET /a*b", "get /x", "GET  /x", "GET /x ", "POST"])
def test_bad_request_pattern_is_caught(tmp_path: Path, pattern: str) -> None:
    path, text = edited(tmp_path, ('requests: ["POST /ocsp"]', f'requests: ["POST /ocsp", "{pattern}"]'))
    problem = only(check_file(path), "nodes.ocsp.allow[0].requests[1]")
    assert problem.line == line_of(text, "POST /ocsp")
    assert pattern in problem.message


def test_duplicate_line_id_is_caught(tmp_path: Path) -> None:
    path, text = edited(tmp_path, append="  - {id: dmz-a, a: ec-router-a, b: dmz-relay-a, kind: dmz}\n")
    problem = only(check_file(path), "lines[50].id")
    assert problem.line == len(text.splitlines())
    assert problem.message == "duplicate line id 'dmz-a'"


def test_addresses_outside_their_ranges_are_caught(tmp_path: Path) -> None:
    path, text = edited(
        tmp_path,
        ("address: 127.18.0.1\n", "address: 10.18.0.1\n"),
        ("address: 127.18.0.2\n", "address: 127.18.0.2\n    netns_address: 10.0.0.2\n"),
    )
    problems = check_file(path)
    assert only(problems, "nodes.issuance-center.address").line == line_of(text, "10.18.0.1")
    assert "outside 127.0.0.0/8" in only(problems, "nodes.issuance-center.address").message
    assert only(problems, "nodes.ocsp.netns_address").line == line_of(text, "10.0.0.2")
    assert "outside 198.18.0.0/15" in only(problems, "nodes.ocsp.netns_address").message


def test_scalar_from_means_a_one_element_list() -> None:
    topo = load_topology(DEFAULT_TOPOLOGY)
    assert topo.node("ocsp").allow[0].sources == ("issuance-center",)


def test_tls_floor_is_1_3_unless_the_file_asks_for_1_2(tmp_path):
    assert load_topology(DEFAULT_TOPOLOGY).tls_min_version == "1.3"
    bad = tmp_path / "tls11.yaml"
    bad.write_text(DEFAULT_TEXT + '\ntls_min_version: "1.1"\n')
    problems = check_file(bad)
    assert len(problems) == 1 and "tls_min_version" in str(problems[0])
