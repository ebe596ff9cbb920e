"""The options every `konbini` command shares, wherever the user types them: the topology file as
FILE or --topology, --state and -v after the subcommand; one exit status for a bad file."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from topology.cli.common import settle_options
from topology.cli.main import main, parser
from topology.spec.load import DEFAULT_TOPOLOGY

# every command that reads a topology, as a user types it without the file
READS_TOPOLOGY = [
    ["check"],
    ["up"],
    ["preflight"],
    ["graph"],
    ["expand"],
    ["policy", "show"],
    ["policy", "check"],
    ["policy", "mutate"],
    ["issue"],
    ["card", "new"],
    ["card", "list"],
    ["card", "revoke", "card-1"],
    ["card", "unlock", "card-1"],
    ["settle", "--month", "2026-11"],
    ["sla", "--month", "2026-11"],
    ["ledger", "verify"],
    ["demo"],
    ["bench", "relay-small"],
    ["link", "show"],
    ["link", "set", "closed-a1"],
    ["link", "reset", "closed-a1"],
    ["down"],
    ["export", "k8s", "--out", "k8s"],
    ["export", "compose", "--out", "c.yaml"],
]
# the same commands where FILE is their only positional
TAKES_FILE = [
    argv for argv in READS_TOPOLOGY if argv[0] not in ("bench", "ledger") and argv[-1] not in ("card-1", "closed-a1")
]


def parsed(argv: list[str]) -> argparse.Namespace:
    return settle_options(parser().parse_args(argv))


@pytest.mark.parametrize("argv", READS_TOPOLOGY, ids=" ".join)
def test_every_command_that_reads_a_topology_takes_it_as_topology(argv):
    args = parsed([*argv, "--topology", "mine.yaml"])
    assert args.topology == args.file == "mine.yaml"


@pytest.mark.parametrize("argv", TAKES_FILE, ids=" ".join)
def test_the_topology_file_is_positional_where_the_command_has_no_other_positional(argv):
    args = parsed([*argv, "mine.yaml"])
    assert args.topology == args.file == "mine.yaml"


@pytest.mark.parametrize("argv", READS_TOPOLOGY, ids=" ".join)
def test_state_and_verbose_are_taken_after_any_subcommand(argv):
    args = parsed([*argv, "--state", "S", "-v"])
    assert args.state == "S" and args.verbose is True


def test_an_option_before_a_sub_subcommand_is_not_overwritten_by_its_default():
    args = parsed(["card", "--state", "S", "--topology", "mine.yaml", "new"])
    assert (args.state, args.topology) == ("S", "mine.yaml")


def test_two_different_topology_files_are_one_clear_line(capsys):
    assert main(["check", "a.yaml", "--topology", "b.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("konbini: two topology files") and len(err.splitlines()) == 1


def test_check_takes_the_file_as_topology_and_v(capsys):
    assert main(["check", "-v", "--topology", str(DEFAULT_TOPOLOGY)]) == 0
    assert capsys.readouterr().out.startswith("OK: default:")


BROKEN = "name: broken\nnodes:\n  kiosk-1: {kind: kiosk, site: s, address: 127.18.0.1, upstream: nowhere}\n"


@pytest.mark.parametrize(
    "command",
    [["check"], ["up"], ["graph", "--out", "g.svg"], ["expand"], ["preflight"], ["policy", "show"]],
    ids=" ".join,
)
def test_every_command_exits_2_on_a_bad_topology_file(tmp_path: Path, command, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text(BROKEN, encoding="utf-8")
    assert main([*command, str(path), "--state", str(tmp_path / "state")]) == 2
    assert "unknown node 'nowhere'" in capsys.readouterr().err


def test_every_bench_option_has_help_text():
    """`konbini bench --help` explains every option it lists (`--no-progress` had no help)."""
    bench = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["bench"]
    assert all(a.help for a in bench._actions if a.option_strings), [
        a.option_strings for a in bench._actions if not a.help
    ]
