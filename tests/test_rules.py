"""Business rules (BIZ-1..3) as pure functions, and the topology checks that keep their data sane."""

from __future__ import annotations

from datetime import datetime

import pytest
import yaml

from gateway.business.clock import JST
from gateway.business.rules import fee, refusal
from gateway.business.sla import availability, complete_outages
from topology.spec.load import DEFAULT_TOPOLOGY, check_file
from topology.spec.model import Hours, Municipality

CENTER = Hours("06:30", "23:00")
MUNI = Municipality("131016", certificates={"residence-record": 200, "vaccination": 120, "family-register": 450})
NARROW = Municipality("141003", hours=Hours("08:30", "19:00"), certificates={"residence-record": 200})


def at(y, m, d, hh, mm):
    return datetime(y, m, d, hh, mm, tzinfo=JST)


@pytest.mark.parametrize(
    "now, muni, expect",
    [
        (at(2026, 11, 24, 6, 29), MUNI, "outside-hours"),
        (at(2026, 11, 24, 6, 30), MUNI, None),
        (at(2026, 11, 24, 22, 59), MUNI, None),
        (at(2026, 11, 24, 23, 0), MUNI, "outside-hours"),
        (at(2026, 11, 22, 10, 0), MUNI, None),  # a Sunday: every day (000 §14)
        (at(2026, 11, 24, 8, 29), NARROW, "outside-hours"),
        (at(2026, 11, 24, 8, 30), NARROW, None),
        (at(2026, 11, 24, 19, 0), NARROW, "outside-hours"),
    ],
)
def test_center_hours_every_day_narrowed_by_the_municipality(now, muni, expect):
    r = refusal(now, CENTER, muni, "residence-record", 1)
    assert (r[0] if r else None) == expect


def test_outside_hours_message_shows_the_effective_window():
    assert refusal(at(2026, 11, 24, 20, 0), CENTER, NARROW, "residence-record", 1) == (
        "outside-hours",
        {"hours": "08:30–19:00"},
    )


@pytest.mark.parametrize(
    "day, general, vaccination",
    [
        ((2026, 12, 28), None, None),
        ((2026, 12, 29), "outside-hours", None),
        ((2027, 1, 3), "outside-hours", None),
        ((2027, 1, 4), None, None),
    ],
)
def test_general_service_closes_dec_29_to_jan_3_but_vaccination_does_not(day, general, vaccination):
    now = at(*day, 10, 0)
    r = refusal(now, CENTER, MUNI, "residence-record", 1)
    v = refusal(now, CENTER, MUNI, "vaccination", 1)
    assert ((r[0] if r else None), (v[0] if v else None)) == (general, vaccination)


def test_participation_has_start_and_stop_dates():
    m = Municipality(
        "131016",
        participating_from="2026-04-01",
        participating_until="2026-12-31",
        certificates={"residence-record": 200},
    )
    assert refusal(at(2026, 3, 31, 10, 0), CENTER, m, "residence-record", 1)[0] == "municipality-not-participating"
    assert refusal(at(2026, 4, 1, 10, 0), CENTER, m, "residence-record", 1) is None
    assert refusal(at(2027, 1, 4, 10, 0), CENTER, m, "residence-record", 1)[0] == "municipality-not-participating"
    off = Municipality("271004", participating=False, certificates={"residence-record": 200})
    assert refusal(at(2026, 11, 24, 10, 0), CENTER, off, "residence-record", 1)[0] == "municipality-not-participating"


@pytest.mark.parametrize(
    "muni, cert, copies, reason",
    [
        (None, "residence-record", 1, "municipality-unknown"),
        (MUNI, "tax-certificate", 1, "certificate-type-not-offered"),
        (MUNI, "residence-record", 0, "copies-out-of-range"),  # the copy count's own reason, with the limit
        (MUNI, "residence-record", 11, "copies-out-of-range"),
    ],
)
def test_unknown_municipality_type_and_copy_count_are_refused(muni, cert, copies, reason):
    assert refusal(at(2026, 11, 24, 10, 0), CENTER, muni, cert, copies)[0] == reason


def test_fee_is_per_copy():
    assert fee(MUNI, "vaccination", 3) == 360 and fee(MUNI, "family-register", 1) == 450


# -- topology checks -------------------------------------------------------------------------


def _check_with(tmp_path, change) -> list[str]:
    data = yaml.safe_load(DEFAULT_TOPOLOGY.read_text())
    change(data["nodes"]["muni-a"]["municipality"])
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    return [str(p) for p in check_file(path)]


@pytest.mark.parametrize(
    "change, expect",
    [
        (lambda m: m["certificates"].update({"residence-record": -1}), "fee must not be negative"),
        (lambda m: m["certificates"].update({"residence-record": 12.5}), "whole number of yen"),
        (lambda m: m["certificates"].update({"vaccination": 150}), "120 yen"),
        (lambda m: m.update(hours={"open": "23:00", "close": "06:30"}), "not after it opens"),
        (lambda m: m.update(hours={"open": "05:00", "close": "23:00"}), "wider than the service hours"),
        (lambda m: m.update(hours={"open": "6:30", "close": "23:00"}), "is not HH:MM"),
        (lambda m: m.update(participating_from="2026-13-01"), "is not a date"),
        (
            lambda m: m.update(participating_from="2026-05-01", participating_until="2026-04-01"),
            "before participating_from",
        ),
    ],
)
def test_bad_business_data_is_one_line_naming_the_field(tmp_path, change, expect):
    problems = _check_with(tmp_path, change)
    assert len(problems) == 1 and expect in problems[0] and "nodes.muni-a.municipality" in problems[0], problems


# -- SLA (BIZ-9) -----------------------------------------------------------------------------


def test_only_outages_longer_than_ten_minutes_count_against_43200_minutes():
    rep = availability(
        "2026-11",
        [
            (at(2026, 11, 3, 2, 0), at(2026, 11, 3, 2, 10)),  # exactly 10 minutes: ignored
            (at(2026, 11, 4, 2, 0), at(2026, 11, 4, 2, 30)),  # 30
            (at(2026, 11, 4, 2, 20), at(2026, 11, 4, 2, 43)),  # overlaps: merged to 43 minutes
        ],
    )
    assert rep["downtime_minutes"] == 43 and rep["outages_ignored_short"] == 1 and rep["met"]
    missed = availability(
        "2026-11",
        [
            (
                at(2026, 11, 4, 2, 0),
                at(
                    2026,
                    11,
                    4,
                    2,
                    43,
                ).replace(second=13),
            )
        ],
    )
    assert missed["downtime_minutes"] > 43.2 and not missed["met"]
    edge = availability("2026-11", [(at(2026, 11, 4, 2, 0), at(2026, 11, 4, 2, 43).replace(second=12))])
    assert edge["downtime_minutes"] == 43.2 and edge["met"]  # exactly 99.9 %


def test_outage_across_a_month_boundary_counts_its_part_in_each_month():
    o = [(at(2026, 11, 30, 23, 55), at(2026, 12, 1, 0, 5))]  # 10 minutes in all: ignored in both
    assert availability("2026-11", o)["downtime_minutes"] == 0
    o = [(at(2026, 11, 30, 23, 50), at(2026, 12, 1, 0, 5))]  # 15 minutes: 10 in Nov, 5 in Dec
    assert (availability("2026-11", o)["downtime_minutes"], availability("2026-12", o)["downtime_minutes"]) == (10, 5)


def test_a_complete_outage_is_when_every_scope_is_down_together():
    per = {
        "k1": [(at(2026, 11, 5, 1, 0), at(2026, 11, 5, 2, 0))],
        "k2": [(at(2026, 11, 5, 1, 30), at(2026, 11, 5, 3, 0))],
        "service": [(at(2026, 11, 6, 1, 0), at(2026, 11, 6, 1, 20))],
    }
    assert complete_outages(per, ["k1", "k2"]) == [
        (at(2026, 11, 5, 1, 30), at(2026, 11, 5, 2, 0)),
        (at(2026, 11, 6, 1, 0), at(2026, 11, 6, 1, 20)),
    ]
    assert complete_outages(per, ["k1", "k2", "k3"]) == [(at(2026, 11, 6, 1, 0), at(2026, 11, 6, 1, 20))]
