"""`konbini graph [FILE] --out topology.html|.svg`: the topology drawn aggregated, offline.

Operators (store and kiosk counts instead of one box per store) -> EC routers -> DMZ relays ->
issuance centers (and OCSP, below them) -> municipalities (one box per municipality however many
document servers it runs; counted when there are many). Each arrow is labelled with the kind of
line and its impairments. `layout` places everything and is pure, so tests can check that no label
covers a box and no arrow crosses one; `svg` only writes it out. Plain SVG text: no network, no
fonts to fetch, so widths are estimated from the characters.
"""

from __future__ import annotations

import html
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from topology.cli.common import UserError, default_topology_path, load
from topology.spec.model import Impairment, Line, Node, Topology

_COLUMNS = ("operators", "EC routers", "DMZ relays", "issuance centers", "municipalities")
_BOX_H, _ROW_GAP, _TOP, _MARGIN = 46, 18, 60, 20
_MIN_BOX_W, _MIN_GAP = 150, 60
_TITLE_PX, _DETAIL_PX, _LABEL_PX = 12, 12, 10
_BRACKET = 14  # how far an arrow between two boxes of one column goes out to the right, per arrow
_MANY_MUNIS = 8  # more municipalities than this: one box with counts


def text_width(text: str, size: float) -> float:
    """Rendered width, estimated: a CJK character is about one em, anything else about 0.62 em."""
    return sum(size if ord(ch) >= 0x2E80 else 0.62 * size for ch in text)


@dataclass(frozen=True)
class Box:
    key: str
    title: str
    detail: str
    x: float
    y: float
    w: float
    h: float = _BOX_H


@dataclass(frozen=True)
class Label:
    text: str
    x: float  # the centre of the text (unrotated), or where its baseline starts (turned to run downwards)
    y: float
    w: float  # the space it takes, as drawn
    h: float
    rotated: bool = False

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        if self.rotated:  # turned a quarter clockwise: runs down from (x, y), the glyphs to the right of x
            return self.x, self.y, self.x + self.h, self.y + self.w
        return self.x - self.w / 2, self.y - self.h, self.x + self.w / 2, self.y


@dataclass(frozen=True)
class Arrow:
    points: tuple[tuple[float, float], ...]
    label: Label


@dataclass(frozen=True)
class Drawing:
    title: str
    width: float
    height: float
    columns: tuple[tuple[float, str], ...]
    boxes: tuple[Box, ...]
    arrows: tuple[Arrow, ...]


def _impair_text(impair: Impairment) -> str:
    parts = [
        f"{k} {v}"
        for k, v in (("delay", impair.delay), ("jitter", impair.jitter), ("loss", impair.loss), ("rate", impair.rate))
        if v
    ]
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
    munis = [n for n in nodes.values() if n.kind == "municipality" and n.municipality]
    servers: dict[str, list[Node]] = defaultdict(list)  # a municipality's document servers share its data
    for n in munis:
        servers[n.municipality.code].append(n)
    many = len(servers) > _MANY_MUNIS
    if many:
        taking = {n.municipality.code for n in munis if n.municipality.participating}
        cols[4].append(
            ("munis", f"{len(servers):,} municipalities", f"{len(taking):,} participating, {len(munis):,} servers")
        )
    else:
        for code, group in servers.items():
            m = group[0].municipality
            detail = (
                code
                + (f", {len(group)} document servers" if len(group) > 1 else "")
                + ("" if m.participating else ", not participating")
            )
            cols[4].append((f"muni:{code}", m.name or f"municipality {code}", detail))

    def key(node_id: str) -> str:
        n = nodes[node_id]
        if n.kind in ("store-router", "store-controller", "kiosk", "wifi"):
            return f"op:{n.operator or '?'}"
        if n.kind == "municipality" and n.municipality:
            return "munis" if many else f"muni:{n.municipality.code}"
        return node_id

    order = {k: (c, r) for c, col in enumerate(cols) for r, (k, _, _) in enumerate(col)}
    grouped: dict[tuple[str, str], list[Line]] = defaultdict(list)
    for line in topo.lines:
        if line.a not in nodes or line.b not in nodes:
            continue
        a, b = key(line.a), key(line.b)
        if a == b:
            continue  # inside a store, or between one municipality's servers
        if order.get(a, (0, 0)) > order.get(b, (0, 0)):
            a, b = b, a  # left to right; within a column, top to bottom
        grouped[(a, b)].append(line)
    arrows = [(a, b, _label(lines)) for (a, b), lines in grouped.items()]
    return cols, arrows


def layout(topo: Topology) -> Drawing:
    """Boxes in columns wide enough for their text, gaps wide enough for the labels in them.

    An arrow between columns leaves its box on the right and enters the next on the left; its label
    sits in the first gap it crosses. An arrow within a column (issuance center -> OCSP) goes out to
    the right, down and back in, its label turned along the vertical stretch."""
    cols, links = aggregate(topo)
    index = {k: (c, r) for c, col in enumerate(cols) for r, (k, _, _) in enumerate(col)}
    links = [(a, b, text) for a, b, text in links if a in index and b in index]
    widths = [
        max([_MIN_BOX_W] + [16 + max(text_width(t, _TITLE_PX), text_width(d, _DETAIL_PX)) for _, t, d in col])
        for col in cols
    ]
    brackets = [[(a, b, t) for a, b, t in links if index[a][0] == index[b][0] == c] for c in range(len(cols))]
    bracket_w = [(_BRACKET * len(bs) + _LABEL_PX + 8) if bs else 0 for bs in brackets]
    label_w = [0.0] * len(cols)
    for a, b, text in links:
        if index[a][0] != index[b][0]:
            c = min(index[a][0], index[b][0])
            label_w[c] = max(label_w[c], text_width(text, _LABEL_PX))
    gaps = [bracket_w[c] + max(_MIN_GAP, label_w[c] + 48) for c in range(len(cols))]  # room to move a label off another
    xs = [float(_MARGIN)]
    for c in range(len(cols) - 1):
        xs.append(xs[-1] + widths[c] + gaps[c])
    boxes = {
        k: Box(k, t, d, xs[c], _TOP + r * (_BOX_H + _ROW_GAP), widths[c])
        for c, col in enumerate(cols)
        for r, (k, t, d) in enumerate(col)
    }
    arrows = []
    for a, b, text in links:
        ba, bb = boxes[a], boxes[b]
        ca, cb = index[a][0], index[b][0]
        ya, yb = ba.y + _BOX_H / 2, bb.y + _BOX_H / 2
        tw = text_width(text, _LABEL_PX)
        if ca == cb:
            out = ba.x + ba.w + _BRACKET * (1 + brackets[ca].index((a, b, text)))
            points = ((ba.x + ba.w, ya), (out, ya), (out, yb), (bb.x + bb.w, yb))
            label = Label(text, out + 3, (ya + yb - tw) / 2, tw, _LABEL_PX, rotated=True)
        else:
            if ca > cb:
                ba, bb, ya, yb, ca = bb, ba, yb, ya, cb
            x1, x2 = ba.x + ba.w, bb.x
            points = ((x1, ya), (x2, yb))
            start, end = x1 + bracket_w[ca] + 4, xs[ca + 1] - 4  # the gap's labels stay clear of a bracket's
            label = _place(
                text,
                tw,
                [(start + end) / 2, start + tw / 2, end - tw / 2],
                lambda x, x1=x1, x2=x2, ya=ya, yb=yb: ya + (yb - ya) * (x - x1) / (x2 - x1),
                [a.label for a in arrows],
            )
        arrows.append(Arrow(points, label))
    height = _TOP + max(len(c) for c in cols) * (_BOX_H + _ROW_GAP) + 40
    for arrow in arrows:  # a bracket's label may reach below the last row
        height = max(height, arrow.label.bounds[3] + _MARGIN)
    width = xs[-1] + widths[-1] + _MARGIN
    title = f"{topo.name}: {len(topo.nodes):,} nodes, {len(topo.lines):,} lines"
    return Drawing(title, width, height, tuple(zip(xs, _COLUMNS, strict=True)), tuple(boxes.values()), tuple(arrows))


def _place(text: str, width: float, centres: list[float], line_y, placed: list[Label]) -> Label:
    """The label just above its arrow, else just below it, at the first of `centres` where it
    covers no label already placed (arrows that cross would put theirs on the same spot)."""
    tries = [Label(text, x, y, width, _LABEL_PX) for x in centres for y in (line_y(x) - 3, line_y(x) + 3 + _LABEL_PX)]
    return next((t for t in tries if not any(_overlap(t.bounds, p.bounds) for p in placed)), tries[0])


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def svg(topo: Topology) -> str:
    d = layout(topo)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{d.width:.0f}" height="{d.height:.0f}" viewBox="0 0 {d.width:.0f} {d.height:.0f}" '
        'font-family="sans-serif" font-size="12">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="6" markerHeight="6" orient="auto">'
        '<path d="M0,0 L10,5 L0,10 z" fill="#555"/></marker></defs>',
        f'<text x="{_MARGIN}" y="24" font-size="16" font-weight="bold">{html.escape(d.title)}</text>',
    ]
    for x, name in d.columns:
        out.append(f'<text x="{x:.0f}" y="{_TOP - 12}" fill="#666">{name}</text>')
    for b in d.boxes:
        out.append(
            f'<rect x="{b.x:.0f}" y="{b.y:.0f}" width="{b.w:.0f}" height="{b.h:.0f}" rx="6" fill="#eef3fb" stroke="#4a6fa5"/>'
        )
        out.append(f'<text x="{b.x + 8:.0f}" y="{b.y + 18:.0f}" font-weight="bold">{html.escape(b.title)}</text>')
        out.append(f'<text x="{b.x + 8:.0f}" y="{b.y + 36:.0f}" fill="#333">{html.escape(b.detail)}</text>')
    for a in d.arrows:
        points = " ".join(f"{x:.1f},{y:.1f}" for x, y in a.points)
        out.append(f'<polyline points="{points}" fill="none" stroke="#555" marker-end="url(#arrow)"/>')
        lb = a.label
        turn = f' transform="rotate(90 {lb.x:.1f} {lb.y:.1f})"' if lb.rotated else ""
        anchor = "start" if lb.rotated else "middle"
        out.append(
            f'<text x="{lb.x:.1f}" y="{lb.y:.1f}" font-size="{_LABEL_PX}" text-anchor="{anchor}" fill="#444"{turn}>{html.escape(lb.text)}</text>'
        )
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
    try:
        out.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot write --out {out}: {exc.strerror or exc}") from None
    print(f"{out}: {topo.name}, {len(topo.nodes):,} nodes drawn as {drawing.count('<rect')} boxes")
    return 0


def register(sub) -> None:
    g = sub.add_parser("graph", help="draw the topology aggregated (operators, relays, centers, municipalities)")
    g.add_argument("file", nargs="?", help="topology file (default: the shipped default topology)")
    g.add_argument("--out", default="topology.html", help="topology.html or topology.svg (default topology.html)")
    g.set_defaults(func=cmd_graph)
