"""A one-page PDF in Japanese, written as a stream: the printed certificate's file format.

Why by hand: fpdf2 and reportlab parse and subset the CJK font again for every document
(0.1–3 s each here), which no issuance benchmark can afford. The font is subset once per process
(fontTools, from Debian's IPAex Mincho; no network fonts) to the characters the documents can hold,
and every page after that is a few hundred bytes of text drawing plus that one embedded font:
~0.1 ms. pypdf reads what this writes in the tests, and pdftoppm renders it (docs/documents.md).

A document streams in order: header, the issuance's metadata (so a kiosk can check whose it is
from the first chunk), filler comments up to the requested size, then the page, the font and the
cross-reference table, whose offsets are known before the filler is sent.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from fontTools import subset
from fontTools.ttLib import TTFont

FONT_FILE = Path("/usr/share/fonts/opentype/ipaexfont-mincho/ipaexm.ttf")  # Debian: fonts-ipaexfont-mincho
A4 = (595.28, 841.89)  # points
_FILLER_LINE = 1024  # bytes per filler comment line, newline included


class FontMissing(RuntimeError):
    """The Japanese font the documents embed is not installed."""


@dataclass(frozen=True)
class Text:
    """One run of text on the page: where, how large, what."""

    x: float
    y: float
    size: float
    text: str


@dataclass(frozen=True)
class Font:
    """A cut of the font: the characters it can draw and its five PDF objects."""

    chars: str
    gids: dict[str, int]  # character -> glyph id in the subset
    codes: dict[str, str]  # character -> its glyph id as the content stream writes it (4 hex digits)
    widths: dict[int, int]  # glyph id -> advance in 1/1000 em
    objects: tuple[bytes, ...]  # PDF objects 6-10: the font dictionaries, its program, its ToUnicode CMap


@lru_cache(maxsize=8)
def font(chars: str, cache_dir: Path | None = None) -> Font:
    """IPAex Mincho cut to `chars` (see `charset`). Cutting reads the whole 4 MiB font (seconds);
    with `cache_dir` the cut is kept there under its characters' digest and read back next time."""
    cached = cache_dir / f"mincho-{hashlib.sha256(chars.encode()).hexdigest()[:16]}.ttf" if cache_dir else None
    if cached is not None and cached.exists():
        program = cached.read_bytes()
    else:
        program = _cut(chars)
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_bytes(program)
            tmp.replace(cached)
    font = TTFont(io.BytesIO(program))
    cmap = font.getBestCmap()
    scale = 1000 / font["head"].unitsPerEm
    gids = {chr(cp): font.getGlyphID(name) for cp, name in cmap.items()}
    widths = {gid: round(font["hmtx"][font.getGlyphName(gid)][0] * scale) for gid in gids.values()}
    lines = [
        f"<{gid:04X}> <{ord(ch):04X}>" for ch, gid in sorted(gids.items(), key=lambda kv: kv[1]) if ord(ch) <= 0xFFFF
    ]
    body = "\n".join(f"{len(chunk)} beginbfchar\n" + "\n".join(chunk) + "\nendbfchar" for chunk in _chunks(lines, 100))
    cmap_text = (
        "/CIDInit /ProcSet findresource begin\n12 dict begin\nbegincmap\n"
        "/CIDSystemInfo << /Registry (Adobe) /Ordering (UCS) /Supplement 0 >> def\n"
        "/CMapName /Adobe-Identity-UCS def\n/CMapType 2 def\n"
        "1 begincodespacerange\n<0000> <FFFF>\nendcodespacerange\n"
        f"{body}\nendcmap\nCMapName currentdict /CMap defineresource pop\nend\nend\n"
    )
    objects = (
        b"<< /Type /Font /Subtype /Type0 /BaseFont /KONBNI+IPAexMincho /Encoding /Identity-H "
        b"/DescendantFonts [7 0 R] /ToUnicode 10 0 R >>",
        (
            b"<< /Type /Font /Subtype /CIDFontType2 /BaseFont /KONBNI+IPAexMincho "
            b"/CIDSystemInfo << /Registry (Adobe) /Ordering (Identity) /Supplement 0 >> "
            b"/FontDescriptor 8 0 R /CIDToGIDMap /Identity /DW 1000 /W ["
            + b" ".join(b"%d [%d]" % (gid, w) for gid, w in sorted(widths.items()))
            + b"] >>"
        ),
        (
            b"<< /Type /FontDescriptor /FontName /KONBNI+IPAexMincho /Flags 6 /FontBBox [0 -141 1000 859] "
            b"/ItalicAngle 0 /Ascent 880 /Descent -120 /CapHeight 700 /StemV 80 /FontFile2 9 0 R >>"
        ),
        _stream(zlib.compress(program, 9)),
        _stream(zlib.compress(cmap_text.encode(), 9)),
    )
    return Font(chars, gids, {ch: f"{gid:04X}" for ch, gid in gids.items()}, widths, objects)


def _cut(chars: str) -> bytes:
    if not FONT_FILE.exists():
        raise FontMissing(f"{FONT_FILE} is missing: install Debian's fonts-ipaexfont-mincho (make setup does)")
    full = TTFont(FONT_FILE)
    options = subset.Options()
    options.layout_features = []
    options.hinting = False
    options.name_IDs = ["*"]
    options.drop_tables += ["GSUB", "GPOS", "vhea", "vmtx", "VORG"]
    cutter = subset.Subsetter(options)
    cutter.populate(text=chars)
    cutter.subset(full)
    out = io.BytesIO()
    full.save(out)
    return out.getvalue()


def _chunks(items: list[str], n: int) -> Iterator[list[str]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def charset(*texts: str) -> str:
    """The characters of `texts`, as the font cache keys them."""
    return "".join(sorted(set("".join(texts)) - {"\n"}))


def _utf16(text: str) -> bytes:
    return b"<FEFF" + text.encode("utf-16-be").hex().upper().encode() + b">"


def text_width(cut: Font, text: str, size: float) -> float:
    """The width of `text` at `size` points, for centring and right-aligning."""
    return sum(cut.widths.get(cut.gids.get(ch, 0), 1000) for ch in text) * size / 1000


class Page:
    """One page of text runs, to be streamed as a PDF of at least `size` bytes."""

    def __init__(self, runs: list[Text], cut: Font, info: dict[str, str]) -> None:
        missing = set("".join(r.text for r in runs)) - set(cut.gids)
        if missing:
            raise ValueError(f"characters outside the font's cut: {''.join(sorted(missing))}")
        self.runs = runs
        self.font = cut
        self.info = info

    def _content(self) -> bytes:
        font = self.font
        ops = ["BT"]
        for run in self.runs:
            glyphs = "".join(map(font.codes.__getitem__, run.text))
            ops.append(f"/F1 {run.size:g} Tf 1 0 0 1 {run.x:.2f} {run.y:.2f} Tm <{glyphs}> Tj")
        ops.append("ET")
        return zlib.compress("\n".join(ops).encode(), 6)

    def chunks(self, size: int, filler_seed: bytes, chunk: int = 64 * 1024) -> Iterator[bytes]:
        """The PDF in pieces of at most `chunk` bytes, `size` bytes in all where the page fits in
        that (it is never cut: a smaller size gives the page's own length)."""
        head = b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n"
        info = b"<< " + b" ".join(b"/" + k.encode() + b" " + _utf16(v) for k, v in self.info.items()) + b" >>"
        objects = [
            info,
            b"<< /Type /Catalog /Pages 3 0 R >>",
            b"<< /Type /Pages /Kids [4 0 R] /Count 1 >>",
            (
                b"<< /Type /Page /Parent 3 0 R /MediaBox [0 0 %.2f %.2f] /Resources << /Font << /F1 6 0 R >> >> "
                b"/Contents 5 0 R >>" % A4
            ),
            _stream(self._content()),
            *self.font.objects,
        ]
        bodies = [b"%d 0 obj\n" % (i + 1) + obj + b"\nendobj\n" for i, obj in enumerate(objects)]
        first, rest = bodies[0], b"".join(bodies[1:])
        filler = max(0, _xref_at(size, len(bodies)) - len(head) - len(first) - len(rest))
        offsets, at = [], len(head)
        for i, body in enumerate(bodies):
            offsets.append(at)
            at += len(body) + (filler if i == 0 else 0)
        tail = rest + _xref(offsets, at)
        yield from _pieces(head + first, chunk)
        yield from _filler(filler, filler_seed, chunk)
        yield from _pieces(tail, chunk)


def _stream(data: bytes) -> bytes:
    return b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(data) + data + b"\nendstream"


def _xref(offsets: list[int], at: int) -> bytes:
    rows = b"".join(b"%010d 00000 n \n" % off for off in offsets)
    return (
        b"xref\n0 %d\n0000000000 65535 f \n" % (len(offsets) + 1)
        + rows
        + b"trailer\n<< /Size %d /Root 2 0 R /Info 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(offsets) + 1, at)
    )


def _xref_at(size: int, n: int) -> int:
    """Where the cross-reference table of `n` objects starts in a file of `size` bytes: its own
    length depends on how many digits that offset has."""
    fixed = len(_xref([0] * n, 0)) - 1
    for digits in range(len(str(size)), 0, -1):
        at = size - fixed - digits
        if len(str(at)) == digits:
            return at
    return 0


def _pieces(data: bytes, chunk: int) -> Iterator[bytes]:
    for i in range(0, len(data), chunk):
        yield data[i : i + chunk]


def _filler(n: int, seed: bytes, chunk: int) -> Iterator[bytes]:
    """`n` bytes of PDF comment lines, a pattern derived from `seed` (every document distinct)."""
    pattern = hashlib.sha256(seed).hexdigest().encode()
    line = b"%" + (pattern * (_FILLER_LINE // len(pattern) + 1))[: _FILLER_LINE - 2] + b"\n"
    block = line * max(1, chunk // _FILLER_LINE)
    while n > 0:
        piece = block[: min(n, chunk)]
        if len(piece) < len(block) and piece:  # the last piece still ends its comment line
            piece = piece[:-1] + b"\n"
        n -= len(piece)
        yield piece


def overlay(document: bytes, runs: list[Text], cut: Font, rgb: tuple[float, float, float] = (0, 0, 0)) -> bytes:
    """`document` (one this module wrote) with `runs` drawn over its page, as an incremental update
    (the original bytes stay as they were, the way a printer stamps paper): a second font cut
    for the overlay's characters, a content stream, the page object again and a new xref section."""
    found = re.search(rb"startxref\n(\d+)\n%%EOF\n$", document)
    size = re.findall(rb"/Size (\d+)", document[-256:])
    if not found or not size:
        raise ValueError("not a konbini certificate PDF")
    n = int(size[-1])  # the overlay's objects: its content stream, then its five font objects
    page = (
        b"<< /Type /Page /Parent 3 0 R /MediaBox [0 0 %.2f %.2f] /Resources << /Font << /F1 6 0 R /F2 %d 0 R >> >> "
        b"/Contents [5 0 R %d 0 R] >>" % (*A4, n + 1, n)
    )
    # the font objects refer to each other as 7..10 in the document; renumber them after the content
    renumber = {
        b"7 0 R": b"%d 0 R" % (n + 2),
        b"8 0 R": b"%d 0 R" % (n + 3),
        b"9 0 R": b"%d 0 R" % (n + 4),
        b"10 0 R": b"%d 0 R" % (n + 5),
    }
    fonts = [
        re.sub(rb"\b(7|8|9|10) 0 R", lambda m: renumber[m.group(0)], obj) if i < 3 else obj
        for i, obj in enumerate(cut.objects)
    ]
    color = "{:g} {:g} {:g} rg".format(*rgb)
    ops = zlib.decompress(Page(runs, cut, {})._content()).replace(b"/F1 ", b"/F2 ")
    content = zlib.compress(color.encode() + b"\n" + ops)
    update = [(4, page), (n, _stream(content))] + [(n + 1 + i, obj) for i, obj in enumerate(fonts)]
    out, offsets, at = [], [], len(document)
    for num, obj in update:
        body = b"%d 0 obj\n" % num + obj + b"\nendobj\n"
        offsets.append((num, at))
        out.append(body)
        at += len(body)
    xref = [b"xref\n0 1\n0000000000 65535 f \n"]
    for num, off in sorted(offsets):
        xref.append(b"%d 1\n%010d 00000 n \n" % (num, off))
    trailer = b"trailer\n<< /Size %d /Root 2 0 R /Info 1 0 R /Prev %s >>\nstartxref\n%d\n%%%%EOF\n" % (
        n + 6,
        found.group(1),
        at,
    )
    return document + b"".join(out) + b"".join(xref) + trailer
