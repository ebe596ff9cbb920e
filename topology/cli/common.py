"""What every `konbini` command shares: the one user-facing error, the options every command
takes, and loading the topology file.

Errors a user can hit print one line `konbini: <what> (<where to look>)` and exit non-zero;
no tracebacks for bad input.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

from gateway.business.clock import JST, Clock
from gateway.node.server import NodeStartError
from topology.spec.cache import load_cached
from topology.spec.load import DEFAULT_TOPOLOGY, TopologyError
from topology.spec.model import Topology


class UserError(Exception):
    """One line for the user, exit status 2."""


def default_topology_path() -> str:
    return str(DEFAULT_TOPOLOGY)


def load(path: str | None) -> Topology:
    try:
        return load_cached(path or default_topology_path())
    except TopologyError as exc:
        raise UserError(f"bad topology file:\n{exc}") from None


def state_dir(args, topo: Topology) -> Path:
    return Path(getattr(args, "state", None) or topo.state_dir)


def clock_option(text: str | None, option: str = "--clock") -> str | None:
    """A `--clock` value as an ISO time with its UTC offset; one written without is Japan time,
    the emulation's zone (DESIGN §5)."""
    if text is None:
        return None
    try:
        start = datetime.fromisoformat(text)
    except ValueError:
        raise UserError(
            f"{option} {text!r} is not a time; write it as 2026-11-24T10:00 (Japan time) "
            "or with an offset, 2026-11-24T10:00:00+09:00"
        ) from None
    return (start if start.tzinfo is not None else start.replace(tzinfo=JST)).isoformat()


def parse_clock(text: str | None, speed: float = 1.0, option: str = "--clock") -> Clock:
    """The clock a `--clock` value starts: the wall clock without one."""
    return Clock.parse(clock_option(text, option), speed)


def user_error(exc: BaseException) -> BaseException | None:
    """The user-facing error inside exc, which may arrive wrapped in Trio's exception groups."""
    if isinstance(exc, (UserError, NodeStartError)):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            if (found := user_error(inner)) is not None:
                return found
    return None


# -- the options every command takes -----------------------------------------------------------
#
# Commands declare what they need in their own modules; `share_options` then gives every one of
# them -v and, where it reads a topology, --topology FILE and --state, so a user types them after
# any subcommand; FILE alone where the command has no other positional. Added options default to SUPPRESS: a
# subcommand's default would otherwise overwrite what the user typed before it (`card --state X new`).


def share_options(parser: argparse.ArgumentParser, reads_topology: bool = False) -> None:
    for sub in _subcommands(parser):
        options = sub._option_string_actions
        takes = reads_topology or "--topology" in options or any(a.dest == "file" for a in sub._actions)
        _share(sub, takes)
        share_options(sub, takes)  # `card new` reads the topology `card` names


def settle_options(args: argparse.Namespace) -> argparse.Namespace:
    """One value per shared option: `args.file` and `args.topology` both name the topology file."""
    file, topology = getattr(args, "file", None), getattr(args, "topology", None)
    if file and topology and file != topology:
        raise UserError(f"two topology files: {file} and --topology {topology}; give one")
    args.file = args.topology = file or topology
    args.state = getattr(args, "state", None)
    args.verbose = getattr(args, "verbose", False)
    return args


def _subcommands(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    seen: set[int] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                if id(child) not in seen:  # an alias names the same parser again
                    seen.add(id(child))
                    yield child


def _share(p: argparse.ArgumentParser, reads_topology: bool) -> None:
    options = p._option_string_actions
    if "--verbose" not in options:
        p.add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log denials and node events"
        )
    if not reads_topology:
        return  # `schema`; the groups `policy`, `export` and `link` (their subcommands read one)
    positionals = [a for a in p._actions if not a.option_strings]
    if "--topology" not in options:
        p.add_argument(
            "--topology",
            default=argparse.SUPPRESS,
            metavar="FILE",
            help="topology file (default: the shipped default topology)",
        )
    if "--state" not in options:
        p.add_argument("--state", default=argparse.SUPPRESS, help="state directory (PKI, cards, spools, logs)")
    # FILE only where it is the one positional: after others (`card revoke ID FILE`) argparse
    # takes an optional positional early, empty, when an option comes between
    if not positionals:
        p.add_argument(
            "file",
            nargs="?",
            default=argparse.SUPPRESS,
            metavar="FILE",
            help="topology file (default: the shipped default topology)",
        )
