"""The OCSP responder node (RFC 6960 over HTTP POST), answering for the JPKI-like CA, and its CRL.

`GET /crl` serves the CA-signed CRL of every revoked card certificate (BIZ-8); it is rebuilt only
when the revocation list changes (or the cached one reaches its nextUpdate)."""

from __future__ import annotations

import time
from datetime import datetime

from gateway.business.ocsp import CRL_VALIDITY, OcspResponder, build_crl
from gateway.node.server import App, NodeContext, Peer
from gateway.protocol.driver import Stream
from gateway.protocol.http import method_path, refuse, timing


class OcspNode(App):
    def __init__(self, ctx: NodeContext, revocations) -> None:
        signer_cert, signer_key = ctx.pki.ocsp_signer()
        self.ctx = ctx
        self.revocations = revocations
        self.responder = OcspResponder(ctx.pki.jpki_ca, signer_cert, signer_key, revocations, ctx.clock.now)
        # (the revocation mapping it was built from, its nextUpdate, DER). CardStore.revocations()
        # returns the same object until the file changes, so identity tells whether it is current.
        self._crl: tuple[object, datetime, bytes] | None = None

    def crl(self) -> bytes:
        revoked = self.revocations()
        now = self.ctx.clock.now()
        if self._crl is None or self._crl[0] is not revoked or now >= self._crl[1]:
            der = build_crl(self.ctx.pki.jpki_ca, self.ctx.pki.jpki_ca_key, revoked, now)
            self._crl = (revoked, now + CRL_VALIDITY, der)
        return self._crl[2]

    async def handle(self, stream: Stream, peer: Peer) -> None:
        t0 = time.perf_counter()
        route = method_path(stream.headers)
        if route == ("GET", "/crl"):
            answer = self.crl()
            stream.send_headers(
                [(b":status", b"200"), (b"content-type", b"application/pkix-crl"), timing(self.ctx.node.id, t0, stream)]
            )
            await stream.send_data(answer, end_stream=True)
            return
        if route != ("POST", "/ocsp"):
            await refuse(stream, 404, "bad-request", "unknown endpoint")
            return
        answer = self.responder.respond(await stream.read_body(16 * 1024))
        stream.send_headers(
            [
                (b":status", b"200"),
                (b"content-type", b"application/ocsp-response"),
                timing(self.ctx.node.id, t0, stream),
            ]
        )
        await stream.send_data(answer, end_stream=True)
