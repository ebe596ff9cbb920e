"""`konbini schema` describes the files konbini ships and reads: every shipped topology validates
against it, and so does the compact shorthand docs/topology.md shows (`from: {kind: …}`, one role)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from topology.cli.main import main
from topology.spec.load import DEFAULT_TOPOLOGY, check_file, read_yaml

SHIPPED = sorted(DEFAULT_TOPOLOGY.parent.glob("*.yaml"))


def schema_from_the_command(capsys) -> jsonschema.Draft202012Validator:
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_topology_validates_against_the_schema(path: Path, capsys):
    assert {p.name for p in SHIPPED} >= {"default.yaml", "redundant.yaml", "national.yaml", "realistic.yaml"}
    errors = [
        f"{list(e.absolute_path)}: {e.message[:200]}"
        for e in schema_from_the_command(capsys).iter_errors(read_yaml(path))
    ]
    assert errors == []


README_COMPACT = """\
name: from-the-readme
defaults: {port: 8443}
kinds:
  store-router:
    allow:
      - from: {kind: kiosk, same: site}
        requests: ["POST /v1/*"]
  ec-router:
    allow:
      - from: {kind: store-router, same: operator}
        requests: ["POST /v1/*"]
  dmz-relay:
    upstream: issuance-center
    allow:
      - from: ec-router-a
        requests: ["POST /v1/*"]
  issuance-center:
    allow:
      - from: [{kind: dmz-relay}]
        requests: ["POST /v1/*"]
pools:
  stores-a: 127.64.0.0/28
groups:
  stores-a: {range: "a[1-2]", pool: stores-a, operator: a, upstream: ec-router-a, kiosks: 1}
nodes:
  ec-router-a: {kind: ec-router, site: ec-a, operator: a, address: 127.18.10.1, upstream: dmz-relay-a}
  dmz-relay-a: {kind: dmz-relay, site: dmz-a, operator: a, address: 127.18.10.2}
  issuance-center: {kind: issuance-center, site: center, address: 127.18.0.1}
lines:
  - {id: dmz-a, a: ec-router-a, b: dmz-relay-a, kind: dmz}
  - {id: ded-a, a: dmz-relay-a, b: issuance-center, kind: dedicated-line}
"""


def test_the_readme_shorthand_from_one_role_validates_and_checks(tmp_path: Path, capsys):
    path = tmp_path / "readme.yaml"
    path.write_text(README_COMPACT, encoding="utf-8")
    validator = schema_from_the_command(capsys)
    assert [e.message for e in validator.iter_errors(read_yaml(path))] == []
    assert [p for p in check_file(path) if "from" in p.field] == []  # the loader reads the same shorthand


def test_the_schema_still_refuses_a_misspelt_field(capsys):
    validator = schema_from_the_command(capsys)
    data = read_yaml(DEFAULT_TOPOLOGY)
    data["nodes"]["ocsp"]["adress"] = data["nodes"]["ocsp"].pop("address")
    assert any("adress" in e.message for e in validator.iter_errors(data))
