"""`konbini check FILE`: the file's problems, or a summary of what it describes."""

from __future__ import annotations

import sys

from topology.spec.evidence import unshowable
from topology.spec.load import load_checked


def check_main(path: str) -> int:
    """One line per problem on stderr and exit 2, as every command that loads a bad file; or a
    summary on stdout."""
    topo, problems = load_checked(path)
    if problems or topo is None:
        for problem in problems:
            print(problem, file=sys.stderr)
        return 2
    rules = sum(len(n.allow) for n in topo.nodes.values())
    print(f"OK: {topo.name}: {len(topo.nodes)} nodes, {len(topo.lines)} lines, {rules} allow rules")
    for requirement, why in unshowable(topo):  # valid, but `policy check` will report these NOT RUN
        print(f"cannot show {requirement} live: {why}")
    return 0
