"""Tables that stay readable: a rich table on a wide terminal, one record per line elsewhere.

Piped to a file or on an 80-column terminal, a table of ten columns collapses into `sce… pha…`;
there each row prints as `first column: name value, name value …`, which a person and grep read.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from rich.console import Console
from rich.markup import escape
from rich.table import Table

WIDE = 120  # columns a full table needs before it starts to truncate cells


def show(out: Console, title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Print rows (plain strings, no markup) under columns: a table when the terminal is wide,
    else one record per line."""
    if out.is_terminal and out.width >= WIDE:
        table = Table(title=title)
        for col in columns:
            table.add_column(col)
        for row in rows:
            table.add_row(*(escape(c) for c in row))
        out.print(table)
        return
    out.print(title, markup=False, highlight=False)
    for row in rows:
        rest = ", ".join(f"{c} {v}" for c, v in zip(columns[1:], row[1:], strict=True) if v not in ("", "-"))
        out.print(f"  {row[0]}: {rest}", markup=False, highlight=False, soft_wrap=True)


TABLE_LIMIT = 200  # nodes; a larger topology is shown counted by kind


def show_nodes(console: Console, topo, title: str, listening, processes=None, address=None) -> None:
    """Every node with its address and what serves it, as a table that fits the terminal (the
    site folds, nothing else does); for a large file the count of each kind. `processes`: (name,
    pid, node ids) of each node process, named per node, and listed past TABLE_LIMIT;
    `address(node)`: where it listens, default its loopback address."""
    served = {n: name for name, _, ids in processes or () for n in ids}
    address = address or (lambda node: node.address)
    if len(topo.nodes) <= TABLE_LIMIT:
        # a process per site (netns mode) is named by its site: one column says both
        by_site = bool(served) and all(served[n] == topo.nodes[n].site for n in served)
        table = _table(
            title, ("node", "kind", *(() if by_site else ("site",)), "address", "process" if processes else "ready")
        )
        for node in topo.nodes.values():
            addr = address(node)
            table.add_row(
                node.id,
                node.kind,
                *(() if by_site else (node.site,)),
                f"{addr}:{node.port}" if node.port else addr,
                served.get(node.id, "client") if processes else ("listening" if node.id in listening else "client"),
            )
        console.print(table)
        if processes:
            console.print(
                "pids: " + ", ".join(f"{name} {pid}" for name, pid, _ in processes), markup=False, highlight=False
            )
        return
    kinds = Counter(node.kind for node in topo.nodes.values())
    up = Counter(node.kind for node in topo.nodes.values() if node.id in listening)
    table = _table(title, ("kind", "nodes", "listening"))
    for k, n in kinds.most_common():
        table.add_row(k, f"{n:,}", f"{up[k]:,}")
    console.print(table)
    if processes:
        table = _table(f"{len(processes):,} node processes", ("process", "pid", "nodes", "from", "to"))
        for name, pid, ids in processes:
            table.add_row(name, str(pid), f"{len(ids):,}", ids[0] if ids else "-", ids[-1] if ids else "-")
        console.print(table)


def _table(title: str, columns) -> Table:
    from rich import box

    table = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 1, 0, 0))
    for col in columns:
        # an id, kind or address cut in two reads as two wrong ones: the site folds instead
        table.add_column(col, no_wrap=col != "site", overflow="fold")
    return table
