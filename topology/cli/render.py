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


def show_nodes(console: Console, topo, title: str, listening) -> None:
    """Every node with its address, or for a large file the count of each kind."""
    if len(topo.nodes) <= TABLE_LIMIT:
        show(console, title, ("node", "kind", "site", "address", "ready"), [
            (node.id, node.kind, node.site, f"{node.address}:{node.port}" if node.port else node.address,
             "listening" if node.id in listening else "client")
            for node in topo.nodes.values()
        ])
        return
    kinds = Counter(node.kind for node in topo.nodes.values())
    up = Counter(node.kind for node in topo.nodes.values() if node.id in listening)
    show(console, title, ("kind", "nodes", "listening"), [(k, f"{n:,}", f"{up[k]:,}") for k, n in kinds.most_common()])
