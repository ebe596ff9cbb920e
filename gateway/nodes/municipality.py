"""The municipality's certificate data server, reached over LGWAN from the issuance center only.

It streams the requested document in chunks; its content is made from the issuance id so that
every document is distinct and a kiosk (or a test) can tell whose it is.
"""

from __future__ import annotations

import hashlib
import time

from gateway.node.server import App, NodeContext, Peer
from gateway.protocol.h2trio import Stream
from gateway.protocol.http import BadRequest, decode, method_path, refuse, timing
from gateway.protocol.messages import DocumentRequest

CHUNK = 64 * 1024


def document_prefix(issuance_id: str, cert_type: str) -> bytes:
    """The head of every document: a PDF header naming its issuance (the kiosk prints it)."""
    return f"%PDF-1.7\n% konbini {cert_type} issuance={issuance_id}\n".encode()


def document_chunks(issuance_id: str, cert_type: str, size: int, chunk: int = CHUNK):
    """The document in chunks: the prefix, then a filler pattern derived from the issuance id."""
    head = document_prefix(issuance_id, cert_type)
    block = hashlib.sha256(issuance_id.encode()).digest() * (chunk // 32)
    data = head[:size]
    sent = 0
    while sent < size:
        if len(data) < chunk:
            data += block[: chunk - len(data)]
        piece = data[: size - sent]
        sent += len(piece)
        yield piece
        data = b""


class MunicipalityServer(App):
    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx
        self.documents_served = 0

    async def handle(self, stream: Stream, peer: Peer) -> None:
        t0 = time.perf_counter()
        method, path = method_path(stream.headers)
        if (method, path) != ("POST", "/v1/document"):
            await refuse(stream, 404, "bad-request", "unknown endpoint")
            return
        try:
            req = decode(await stream.read_body(4096), DocumentRequest)
        except BadRequest:
            await refuse(stream, 400, "bad-request", "bad document request")
            return
        stream.send_headers([(b":status", b"200"), (b"content-type", b"application/pdf"), timing(self.ctx.node.id, t0, stream)])
        for piece in document_chunks(req.issuance_id, req.cert_type, max(req.size, 0)):
            await stream.send_data(piece)
        stream.end()
        self.documents_served += 1
