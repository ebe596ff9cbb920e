"""The kind table (topology/spec/kinds.py) is the one place a node kind's facts live: every reader
of kind facts sees a change made there, and the views kept for the loader agree with it."""

from __future__ import annotations

from typing import get_args

from bench.baselines import haproxy
from gateway.nodes.registry import FACTORIES
from topology.export import k8s
from topology.policy import compiler
from topology.spec import kinds
from topology.spec.kinds import KINDS, RELAY_CHAIN, Accepts, Kind, NodeKind, Resources, Side
from topology.spec.model import (
    ADMIN_KINDS,
    CENTER_KINDS,
    LIMIT_SCOPES,
    RELAY_KINDS,
    SERVER_KINDS,
    STORE_KINDS,
    AllowRule,
    Node,
    Topology,
)


def test_every_node_kind_has_one_entry():
    assert list(KINDS) == list(get_args(NodeKind))
    assert all(name == kind.name for name, kind in KINDS.items())
    assert LIMIT_SCOPES == ("defaults", *get_args(NodeKind))


def test_model_views_are_the_table_read_by_fact():
    assert SERVER_KINDS == {"store-router", "store-controller", "ec-router", "dmz-relay", "issuance-center"} | {
        "ocsp",
        "municipality",
    }
    assert RELAY_KINDS == {"store-router", "ec-router", "dmz-relay"}
    assert ADMIN_KINDS == {"store-controller", "kiosk"}
    assert STORE_KINDS == {"kiosk", "store-router", "store-controller", "wifi"}
    assert CENTER_KINDS == {"issuance-center", "ocsp", "municipality"}


def test_hop_order_follows_each_kinds_upstream():
    assert kinds.ISSUANCE_PATH == ("kiosk", "store-router", "ec-router", "dmz-relay", "issuance-center")
    assert RELAY_CHAIN == haproxy.RELAY_CHAIN == ("store-router", "ec-router", "dmz-relay")


def test_every_listening_kind_has_an_app_and_a_workload():
    assert set(FACTORIES) == {k.name for k in KINDS.values() if k.listens}
    for kind in KINDS.values():
        assert (kind.workload is None) == (kind.resources is None), kind.name
        if kind.listens:
            assert kind.workload in ("Deployment", "StatefulSet"), kind.name


def _node(node_id: str, kind: str, **kw) -> Node:
    return Node(id=node_id, kind=kind, site="s", address="127.0.0.1", **kw)


def test_a_new_kind_is_audited_from_its_entry_alone(monkeypatch):
    """A kind the compiler never heard of: its entry says who it accepts, and the audit follows."""
    vrs = Kind(
        name="vrs-gateway",
        side=Side.CENTER,
        listens=True,
        accepts=Accepts(("issuance-center",), "SEC-EC-3", "the issuance center"),
    )
    monkeypatch.setitem(KINDS, "vrs-gateway", vrs)
    nodes = {
        "vrs": _node("vrs", "vrs-gateway", port=9000, allow=(AllowRule(("ocsp", "issuance-center"), ("POST /*",)),)),
        "ocsp": _node("ocsp", "ocsp", port=8443),
        "issuance-center": _node("issuance-center", "issuance-center", port=8443),
    }
    found = compiler.annex_violations(Topology(name="t", nodes=nodes))
    assert [(v.rule, v.path) for v in found] == [("SEC-EC-3", ("nodes", "vrs", "allow", 0, "from", 0))]
    assert "vrs-gateway vrs accepts only the issuance center, not ocsp" in found[0].message


def test_the_export_reads_resources_from_the_table(monkeypatch):
    small = Kind(
        name="ocsp", side=Side.CENTER, listens=True, workload="Deployment", resources=Resources("1m", "2Mi", "3Mi")
    )
    monkeypatch.setitem(KINDS, "ocsp", small)
    assert k8s._resources("ocsp") == {"requests": {"cpu": "1m", "memory": "2Mi"}, "limits": {"memory": "3Mi"}}
