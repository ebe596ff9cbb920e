"""A relay with several upstreams: the next one answers when the first does not (failover), and
"balance" spreads connections over all of them. Nothing but the declared hops is ever dialled."""

from __future__ import annotations

from types import SimpleNamespace

import trio

from gateway.nodes.relay import Relay
from gateway.protocol.errors import LinkDown
from tests.test_expand import SMALL
from topology.spec.load import load_topology


class _Counter:
    def labels(self, *_):
        return self

    def inc(self, *_):
        pass


def _relay(topo, node_id, down: set[str]):
    dialled: list[str] = []

    async def connect(node):
        dialled.append(node.id)
        if node.id in down:
            raise LinkDown("ConnectionRefusedError: refused")  # as connect_h2 raises a refused dial
        return f"conn-to-{node.id}"

    relay = Relay(SimpleNamespace(topo=topo, node=topo.node(node_id), connect=connect))
    relay.metrics = SimpleNamespace(upstream_failures=_Counter())
    return relay, dialled


def test_relay_fails_over_to_the_second_dmz_relay_when_the_first_is_down(tmp_path):
    (tmp_path / "t.yaml").write_text(SMALL)
    topo = load_topology(tmp_path / "t.yaml")
    relay, dialled = _relay(topo, "ec-router-a", down={"dmz-relay-a1"})
    assert trio.run(relay._connect_upstream) == "conn-to-dmz-relay-a2"
    assert dialled == ["dmz-relay-a1", "dmz-relay-a2"]
    relay, dialled = _relay(topo, "ec-router-a", down={"dmz-relay-a1", "dmz-relay-a2"})
    assert trio.run(relay._connect_upstream) is None and dialled == ["dmz-relay-a1", "dmz-relay-a2"]


def test_balance_spreads_connections_over_every_upstream(tmp_path):
    (tmp_path / "t.yaml").write_text(
        SMALL.replace(
            "upstreams: [dmz-relay-a1, dmz-relay-a2]}",
            "upstreams: [dmz-relay-a1, dmz-relay-a2], upstream_policy: balance}",
        )
    )
    topo = load_topology(tmp_path / "t.yaml")
    relay, _ = _relay(topo, "ec-router-a", down=set())
    got = [trio.run(relay._connect_upstream) for _ in range(4)]
    assert got == ["conn-to-dmz-relay-a1", "conn-to-dmz-relay-a2"] * 2


def test_one_upstream_still_works_as_before(tmp_path):
    (tmp_path / "t.yaml").write_text(SMALL)
    topo = load_topology(tmp_path / "t.yaml")
    relay, dialled = _relay(topo, "store-router-s01", down=set())
    assert trio.run(relay._connect_upstream) == "conn-to-ec-router-a" and dialled == ["ec-router-a"]
