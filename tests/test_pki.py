"""The test PKI: node identities for every TLS hop, principals, the JPKI-like CA (SEC-SN-2, SEC-KI-1, BIZ-8)."""

from __future__ import annotations

import ipaddress
import shutil
import ssl
import stat
import subprocess
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.business.clock import JST
from topology import pki as pki_module
from topology.leafstamp import LeafStamp
from topology.nodestore import NodeStore
from topology.pki import PKI, PKIError
from topology.pkifiles import PKIFiles
from topology.spec.model import Node, Topology

NODES = {
    "kiosk-1": Node(id="kiosk-1", kind="kiosk", site="store-1", address="127.10.1.2", upstream="store-router-1"),
    "store-router-1": Node(
        id="store-router-1", kind="store-router", site="store-1", address="127.10.1.1", port=8443, upstream="ec-router"
    ),
    "ec-router": Node(
        id="ec-router", kind="ec-router", site="ec", address="127.20.0.1", netns_address="198.18.99.1", port=8443
    ),
}


def topology(**extra: Node) -> Topology:
    return Topology(name="t", nodes={**NODES, **extra})


@pytest.fixture(scope="session")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("state")


@pytest.fixture(scope="session")
def pki(pki_dir: Path) -> PKI:
    return PKI.ensure(pki_dir, topology())


@pytest.fixture
def fresh_copy(pki: PKI, tmp_path: Path) -> Path:
    """A private copy of the session PKI, for tests that change it."""
    shutil.copytree(pki.state_dir, tmp_path / "state")
    return tmp_path / "state"


def no_keygen(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("unexpected key generation")

    monkeypatch.setattr(rsa, "generate_private_key", refuse)
    monkeypatch.setattr(ec, "generate_private_key", refuse)


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_node_certificate_names_the_node_and_both_its_addresses(pki: PKI) -> None:
    cert = load(pki.node_paths("kiosk-1")[0])
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "kiosk-1"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["kiosk-1"]
    # netns address derived from 127.10.1.2 (A=10 even -> 198.18)
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.10.1.2"),
        ipaddress.ip_address("198.18.1.2"),
    }
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)


def test_explicit_netns_address_is_used(pki: PKI) -> None:
    san = load(pki.node_paths("ec-router")[0]).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("198.18.99.1") in san.get_values_for_type(x509.IPAddress)


def test_node_certificates_chain_to_the_network_ca(pki: PKI) -> None:
    assert load(pki.network_ca_path) == pki.network_ca
    for node_id in NODES:
        cert = load(pki.node_paths(node_id)[0])
        cert.verify_directly_issued_by(pki.network_ca)
        assert cert.signature_hash_algorithm is not None and cert.signature_hash_algorithm.name == "sha256"


def test_node_certificates_authenticate_both_ends_of_a_tls13_connection(pki: PKI) -> None:
    def context(side: ssl._SSLMethod, node_id: str) -> ssl.SSLContext:
        ctx = ssl.SSLContext(side)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(*pki.node_paths(node_id))
        ctx.load_verify_locations(pki.network_ca_path)
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.verify_flags |= ssl.VERIFY_X509_STRICT
        return ctx

    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context(ssl.PROTOCOL_TLS_CLIENT, "kiosk-1").wrap_bio(c_in, c_out, server_hostname="store-router-1")
    server = context(ssl.PROTOCOL_TLS_SERVER, "store-router-1").wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(10):
        for name, end, out, peer_in in (("client", client, c_out, s_in), ("server", server, s_out, c_in)):
            try:
                end.do_handshake()
                done[name] = True
            except ssl.SSLWantReadError:
                pass
            peer_in.write(out.read())
        if all(done.values()):
            break
    assert all(done.values())
    assert dict(x[0] for x in server.getpeercert()["subject"])["commonName"] == "kiosk-1"
    assert dict(x[0] for x in client.getpeercert()["subject"])["commonName"] == "store-router-1"


def test_private_keys_are_readable_by_owner_only(pki: PKI) -> None:
    pki.principal_paths("operator")
    for node_id in NODES:
        pki.node_paths(node_id)
    keys = [*(pki.state_dir / "pki").rglob("*.key"), pki.dir / "nodes.db"]
    assert len(keys) >= 8  # 2 CAs, OCSP signer, 3 nodes, operator, the node store
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key


def test_node_identities_are_rows_of_one_store_written_out_only_when_asked_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A national file's 250,000 identities as pairs of files took 2 GB and most of a start."""
    monkeypatch.setattr(pki_module, "FILES_UP_TO", 2)  # this topology as a large one
    pki = PKI.ensure(tmp_path, topology())
    assert list((pki.dir / "nodes").iterdir()) == []
    assert sorted(
        pki.store.current(
            pki.network_ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest.hex(), 0
        )
    ) == sorted(NODES)
    assert pki.has_identity("kiosk-1") and not pki.has_identity("nobody")
    cert_path, key_path = pki.node_paths("kiosk-1")
    assert sorted(p.name for p in (pki.dir / "nodes").iterdir()) == ["kiosk-1.key", "kiosk-1.pem"]
    ssl.create_default_context().load_cert_chain(cert_path, key_path)  # a matching pair, as ssl reads it


def test_a_start_asks_the_store_for_its_nodes_identities_a_few_hundred_at_a_time(tmp_path: Path) -> None:
    """A national node process checks 12,000 nodes at start: a query each was a tenth of its start."""
    (tmp_path / "pki" / "nodes").mkdir(parents=True)
    store = NodeStore(tmp_path / "pki")
    ids = [f"node-{i}" for i in range(1_200)]
    store.put("ca", [(n, ["127.0.0.1"], 0.0, b"cert", b"key") for n in ids])
    queries: list[str] = []
    store._conn().set_trace_callback(queries.append)
    asked = [*ids[::-1], "nobody", "node-5"]
    assert store.having(asked) == set(ids)
    assert len(queries) == 3  # 1,202 ids, 500 a query
    assert store.current("ca", -1.0)["node-7"] == "127.0.0.1"  # as stored: ensure compares it unsplit

    files = PKIFiles(tmp_path, frozenset([*ids, "on-disk", "missing"]))
    for suffix in (".pem", ".key"):
        (tmp_path / "pki" / "nodes" / f"on-disk{suffix}").write_text("mounted")  # a pod's Secret: files, no row
    assert files.without_identity(["node-7", "on-disk", "missing", "stranger"]) == ["missing", "stranger"]


def test_a_small_topologys_node_files_are_written_for_curl_and_openssl(pki: PKI) -> None:
    """`curl --cert STATE/pki/nodes/kiosk-a1-1.pem` (docs/tls.md) works on a fresh state."""
    assert sorted(p.name for p in (pki.dir / "nodes").iterdir()) == sorted(
        f"{n}{suffix}" for n in NODES for suffix in (".key", ".pem")
    )


def test_ensure_again_loads_without_generating_anything(fresh_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = {p: p.read_bytes() for p in (fresh_copy / "pki").rglob("*") if p.is_file()}
    no_keygen(monkeypatch)
    PKI.ensure(fresh_copy, topology())
    after = {p: p.read_bytes() for p in (fresh_copy / "pki").rglob("*") if p.is_file()}
    assert after == before


def test_node_added_later_gets_a_certificate_and_the_others_stay(fresh_copy: Path) -> None:
    before = PKI.ensure(fresh_copy, topology())
    identities_before = {node_id: before.store.identity(node_id) for node_id in NODES}
    new = Node(id="store-controller-1", kind="store-controller", site="store-1", address="127.10.1.3", port=8444)
    pki = PKI.ensure(fresh_copy, topology(**{new.id: new}))
    cert = load(pki.node_paths(new.id)[0])
    cert.verify_directly_issued_by(pki.network_ca)
    assert {node_id: pki.store.identity(node_id) for node_id in NODES} == identities_before


def test_changed_address_reissues_the_certificate_for_the_same_key(fresh_copy: Path) -> None:
    key_before = PKI.ensure(fresh_copy, topology()).node_paths("kiosk-1")[1].read_bytes()  # written out, then moved
    moved = Node(id="kiosk-1", kind="kiosk", site="store-1", address="127.10.1.9")
    pki = PKI.ensure(fresh_copy, topology(**{"kiosk-1": moved}))
    cert_path, key_path = pki.node_paths("kiosk-1")
    san = load(cert_path).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.10.1.9") in san.get_values_for_type(x509.IPAddress)
    assert key_path.read_bytes() == key_before


def test_unknown_node_has_no_identity(pki: PKI) -> None:
    with pytest.raises(PKIError, match="no certificate for node 'nobody'"):
        pki.node_paths("nobody")


def test_principals_are_client_only_identities_made_on_demand(pki: PKI) -> None:
    for name in ("operator", "store-staff"):
        cert_path, key_path = pki.principal_paths(name)
        cert = load(cert_path)
        cert.verify_directly_issued_by(pki.network_ca)
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == name
        assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == "principal"
        assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
            ExtendedKeyUsageOID.CLIENT_AUTH
        ]
        assert key_path.exists()


def test_a_node_cannot_take_a_principal_name(tmp_path: Path) -> None:
    impostor = Node(id="operator", kind="kiosk", site="store-1", address="127.10.1.4")
    with pytest.raises(PKIError, match="reserved for a principal"):
        PKI.ensure(tmp_path, topology(operator=impostor))


def test_ocsp_signer_is_delegated_by_the_jpki_ca(pki: PKI) -> None:
    cert, key = pki.ocsp_signer()
    cert.verify_directly_issued_by(pki.jpki_ca)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.OCSP_SIGNING]
    assert cert.public_key() == key.public_key()


def test_card_certificate_profile(pki: PKI) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    start = datetime(2026, 4, 1, 9, 0, tzinfo=JST)
    cert = pki.issue_card_certificate(key.public_key(), "card-0123456789ab", start)
    cert.verify_directly_issued_by(pki.jpki_ca)
    assert cert.subject.rfc4514_string() == "CN=card-0123456789ab"  # opaque id, no personal data
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    assert cert.not_valid_before_utc == start
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == timedelta(days=3 * 365)  # BIZ-8
    assert cert.serial_number >= 2**63
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    assert isinstance(pki.jpki_ca.public_key(), rsa.RSAPublicKey) and pki.jpki_ca.public_key().key_size == 2048


def test_legacy_card_certificate_is_sha1_signed_by_the_jpki_ca(pki: PKI) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    cert = pki.issue_card_certificate(key.public_key(), "card-legacy", datetime(2026, 4, 1, tzinfo=JST), legacy=True)
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA1)
    ca_key = pki.jpki_ca.public_key()
    assert isinstance(ca_key, rsa.RSAPublicKey)
    ca_key.verify(cert.signature, cert.tbs_certificate_bytes, cert.signature_algorithm_parameters, hashes.SHA1())


def test_card_certificate_needs_an_aware_start(pki: PKI) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(ValueError, match="aware"):
        pki.issue_card_certificate(key.public_key(), "card-x", datetime(2026, 4, 1))


def test_recreated_network_ca_reissues_node_and_principal_certificates(fresh_copy: Path) -> None:
    PKI.ensure(fresh_copy, topology()).principal_paths("operator")
    for lost in ("network-ca.pem", "network-ca.key"):
        (fresh_copy / "pki" / lost).unlink()
    pki = PKI.ensure(fresh_copy, topology())
    for cert_path in (pki.node_paths("kiosk-1")[0], pki.principal_paths("operator")[0]):
        load(cert_path).verify_directly_issued_by(pki.network_ca)


def test_no_temporary_files_are_left_behind(pki: PKI) -> None:
    assert not list((pki.state_dir / "pki").rglob("*.tmp"))


def test_a_stamped_node_certificate_is_the_one_the_builder_makes(pki: PKI, tmp_path: Path) -> None:
    """Bulk node leaves are stamped from a template (topology/leafstamp.py): each must be,
    field for field, what `x509.CertificateBuilder` makes, and openssl must verify it."""
    ca_key = pki.network_ca_key
    now = datetime.now().astimezone()

    def build(name: str, ips: list[str], key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "konbini test PKI"),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "node"),
                x509.NameAttribute(NameOID.COMMON_NAME, name),
            ]
        )
        sans = [x509.DNSName(name), *(x509.IPAddress(ipaddress.ip_address(a)) for a in ips)]
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(pki.network_ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )

    template = build("template", [], ec.generate_private_key(ec.SECP256R1()))
    key = ec.generate_private_key(ec.SECP256R1())
    ips = ["127.10.9.1", "198.18.9.1", "::1"]
    stamped = x509.load_der_x509_certificate(LeafStamp(template, ca_key, "node").issue("store-router-9", ips, key))
    made = build("store-router-9", ips, key)

    stamped.verify_directly_issued_by(pki.network_ca)
    assert stamped.subject == made.subject and stamped.issuer == made.issuer
    assert stamped.public_key() == made.public_key()
    assert (stamped.not_valid_before_utc, stamped.not_valid_after_utc) == (
        made.not_valid_before_utc,
        made.not_valid_after_utc,
    )
    assert list(stamped.extensions) == list(made.extensions)
    assert 0 < stamped.serial_number < 2**159 and stamped.serial_number != made.serial_number
    (tmp_path / "leaf.pem").write_bytes(stamped.public_bytes(serialization.Encoding.PEM))
    openssl = subprocess.run(
        ["openssl", "verify", "-purpose", "sslserver", "-CAfile", str(pki.network_ca_path), str(tmp_path / "leaf.pem")],
        capture_output=True,
        text=True,
    )
    assert openssl.returncode == 0, openssl.stderr
