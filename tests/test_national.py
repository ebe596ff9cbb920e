"""topology/national.yaml: the whole country from one short file, expanded to the real sizes."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from topology.spec.load import load_topology

NATIONAL = Path(__file__).resolve().parent.parent / "topology" / "national.yaml"


@pytest.fixture(scope="module")
def national():
    return load_topology(NATIONAL)


def test_national_file_is_short(national):
    assert len(NATIONAL.read_text().splitlines()) < 250


def test_national_has_55000_stores_in_realistic_operator_sizes(national):
    stores = Counter(n.operator for n in national.nodes.values() if n.kind == "store-router")
    assert sum(stores.values()) >= 55_000 and len(stores) >= 5
    assert [n for _, n in stores.most_common(3)] == [21_000, 16_000, 14_000]


def test_every_store_has_one_or_two_kiosks(national):
    per_store = Counter(n.upstream for n in national.nodes.values() if n.kind == "kiosk")
    assert set(per_store.values()) == {1, 2}
    assert len(per_store) == sum(1 for n in national.nodes.values() if n.kind == "store-router")


def test_municipalities_1741_of_which_about_1300_take_part_with_varied_hours_and_fees(national):
    munis = {n.municipality.code: n.municipality for n in national.of_kind("municipality")}
    assert len(munis) >= 1741
    taking = sum(m.participating for m in munis.values())
    assert 1290 <= taking <= 1310
    assert len({(m.hours.open, m.hours.close) for m in munis.values()}) >= 3
    assert len({m.certificates["residence-record"] for m in munis.values()}) >= 2
    assert all(m.certificates["vaccination"] == 120 for m in munis.values())


def test_redundancy_two_dmz_relays_and_a_standby_center(national):
    assert national.node("ec-router-a").hops == ("dmz-relay-a1", "dmz-relay-a2")
    assert national.node("dmz-relay-a1").hops == ("issuance-center", "issuance-center-2")
    assert [n.id for n in national.of_kind("municipality") if n.municipality.code == "372013"] == [
        "muni-takamatsu-1",
        "muni-takamatsu-2",
    ]


def test_national_store_routers_listen_each_on_its_own_address(national):
    routers = [n for n in national.nodes.values() if n.kind == "store-router"]
    assert len({n.address for n in routers}) == len(routers)
    assert national.by_address(routers[-1].address) is routers[-1]
