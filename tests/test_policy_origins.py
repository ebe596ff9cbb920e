"""`konbini policy show` on a compact file names the template line every allow entry came from."""

from __future__ import annotations

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
