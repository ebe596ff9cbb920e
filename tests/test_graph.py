"""`konbini graph` draws a readable picture: no label over a box, no arrow through a box, one box
per municipality however many document servers it runs, named as residents know it."""

from __future__ import annotations

import pytest

from topology.cli.graph import Box, layout, svg
from topology.spec.load import DEFAULT_TOPOLOGY, load_topology

SHIPPED = [
    DEFAULT_TOPOLOGY.parent / name for name in ("default.yaml", "redundant.yaml", "realistic.yaml", "national.yaml")
]


def overlaps(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def inside(box: Box) -> tuple[float, float, float, float]:
    return box.x + 1, box.y + 1, box.x + box.w - 1, box.y + box.h - 1  # its edges are where arrows end


def crosses(p: tuple[float, float], q: tuple[float, float], r: tuple[float, float, float, float]) -> bool:
    """Whether segment p-q passes through rectangle r (Liang-Barsky clipping)."""
    (x0, y0), (x1, y1) = p, q
    lo, hi = 0.0, 1.0
    for d, start, low, high in ((x1 - x0, x0, r[0], r[2]), (y1 - y0, y0, r[1], r[3])):
        if d == 0:
            if not low < start < high:
                return False
            continue
        t0, t1 = sorted(((low - start) / d, (high - start) / d))
        lo, hi = max(lo, t0), min(hi, t1)
    return lo < hi


@pytest.fixture(scope="module", params=SHIPPED, ids=lambda p: p.name)
def drawing(request):
    return layout(load_topology(request.param))


def test_no_label_covers_a_box_or_another_label(drawing):
    labels = [a.label for a in drawing.arrows]
    for label in labels:
        assert not [b.key for b in drawing.boxes if overlaps(label.bounds, (b.x, b.y, b.x + b.w, b.y + b.h))], label
        assert 0 <= label.bounds[0] and label.bounds[2] <= drawing.width and label.bounds[3] <= drawing.height, label
    for i, a in enumerate(labels):
        assert not [b.text for b in labels[i + 1 :] if overlaps(a.bounds, b.bounds)], a


def test_no_arrow_runs_through_a_box(drawing):
    for arrow in drawing.arrows:
        for p, q in zip(arrow.points, arrow.points[1:], strict=False):
            assert not [b.key for b in drawing.boxes if crosses(p, q, inside(b))], arrow


def test_the_center_to_ocsp_arrow_goes_round_the_column_not_back_through_it():
    d = layout(load_topology(DEFAULT_TOPOLOGY))
    center, ocsp = (next(b for b in d.boxes if b.key == k) for k in ("issuance-center", "ocsp"))
    arrow = next(a for a in d.arrows if a.points[0] == (center.x + center.w, center.y + center.h / 2))
    assert arrow.points[-1] == (ocsp.x + ocsp.w, ocsp.y + ocsp.h / 2)
    assert min(x for x, _ in arrow.points) >= center.x + center.w


def test_a_municipality_on_two_servers_is_one_box_with_its_name():
    topo = load_topology(DEFAULT_TOPOLOGY.parent / "redundant.yaml")
    d = layout(topo)
    takamatsu = [b for b in d.boxes if "372013" in b.detail]
    assert [(b.title, b.detail) for b in takamatsu] == [("高松市", "372013, 2 document servers")]
    into = [a for a in d.arrows if a.points[-1] == (takamatsu[0].x, takamatsu[0].y + takamatsu[0].h / 2)]
    assert [a.label.text for a in into] == ["lgwan (delay 3ms) x2"]
    assert "高松市" in svg(topo)
