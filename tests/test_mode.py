"""Modes are one typed vocabulary (`topology.spec.model.Mode`) that keeps the CLI's and the files' spellings."""

from __future__ import annotations

import json

import msgspec
import pytest

from topology.spec.model import Mode, Node


def test_modes_keep_their_spellings():
    assert [str(m) for m in Mode] == ["loopback", "netns", "cluster"]
    assert Mode("netns") is Mode.NETNS
    assert json.dumps({"mode": Mode.NETNS}) == '{"mode": "netns"}'  # state files and reports
    assert msgspec.json.decode(msgspec.json.encode(Mode.CLUSTER), type=Mode) is Mode.CLUSTER
    assert f"({Mode.LOOPBACK})" == "(loopback)"


def test_a_node_has_an_address_in_each_mode_that_has_addresses():
    node = Node(id="ocsp", kind="ocsp", site="center", address="127.18.0.5", port=8443)
    assert node.address_in(Mode.LOOPBACK) == "127.18.0.5"
    assert node.address_in(Mode.NETNS) == "198.18.0.5"
    with pytest.raises(ValueError, match="unknown mode 'cluster'"):
        node.address_in(Mode.CLUSTER)
