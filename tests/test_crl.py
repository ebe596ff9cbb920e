"""The JPKI CA's CRL (BIZ-8), served by the OCSP node at `GET /crl` to the issuance center."""

from __future__ import annotations

from datetime import timedelta

import trio
from cryptography import x509

from gateway.protocol.http import request_headers
from gateway.protocol.streams import header
from tests.conftest import TEST_TIME


async def fetch_crl(net) -> tuple[bytes, bytes]:
    conn = await net.context("issuance-center").connect(net.topo.node("ocsp"))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.run)
        with trio.fail_after(10):
            stream = await conn.open_stream(request_headers("GET", "/crl", "ocsp"), end_stream=True)
            headers = await stream.receive_headers()
            body = await stream.read_body()
        conn.release(stream)
        conn.close()
    return header(headers, b":status") or b"", body


async def test_crl_lists_revoked_serials_with_reason_signed_by_the_jpki_ca(net):
    revoked, good = net.cards.new(), net.cards.new()
    net.cards.revoke(revoked.card_id, "key-compromise")
    status, der = await fetch_crl(net)
    assert status == b"200"
    crl = x509.load_der_x509_crl(der)
    assert crl.is_signature_valid(net.pki.jpki_ca.public_key())
    assert crl.issuer == net.pki.jpki_ca.subject
    assert TEST_TIME - timedelta(seconds=1) <= crl.last_update_utc <= net.clock.now()
    assert crl.next_update_utc == crl.last_update_utc + timedelta(days=1)
    entry = crl.get_revoked_certificate_by_serial_number(revoked.serial)
    assert entry is not None
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == x509.ReasonFlags.key_compromise
    assert crl.get_revoked_certificate_by_serial_number(good.serial) is None

    # cached while the revocations stay the same; rebuilt when they change
    assert (await fetch_crl(net))[1] == der
    net.cards.revoke(good.card_id, "voluntary")
    crl = x509.load_der_x509_crl((await fetch_crl(net))[1])
    entry = crl.get_revoked_certificate_by_serial_number(good.serial)
    assert entry is not None
    assert (
        entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == x509.ReasonFlags.cessation_of_operation
    )
