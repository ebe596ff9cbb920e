"""The OCSP responder node (RFC 6960 over HTTP POST), answering for the JPKI-like CA."""

from __future__ import annotations

import time

from gateway.h2trio import Stream
from gateway.http import method_path, refuse, timing
from gateway.ocsp import OcspResponder
from gateway.server import App, NodeContext, Peer


class OcspNode(App):
    def __init__(self, ctx: NodeContext, revocations) -> None:
        signer_cert, signer_key = ctx.pki.ocsp_signer()
        self.ctx = ctx
        self.responder = OcspResponder(ctx.pki.jpki_ca, signer_cert, signer_key, revocations, ctx.clock.now)

    async def handle(self, stream: Stream, peer: Peer) -> None:
        t0 = time.perf_counter()
        if method_path(stream.headers) != ("POST", "/ocsp"):
            await refuse(stream, 404, "bad-request", "unknown endpoint")
            return
        answer = self.responder.respond(await stream.read_body(16 * 1024))
        stream.send_headers(
            [(b":status", b"200"), (b"content-type", b"application/ocsp-response"), timing(self.ctx.node.id, t0)]
        )
        await stream.send_data(answer, end_stream=True)
