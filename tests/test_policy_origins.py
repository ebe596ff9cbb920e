"""`konbini policy show` on a compact file names the template line every allow entry came from."""

from __future__ import annotations

import json
import re
from pathlib import Path

from topology.cli.main import main

REDUNDANT = Path(__file__).resolve().parent.parent / "topology" / "redundant.yaml"


def test_policy_show_names_the_template_line_of_each_rule_in_the_ruleset(capsys):
    assert main(["policy", "show", str(REDUNDANT), "--site", "store-a1"]) == 0
    out = capsys.readouterr().out
    named = set(re.findall(r'comment "(nodes\.[\w.-]+\.allow\[\d+\])', out))
    origins = dict(re.findall(r"^# (nodes\.\S+) <- (\S+)$", out, re.M))
    assert named and named <= set(origins)  # every accept the ruleset names has its origin
    lines = REDUNDANT.read_text().splitlines()
    for rule, origin in origins.items():
        file, _, line = origin.rpartition(":")
        assert file.endswith("redundant.yaml")
        assert "from:" in lines[int(line) - 1], (rule, lines[int(line) - 1])  # the template entry itself


def test_an_explicit_file_adds_no_origin_lines(capsys):
    assert main(["policy", "show", "--site", "store-a1"]) == 0
    assert "<-" not in capsys.readouterr().out


def test_policy_check_reports_origins_and_says_not_run_where_the_file_has_no_admin_surfaces(tmp_path, capsys):
    # compact stores have their admin surfaces by default (issue 28 item 7); a file whose store
    # group opts out (`admin: false`) has none: the annex checks that need them are failed NOT RUN
    # items (before: a traceback), the verdict is FAIL, and the checks that need no admin surface
    # (SEC-KI-2's issuances) still run
    no_admin = tmp_path / "redundant-no-admin.yaml"
    text = REDUNDANT.read_text()
    group = 'stores-a: {range: "a[1-4]", pool: stores-a, operator: a, upstream: ec-router-a, kiosks: 2}'
    assert group in text
    no_admin.write_text(text.replace(group, group[:-1] + ", admin: false}"))
    rc = main(["policy", "check", str(no_admin), "--state", str(tmp_path / "s"), "--report", str(tmp_path / "r")])
    assert rc == 1
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["ok"] is False
    not_run = {c["requirement"] for c in report["annex"] if c["observed"].startswith("NOT RUN")}
    assert not_run == {"SEC-ST-3/KI-6", "SEC-KI-4", "SEC-KI-7", "SEC-KI-8"}
    assert all(not c["ok"] for c in report["annex"] if c["requirement"] in not_run)
    origin = report["rule_origins"]["nodes.store-router-a1.allow[0]"]
    assert origin == f"{no_admin}:41"  # the file as given, and the template entry's line
    assert f"| nodes.store-router-a1.allow[0] | {origin} |" in (tmp_path / "r" / "report.md").read_text()


def test_policy_check_of_the_shipped_redundant_file_runs_every_annex_check_and_passes(tmp_path):
    rc = main(["policy", "check", str(REDUNDANT), "--state", str(tmp_path / "s"), "--report", str(tmp_path / "r")])
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert not [c["requirement"] for c in report["annex"] if c["observed"].startswith("NOT RUN")]
    assert rc == 0 and report["ok"] is True
