"""Shared fixtures: one state directory (PKI + a pool of cards) per test session, and a running
default topology per test (it comes up in milliseconds once the PKI exists)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import msgspec
import pytest
import trio

from gateway.business.clock import JST, Clock
from kiosk_emu.card import CardStore
from topology.launch.loopback import Running, run_topology
from topology.pki import PKI
from topology.spec.load import DEFAULT_TOPOLOGY, load_topology
from topology.spec.model import Topology, UpstreamConnections

# Inside every service window of the default topology (center 06:30–23:00, muni-b 08:30–19:00).
TEST_TIME = datetime(2026, 11, 24, 10, 0, tzinfo=JST)
POOL = 220


@pytest.fixture(scope="session")
def topo() -> Topology:
    return load_topology(DEFAULT_TOPOLOGY)


@pytest.fixture(scope="session")
def state(tmp_path_factory: pytest.TempPathFactory, topo: Topology) -> Path:
    """PKI and a pool of distinct cards, made once (RSA-2048 keys are slow to generate)."""
    path = tmp_path_factory.mktemp("konbini-state")
    pki = PKI.ensure(path, topo)
    CardStore(path, pki, clock=lambda: TEST_TIME).ensure_pool(POOL)
    return path


@pytest.fixture
async def net(topo: Topology, state: Path, nursery: trio.Nursery) -> Running:
    """The default topology, running in loopback mode for one test, at TEST_TIME."""
    running = await nursery.start(
        lambda task_status: run_topology(topo, state, clock=Clock(TEST_TIME), task_status=task_status)
    )
    yield running
    running.stop()


@pytest.fixture(params=["pooled", "paired"])
async def relay_net(request, topo: Topology, state: Path, nursery: trio.Nursery) -> Running:
    """The default topology with its EC routers and DMZ relays pooling their upstreams (their
    default) or pairing them: a module about relays takes it as its `net`, so each test runs both ways."""
    way = UpstreamConnections(mode=request.param)
    relaying = msgspec.structs.replace(topo, upstream_connections={"ec-router": way, "dmz-relay": way})
    running = await nursery.start(
        lambda task_status: run_topology(relaying, state, clock=Clock(TEST_TIME), task_status=task_status)
    )
    yield running
    running.stop()
