"""`konbini graph [FILE] --out topology.html|.svg`: the topology drawn aggregated, offline.

Operators (store and kiosk counts instead of one box per store) -> EC routers -> DMZ relays ->
issuance centers (and OCSP) -> municipalities (counted when there are many). Each arrow is
labelled with the kind of line and its impairments. Plain SVG text: no network, no fonts to fetch.
"""

from __future__ import annotations

import html
from collections import Counter, defaultdict
from pathlib import Path

from topology.cli.common import UserError, default_topology_path, load
from topology.spec.model import Impairment, Line, Topology

_COLUMNS = ("operators", "EC routers", "DMZ relays", "issuance centers", "municipalities")
_BOX_W, _BOX_H, _COL_GAP, _ROW_GAP, _TOP = 210, 46, 90, 18, 60
_MANY_MUNIS = 8  # more than this: one box with counts


def _impair_text(impair: Impairment) -> str:
    parts = [f"{k} {v}" for k, v in (("delay", impair.delay), ("jitter", impair.jitter), ("loss", impair.loss), ("rate", impair.rate)) if v]
    return ", ".join(parts)


def _label(lines: list[Line]) -> str:
    """The lines an arrow stands for: their kind and (most common) impairment, and how many."""
    kind, _ = Counter(line.kind for line in lines).most_common(1)[0]
    impair, _ = Counter(line.impair for line in lines).most_common(1)[0]
    text = kind + (f" ({_impair_text(impair)})" if _impair_text(impair) else "")
    return text + (f" x{len(lines):,}" if len(lines) > 1 else "")


def aggregate(topo: Topology) -> tuple[list[list[tuple[str, str, str]]], list[tuple[str, str, str]]]:
    """Columns of boxes (key, title, detail) and arrows (from key, to key, label)."""
    nodes = topo.nodes
    stores: dict[str, set[str]] = defaultdict(set)
    kiosks: Counter[str] = Counter()
    for n in nodes.values():
        if n.kind == "store-router":
            stores[n.operator or "?"].add(n.site)
        elif n.kind == "kiosk":
            kiosks[n.operator or "?"] += 1
    cols: list[list[tuple[str, str, str]]] = [[] for _ in _COLUMNS]
    for op in sorted(stores):
        cols[0].append((f"op:{op}", f"operator {op}", f"{len(stores[op]):,} stores, {kiosks[op]:,} kiosks"))
    for kind, col in (("ec-router", 1), ("dmz-relay", 2), ("issuance-center", 3), ("ocsp", 3)):
        for n in nodes.values():
            if n.kind == kind:
                detail = n.site + (f", {n.upstream_policy} over {len(n.hops)}" if len(n.hops) > 1 else "")
                cols[col].append((n.id, n.id, detail))
    munis = [n for n in nodes.values() if n.kind == "municipality"]
    many = len(munis) > _MANY_MUNIS
    if many:
        codes = {n.municipality.code for n in munis if n.municipality}
        taking = {n.municipality.code for n in munis if n.municipality and n.municipality.participating}
        cols[4].append(("munis", f"{len(codes):,} municipalities", f"{len(taking):,} participating, {len(munis):,} servers"))
    else:
        for n in munis:
            m = n.municipality
            cols[4].append((n.id, n.id, f"{m.code}{'' if m.participating else ', not participating'}" if m else ""))

    def key(node_id: str) -> str:
        n = nodes[node_id]
        if n.kind in ("store-router", "store-controller", "kiosk", "wifi"):
            return f"op:{n.operator or '?'}"
        if n.kind == "municipality" and many:
            return "munis"
        return node_id

    grouped: dict[tuple[str, str], list[Line]] = defaultdict(list)
    for line in topo.lines:
        if line.a not in nodes or line.b not in nodes:
            continue
        a, b = key(line.a), key(line.b)
        if a == b:
            continue  # inside a store
        order = {k: c for c, col in enumerate(cols) for k, _, _ in col}
        if order.get(a, 0) > order.get(b, 0):
            a, b = b, a
        grouped[(a, b)].append(line)
    arrows = [(a, b, _label(lines)) for (a, b), lines in grouped.items()]
    return cols, arrows


def svg(topo: Topology) -> str:
    cols, arrows = aggregate(topo)
    height = _TOP + max(len(c) for c in cols) * (_BOX_H + _ROW_GAP) + 40
    width = len(cols) * (_BOX_W + _COL_GAP) + 40
    at: dict[str, tuple[int, int]] = {}
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        'font-family="sans-serif" font-size="12">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="6" markerHeight="6" orient="auto">'
        '<path d="M0,0 L10,5 L0,10 z" fill="#555"/></marker></defs>',
        f'<text x="20" y="24" font-size="16" font-weight="bold">{html.escape(topo.name)}: {len(topo.nodes):,} nodes, {len(topo.lines):,} lines</text>',
    ]
    for c, col in enumerate(cols):
        x = 20 + c * (_BOX_W + _COL_GAP)
        out.append(f'<text x="{x}" y="{_TOP - 12}" fill="#666">{_COLUMNS[c]}</text>')
        for r, (key, title, detail) in enumerate(col):
            y = _TOP + r * (_BOX_H + _ROW_GAP)
            at[key] = (x, y)
            out.append(f'<rect x="{x}" y="{y}" width="{_BOX_W}" height="{_BOX_H}" rx="6" fill="#eef3fb" stroke="#4a6fa5"/>')
            out.append(f'<text x="{x + 8}" y="{y + 18}" font-weight="bold">{html.escape(title)}</text>')
            out.append(f'<text x="{x + 8}" y="{y + 36}" fill="#333">{html.escape(detail)}</text>')
    for a, b, label in arrows:
        if a not in at or b not in at:
            continue
        (xa, ya), (xb, yb) = at[a], at[b]
        x1, y1, x2, y2 = xa + _BOX_W, ya + _BOX_H / 2, xb, yb + _BOX_H / 2
        out.append(f'<line x1="{x1}" y1="{y1}" x2="{x2}" y2="{y2}" stroke="#555" marker-end="url(#arrow)"/>')
        out.append(f'<text x="{(x1 + x2) / 2}" y="{(y1 + y2) / 2 - 4}" font-size="10" text-anchor="middle" fill="#444">{html.escape(label)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def cmd_graph(args) -> int:
    topo = load(args.file or default_topology_path())
    out = Path(args.out)
    drawing = svg(topo)
    if out.suffix == ".svg":
        text = drawing
    elif out.suffix in (".html", ".htm"):
        text = f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{html.escape(topo.name)}</title></head>\n<body>\n{drawing}</body></html>\n"
    else:
        raise UserError(f"--out must end in .svg or .html, got {out.name!r}")
    out.write_text(text, encoding="utf-8")
    print(f"{out}: {topo.name}, {len(topo.nodes):,} nodes drawn as {drawing.count('<rect')} boxes")
    return 0


def register(sub) -> None:
    g = sub.add_parser("graph", help="draw the topology aggregated (operators, relays, centers, municipalities)")
    g.add_argument("file", nargs="?", help="topology file (default: the shipped default topology)")
    g.add_argument("--out", default="topology.html", help="topology.html or topology.svg (default topology.html)")
    g.set_defaults(func=cmd_graph)
