"""Mistakes in a compact file that used to pass or to bury themselves: a field under `kinds` that
no node takes is a problem at its own line, and a derived id that clashes is one problem, not a
cascade of follow-on ones."""

from __future__ import annotations

from tests.test_expand import SMALL, line_of, write
from topology.spec.load import check_file

KIOSK_ALLOW = """  kiosk:
    allow: [{from: ec-router-a, requests: ["POST /v1/*"]}]
"""


def test_an_allow_list_under_kinds_kiosk_is_a_problem_at_its_line(tmp_path):
    text = SMALL.replace("kinds:\n", "kinds:\n" + KIOSK_ALLOW)
    problems = check_file(write(tmp_path, text))
    assert [(p.field, p.line) for p in problems] == [("kinds.kiosk.allow", line_of(text, "from: ec-router-a"))]
    assert "has no effect" in problems[0].message and "does not listen" in problems[0].message


def test_a_group_kiosk_setting_is_a_problem_at_its_line(tmp_path):
    text = SMALL.replace(
        "kiosks: 2}", "kiosks: 2,\n          kinds: {kiosk: {upstream: ec-router-a}, ec-router: {port: 9443}}}"
    )
    problems = check_file(write(tmp_path, text))
    assert sorted(p.field for p in problems) == [
        "groups.shops.kinds.ec-router.port",
        "groups.shops.kinds.kiosk.upstream",
    ]
    assert all(p.line == line_of(text, "kinds: {kiosk:") and "has no effect" in p.message for p in problems)


def test_a_top_level_setting_only_group_members_would_take_is_a_problem(tmp_path):
    text = SMALL.replace(
        "kinds:\n", "kinds:\n  wifi: {operator: b}\n  store-router:\n    upstream: ec-router-a\n", 1
    ).replace("  store-router:\n    allow", "    allow", 1)
    problems = check_file(write(tmp_path, text))
    assert sorted((p.field, p.line) for p in problems) == [
        ("kinds.store-router.upstream", line_of(text, "    upstream: ec-router-a")),
        ("kinds.wifi.operator", line_of(text, "wifi: {operator: b}")),
    ]


def test_settings_that_take_effect_are_not_reported(tmp_path):
    assert check_file(write(tmp_path, SMALL)) == []


def test_an_explicit_node_on_a_derived_id_is_one_problem_at_the_range(tmp_path):
    text = SMALL.replace(
        "nodes:\n", "nodes:\n  wifi-s02: {kind: wifi, site: wifi-x, operator: a, address: 127.18.40.1}\n"
    )
    problems = check_file(write(tmp_path, text))
    assert [(p.field, p.line) for p in problems] == [("groups.shops.range", line_of(text, "shops:"))]
    assert f"'wifi-s02' is already taken by the node on line {line_of(text, 'wifi-s02:')}" in problems[0].message


def test_an_explicit_kiosk_clashes_only_with_a_member_that_has_that_many_kiosks(tmp_path):
    text = SMALL.replace(
        "nodes:\n",
        "nodes:\n  kiosk-s01-3: {kind: kiosk, site: store-x, operator: a, address: 127.18.40.1, upstream: ec-router-a}\n",
    )
    assert not any(p.field == "groups.shops.range" for p in check_file(write(tmp_path, text)))


def test_a_group_that_cannot_be_built_is_one_problem_not_unknown_peers(tmp_path):
    text = SMALL.replace(", upstream: ec-router-a, kiosks: 2}", ", kiosks: 2}")
    problems = check_file(write(tmp_path, text))
    assert [(p.field, p.line) for p in problems] == [("groups.shops.upstream", line_of(text, "shops:"))]
