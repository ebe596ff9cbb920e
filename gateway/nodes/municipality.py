"""The municipality's certificate data server, reached over LGWAN from the issuance center only.

It streams the requested certificate: a PDF naming the resident its register holds for the card
that authenticated (gateway/business/certificate.py), padded to the size a benchmark asks for.
"""

from __future__ import annotations

import time
from pathlib import Path

import trio

from gateway.business.certificate import certificate, certificate_font, document_chunks
from gateway.business.pdf import Font
from gateway.business.refusal import Refusal
from gateway.node.server import App, NodeContext, Peer
from gateway.protocol.driver import Stream
from gateway.protocol.http import BadRequest, decode, method_path, refuse, timing
from gateway.protocol.messages import DocumentRequest
from topology.spec.model import Node, Topology


def display_name(node: Node) -> str:
    muni = node.municipality
    assert muni is not None, f"{node.id}: a municipality node carries its municipality"
    return muni.name or muni.code


def municipalities_font(topo: Topology, state_dir: Path) -> Font:
    """The font cut for every municipality of the topology's certificates, one cut for all of
    them: read from STATE/fonts, or cut there (seconds, once per state directory); then kept in
    the process (`pdf.font`). A launcher calls it before forking node processes, which inherit it
    instead of each importing fontTools and reading the cut (0.5 s a process, national)."""
    names = tuple(sorted({display_name(n) for n in topo.of_kind("municipality")}))
    return certificate_font(names, state_dir / "fonts")


class MunicipalityServer(App):
    def __init__(self, ctx: NodeContext, state_dir: Path) -> None:
        self.ctx = ctx
        self.state_dir = state_dir
        self.documents_served = 0
        self._font: Font | None = None
        self._font_lock = trio.Lock()

    async def prepare(self) -> None:
        await self.font()

    async def font(self) -> Font:
        """The font cut for this municipality's certificates (`municipalities_font`), in a thread."""
        async with self._font_lock:
            if self._font is None:
                self._font = await trio.to_thread.run_sync(municipalities_font, self.ctx.topo, self.state_dir)
            return self._font

    async def handle(self, stream: Stream, peer: Peer) -> None:
        t0 = time.perf_counter()
        method, path = method_path(stream.headers)
        if (method, path) != ("POST", "/v1/document"):
            await refuse(stream, 404, Refusal.BAD_REQUEST, "unknown endpoint")
            return
        try:
            req = decode(await stream.read_body(4096), DocumentRequest)
        except BadRequest:
            await refuse(stream, 400, Refusal.BAD_REQUEST, "bad document request")
            return
        muni = self.ctx.node.municipality
        page = certificate(
            issuance_id=req.issuance_id,
            cert_type=req.cert_type,
            card_id=req.card,
            municipality_code=muni.code if muni else "",
            municipality_name=display_name(self.ctx.node),
            issued_at=self.ctx.clock.now(),
            cut=self._font or await self.font(),
        )
        stream.send_headers(
            [(b":status", b"200"), (b"content-type", b"application/pdf"), timing(self.ctx.node.id, t0, stream)]
        )
        for piece in document_chunks(page, req.issuance_id, max(req.size, 0)):
            await stream.send_data(piece)
        stream.end()
        self.documents_served += 1
