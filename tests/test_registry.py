"""The node registry: every server kind the topology model knows has exactly one factory."""

from gateway.nodes.registry import FACTORIES
from topology.spec.model import SERVER_KINDS


def test_every_server_kind_has_a_factory_and_nothing_else_does():
    assert set(FACTORIES) == set(SERVER_KINDS)
