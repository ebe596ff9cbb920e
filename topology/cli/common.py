"""What every `konbini` command shares: the one user-facing error and loading the topology file.

Errors a user can hit print one line `konbini: <what> (<where to look>)` and exit non-zero;
no tracebacks for bad input.
"""

from __future__ import annotations

from pathlib import Path

from gateway.node.server import NodeStartError
from topology.spec.load import DEFAULT_TOPOLOGY, TopologyError, load_topology
from topology.spec.model import Topology


class UserError(Exception):
    """One line for the user, exit status 2."""


def default_topology_path() -> str:
    return str(DEFAULT_TOPOLOGY)


def load(path: str | None) -> Topology:
    try:
        return load_topology(path or default_topology_path())
    except TopologyError as exc:
        raise UserError(f"bad topology file:\n{exc}") from None


def state_dir(args, topo: Topology) -> Path:
    return Path(getattr(args, "state", None) or topo.state_dir)


def user_error(exc: BaseException) -> BaseException | None:
    """The user-facing error inside exc, which may arrive wrapped in Trio's exception groups."""
    if isinstance(exc, (UserError, NodeStartError)):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            if (found := user_error(inner)) is not None:
                return found
    return None
