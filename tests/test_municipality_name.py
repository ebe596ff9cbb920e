"""A municipality's display name (`name: 高松市`) is part of the file format and reaches what
people read: the kiosk screen, the settlement, the graph (tests/test_graph.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path

from gateway.business.clock import JST
from gateway.business.session import Session
from gateway.business.settlement import municipality_totals, report
from gateway.nodes.center.issuing import Refuse, decide
from gateway.protocol.messages import IssueRequest
from tests.test_settlement import _ledger
from topology.spec.load import DEFAULT_TOPOLOGY, check_file, load_topology

NOON = datetime(2026, 11, 24, 12, 0, tzinfo=JST)


def test_a_municipality_may_have_a_display_name():
    topo = load_topology(DEFAULT_TOPOLOGY.parent / "redundant.yaml")
    takamatsu = topo.municipalities()["372013"].municipality
    assert (takamatsu.name, takamatsu.display) == ("高松市", "高松市 (372013)")
    assert check_file(DEFAULT_TOPOLOGY.parent / "redundant.yaml") == []


def screen(topo, code: str, cert: str) -> str:
    session = Session.__new__(Session)
    session.can = lambda event: True  # an authenticated session; only the business rules decide here
    decision = decide(session, IssueRequest(code, cert), NOON, topo.service_hours, topo.municipalities())
    assert isinstance(decision, Refuse)
    return decision.reason.says(**decision.fields)


def test_the_kiosk_screen_names_the_municipality():
    topo = load_topology(DEFAULT_TOPOLOGY)
    assert screen(topo, "271004", "residence-record") == "大阪市 does not take part in convenience-store issuance."
    assert screen(topo, "141003", "family-register") == "横浜市 does not offer this certificate here."


def test_settlement_counts_each_municipality(tmp_path: Path):
    entries = _ledger(tmp_path).entries()
    assert municipality_totals(entries, "2026-11") == {"131016": {"issuances": 4, "copies": 5, "fees": 760}}
    rep = report(entries, "2026-11", NOON.replace(month=12))
    assert rep["municipalities"]["131016"]["fees"] == rep["total"]["fees"]  # the same money, counted per municipality


def test_settle_shows_the_municipality_by_name(tmp_path: Path):
    _ledger(tmp_path).close()
    run = [
        sys.executable,
        "-m",
        "topology.cli",
        "settle",
        "--month",
        "2026-11",
        "--clock",
        "2026-12-02T10:00+09:00",
        "--state",
        str(tmp_path),
    ]
    text = subprocess.run(run, capture_output=True, text=True, timeout=60)
    assert text.returncode == 0, text.stderr
    assert "千代田区 131016: 5 copies, 760 yen in fees" in text.stdout
    as_json = json.loads(subprocess.run([*run, "--json"], capture_output=True, text=True, timeout=60).stdout)
    assert as_json["municipalities"]["131016"] == {"issuances": 4, "copies": 5, "fees": 760, "name": "千代田区"}


def test_the_failover_report_names_the_municipality_whose_server_it_kills():
    from bench.failover import targets
    from bench.report import md_failover
    from bench.results import as_report

    t = targets(load_topology(DEFAULT_TOPOLOGY.parent / "redundant.yaml"))
    assert (t.municipality, t.municipality_name) == ("372013", "高松市")
    fo = {
        "ok": True,
        "events": [],
        "per_second": [],
        "faults": [],
        "targets": {
            "operator": t.operator,
            "relays": list(t.relays),
            "municipality": t.municipality,
            "municipality_name": t.municipality_name,
            "servers": list(t.servers),
        },
    }
    text = "\n".join(
        md_failover(
            as_report(
                {"scenarios": {"failover": {"konbini": {"rate": 20, "ok": 0, "misdelivered": 0, "failover": fo}}}}
            )
        )
    )
    assert "高松市's document servers muni-takamatsu-1 and muni-takamatsu-2" in text
