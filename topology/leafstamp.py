"""Node certificates in bulk: one certificate made by `cryptography`, the rest stamped from it.

A national file has ~250,000 node identities. `x509.CertificateBuilder` spends ~0.5 ms of CPU
on each, most of it in building Python objects that are the same for every node; the ECDSA
signature itself costs ~30 µs. So a template is built once with the builder, exactly as
`topology.pki` builds any leaf, and each node's certificate is that template's TBSCertificate
with its own serial number, subject, public key, subjectAltName and subjectKeyIdentifier put in
(DER elements made by `cryptography` too), signed by the CA with `cryptography`. Only the
outer DER (tags and lengths of the SEQUENCEs that hold them) is assembled here.
`tests/test_pki.py` checks a stamped certificate against one the builder makes for the same node.
"""

from __future__ import annotations

import hashlib
import ipaddress
import secrets

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

_SEQUENCE, _INTEGER, _OCTET_STRING, _BIT_STRING, _UTF8 = 0x30, 0x02, 0x04, 0x03, 0x0C


def _tlv(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 0x80:
        return bytes((tag, n)) + body
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(size))) + size + body


def _elements(der: bytes) -> list[bytes]:
    """The DER elements (whole TLVs) inside one constructed element."""
    pos = 2 if der[1] < 0x80 else 2 + (der[1] & 0x7F)
    out = []
    while pos < len(der):
        n = der[pos + 1]
        head = 2
        if n >= 0x80:
            head += n & 0x7F
            n = int.from_bytes(der[pos + 2 : pos + head], "big")
        out.append(der[pos : pos + head + n])
        pos += head + n
    return out


def _ext_oid(ext: bytes) -> bytes:
    return _elements(ext)[0]


_SAN_OID = _tlv(0x06, bytes.fromhex("551d11"))  # 2.5.29.17
_SKI_OID = _tlv(0x06, bytes.fromhex("551d0e"))  # 2.5.29.14
_CN_OID = _tlv(0x06, bytes.fromhex("550403"))  # 2.5.4.3


class LeafStamp:
    """Issues node leaves like `template`: same issuer, validity, usages and extension order."""

    def __init__(self, template: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, role: str) -> None:
        self.ca_key = ca_key
        self.role = role
        version, _serial, self.sig_alg, self.issuer, self.validity, _subject, _spki, exts = _elements(
            template.tbs_certificate_bytes
        )
        self.version = version
        rdns = _elements(_subject)
        if _elements(_elements(rdns[-1])[0])[0] != _CN_OID:
            raise ValueError("the template's subject must end with its common name")
        self.subject_head = b"".join(rdns[:-1])  # O and OU, the same for every node of the role
        self.ext_tag = exts[0]  # the [3] EXPLICIT wrapper's tag
        self.extensions = _elements(_elements(exts)[0])  # each Extension SEQUENCE, in order
        self.cert_sig_alg = _elements(template.public_bytes(serialization.Encoding.DER))[1]

    def issue(self, node_id: str, ips: list[str], key: ec.EllipticCurvePrivateKey) -> bytes:
        """A DER certificate for `node_id` with `ips` as IP SANs and `key`'s public key."""
        name = node_id.encode()
        subject = _tlv(_SEQUENCE, self.subject_head + _tlv(0x31, _tlv(_SEQUENCE, _CN_OID + _tlv(_UTF8, name))))
        san = _tlv(_SEQUENCE, _tlv(0x82, name) + b"".join(_tlv(0x87, ipaddress.ip_address(a).packed) for a in ips))
        spki = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        ski = _tlv(_OCTET_STRING, hashlib.sha1(spki[-65:]).digest())  # RFC 5280 4.2.1.2 (1): the point's SHA-1
        exts = []
        for ext in self.extensions:
            oid = _ext_oid(ext)
            if oid == _SAN_OID:
                ext = _tlv(_SEQUENCE, oid + _tlv(_OCTET_STRING, san))
            elif oid == _SKI_OID:
                ext = _tlv(_SEQUENCE, oid + _tlv(_OCTET_STRING, ski))
            exts.append(ext)
        serial = secrets.randbits(159) | 1 << 158  # 20 octets, top bit clear: positive (RFC 5280 4.1.2.2)
        tbs = _tlv(
            _SEQUENCE,
            self.version
            + _tlv(_INTEGER, serial.to_bytes(20, "big"))
            + self.sig_alg
            + self.issuer
            + self.validity
            + subject
            + spki
            + _tlv(self.ext_tag, _tlv(_SEQUENCE, b"".join(exts))),
        )
        signature = self.ca_key.sign(tbs, ec.ECDSA(hashes.SHA256()))
        return _tlv(_SEQUENCE, tbs + self.cert_sig_alg + _tlv(_BIT_STRING, b"\0" + signature))
