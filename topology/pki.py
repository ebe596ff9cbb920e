"""The test PKI: a network CA for every TLS hop and a JPKI-like CA for card authentication.

Generated on first use into `<state_dir>/pki/` and reused afterwards; `PKI.ensure` is idempotent
and issues only what is missing (a node added to the topology, a principal asked for) or stale
(a node whose address changed, a certificate past its end):

    pki/
      .lock                       serialises concurrent `ensure` calls (several node processes)
      network-ca.pem  .key        ECDSA P-256, trust anchor of every TLS hop (SEC-SN-2)
      jpki-ca.pem     .key        RSA-2048, issues card authentication certificates (SEC-KI-1)
      ocsp-signer.pem .key        ECDSA P-256, delegated OCSP signer issued by the JPKI CA
      nodes.db                    one identity per topology node (CN, DNS and IP SANs), ECDSA P-256:
                                  certificate and key as DER in one SQLite row (topology/nodestore.py)
      nodes/<node id>.pem .key    written from nodes.db when a process first needs them (`node_paths`)
      principals/<name>.pem .key  people, not nodes: "operator", "store-staff", "monitoring"

Private keys are PKCS#8 (PEM files, DER in nodes.db), mode 0600, written atomically (temporary file + rename), so a
crash never leaves half a key behind.
"""

from __future__ import annotations

import fcntl
import ipaddress
import multiprocessing
import os
import re
import secrets
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    PrivateKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from topology.leafstamp import LeafStamp
from topology.nodestore import forget_extracted
from topology.pkifiles import NETWORK_CA_PEM, NodeFiles, PKIError  # noqa: F401 - PKIError is this module's too
from topology.spec.model import Mode, Topology


def card_id_of(cert: x509.Certificate) -> str:
    """Whose credential this is, as an opaque card id: a card's own id (its subject's common name),
    or for a smartphone credential the id of the card it was made from (its subject's pseudonym)."""
    holder = cert.subject.get_attributes_for_oid(NameOID.PSEUDONYM) or cert.subject.get_attributes_for_oid(
        NameOID.COMMON_NAME
    )
    return holder[0].value  # type: ignore[return-value]


def is_smartphone(cert: x509.Certificate) -> bool:
    """A smartphone credential's certificate names the card it stands in for (seed 002)."""
    return bool(cert.subject.get_attributes_for_oid(NameOID.PSEUDONYM))


CARD_VALIDITY_DAYS = 3 * 365  # BIZ-8: JPKI certificates are valid 3 years (004 §5)
PRINCIPALS = ("operator", "store-staff", "monitoring")  # monitoring: scrapes metrics (topology/policy/monitoring.py)

# Seed 004's revocation causes -> RFC 5280 CRLReason, as carried in OCSP responses (BIZ-8).
REVOCATION_REASONS: dict[str, x509.ReasonFlags] = {
    "key-compromise": x509.ReasonFlags.key_compromise,  # §7.1
    # §7.2 and §8.1(1): the holder stops using it, moves out or dies; nothing about the key is
    # wrong, the certificate is simply no longer needed.
    "voluntary": x509.ReasonFlags.cessation_of_operation,
    "moved-or-died": x509.ReasonFlags.cessation_of_operation,
    "record-error": x509.ReasonFlags.affiliation_changed,  # §8.1(2): recorded data was wrong
    "ca-compromise": x509.ReasonFlags.ca_compromise,  # §8.1(3)
    "renewed": x509.ReasonFlags.superseded,  # §6: renewal revokes and reissues
}

# CA and OCSP-signer validity spans any date the emulated clock may be set to; node and
# principal certificates follow the real clock instead, because OpenSSL checks them.
_ERA_START = datetime(2000, 1, 1, tzinfo=UTC)
_ERA_END = datetime(2099, 12, 31, 23, 59, 59, tzinfo=UTC)
_LEAF_DAYS = 10 * 365
_RENEW_BEFORE = timedelta(days=30)
# Up to this many nodes, every node's PEM files are written at once (a national file's are
# written when a process first needs them).
FILES_UP_TO = 2_000
_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SHA256_RSA = bytes.fromhex("06092a864886f70d01010b")  # DER OID 1.2.840.113549.1.1.11
_SHA1_RSA = bytes.fromhex("06092a864886f70d010105")  # DER OID 1.2.840.113549.1.1.5


@dataclass
class PKI(NodeFiles):
    state_dir: Path
    network_ca: x509.Certificate
    network_ca_path: Path
    jpki_ca: x509.Certificate
    jpki_ca_key: rsa.RSAPrivateKey | None = field(repr=False)  # None when loaded read-only without it
    network_ca_key: ec.EllipticCurvePrivateKey | None = field(repr=False)  # likewise: a pod issues nothing
    node_ids: frozenset[str] = frozenset()
    _ocsp_signer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = field(default=None, repr=False)

    @classmethod
    def ensure(cls, state_dir: Path, topology: Topology) -> PKI:
        """Create what is missing under `state_dir/pki`, load what exists; no key generation when complete."""
        state_dir = Path(state_dir)
        pki_dir = state_dir / "pki"
        for sub in ("nodes", "principals"):
            (pki_dir / sub).mkdir(parents=True, exist_ok=True)
        for node_id in topology.nodes:
            if node_id in PRINCIPALS:
                raise PKIError(
                    f"{topology.source}: node id {node_id!r} is reserved for a principal certificate; rename the node"
                )
            _check_name(node_id, "node id")
        with file_lock(pki_dir / ".lock"):
            net_cert, net_key = _ensure_ca(
                pki_dir / "network-ca", "konbini network CA", lambda: ec.generate_private_key(ec.SECP256R1())
            )
            jpki_cert, jpki_key = _ensure_ca(
                pki_dir / "jpki-ca",
                "konbini JPKI-like CA for user authentication",
                lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
            )
            if not isinstance(net_key, ec.EllipticCurvePrivateKey) or not isinstance(jpki_key, rsa.RSAPrivateKey):
                raise PKIError(f"{pki_dir}: CA key of an unexpected type; remove the directory to regenerate the PKI")
            pki = cls(
                state_dir=state_dir,
                network_ca=net_cert,
                network_ca_path=pki_dir / NETWORK_CA_PEM,
                jpki_ca=jpki_cert,
                jpki_ca_key=jpki_key,
                network_ca_key=net_key,
                node_ids=frozenset(topology.nodes),
            )
            pki._ensure_nodes(topology)
            for issued in (pki_dir / "principals").glob("*.pem"):
                pki._ensure_leaf(issued.with_suffix(""), issued.stem, "principal", [])
            pki._ensure_ocsp_signer()
        return pki

    @classmethod
    def load(cls, state_dir: Path, topology: Topology) -> PKI:
        """Read-only: what a node's mounted Secret holds under `state_dir/pki` (cluster mode,
        `topology/export/k8s.py` `pki_files`), with no lock, no issuing, no write. CA keys stay
        None unless the Secret carries them (the OCSP responder and kiosks get the JPKI CA key)."""
        state_dir = Path(state_dir)
        pki_dir = state_dir / "pki"
        ca_path = pki_dir / NETWORK_CA_PEM
        jpki_path = pki_dir / "jpki-ca.pem"
        if not ca_path.exists():
            raise PKIError(f"{ca_path} is missing: mount the node's PKI Secret there (konbini export k8s writes it)")
        jpki_key = _load_key(jpki_path.with_suffix(".key")) if jpki_path.with_suffix(".key").exists() else None
        return cls(
            state_dir=state_dir,
            network_ca=_load_cert(ca_path),
            network_ca_path=ca_path,
            jpki_ca=_load_cert(jpki_path) if jpki_path.exists() else None,  # type: ignore[arg-type]
            jpki_ca_key=jpki_key if isinstance(jpki_key, rsa.RSAPrivateKey) else None,
            network_ca_key=None,
            node_ids=frozenset(topology.nodes),
        )

    def principal_paths(self, name: str) -> tuple[Path, Path]:
        """(certificate PEM, key PEM) of a principal such as "operator" or "store-staff"; issued on first use."""
        _check_name(name, "principal name")
        if name in self.node_ids:
            raise PKIError(f"principal {name!r} would share its identity with the node of that id")
        base = self.dir / "principals" / name
        if not base.with_suffix(".pem").exists():
            with file_lock(self.dir / ".lock"):
                self._ensure_leaf(base, name, "principal", [])
        return base.with_suffix(".pem"), base.with_suffix(".key")

    def ocsp_signer(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        """The delegated OCSP signer: certificate issued by the JPKI CA (EKU OCSPSigning) and its key."""
        if self._ocsp_signer is None:
            base = self.dir / "ocsp-signer"
            key = _load_key(base.with_suffix(".key"))
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise PKIError(f"{base}.key: not an ECDSA key; remove it and run PKI.ensure again")
            self._ocsp_signer = (_load_cert(base.with_suffix(".pem")), key)
        return self._ocsp_signer

    def issue_card_certificate(
        self,
        public_key: rsa.RSAPublicKey,
        card_id: str,
        not_before: datetime,
        days: int = CARD_VALIDITY_DAYS,
        legacy: bool = False,
        stands_in_for: str | None = None,
    ) -> x509.Certificate:
        """A card authentication certificate: subject is the opaque card id only, never personal data.

        `legacy=True` gives seed 004's SHA-1 with RSA profile, which verifiers refuse by default.
        `stands_in_for`: a smartphone credential's, naming the card it substitutes as a pseudonym.
        """
        if not_before.tzinfo is None:
            raise ValueError("not_before must be an aware datetime (Asia/Tokyo from the clock)")
        builder = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [x509.NameAttribute(NameOID.COMMON_NAME, card_id)]
                    + ([x509.NameAttribute(NameOID.PSEUDONYM, stands_in_for)] if stands_in_for else [])
                )
            )
            .issuer_name(self.jpki_ca.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_before + timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(digital_signature=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(_aki(self.jpki_ca), critical=False)
        )
        cert = builder.sign(self.jpki_ca_key, hashes.SHA256())
        return _resign_sha1(cert, self.jpki_ca_key) if legacy else cert

    # -- internals -------------------------------------------------------------------------

    def _ensure_leaf(self, base: Path, name: str, role: str, addresses: list[str]) -> None:
        cert_path, key_path = base.with_suffix(".pem"), base.with_suffix(".key")
        ips = [ipaddress.ip_address(a) for a in dict.fromkeys(addresses)]
        if cert_path.exists() and key_path.exists():
            if _leaf_is_current(_load_cert(cert_path), self.network_ca, name, ips):
                return
        _issue_leaf(self.network_ca, self.network_ca_key, base, name, role, ips)

    def _ensure_nodes(self, topology: Topology) -> None:
        """Every node's identity current in `nodes.db`, at national size too (250,000 nodes): one
        query says which are, and what is missing or stale is issued in bulk, in parallel."""
        renew_at = (datetime.now(UTC) + _RENEW_BEFORE).timestamp()
        have = self.store.current(_aki(self.network_ca).key_identifier.hex(), renew_at)
        todo = [
            (node.id, ips) for node in topology.nodes.values() if have.get(node.id) != " ".join(ips := _node_ips(node))
        ]
        if todo:
            keys = self.store.keys(node_id for node_id, _ in todo)  # a moved node keeps its key
            rows = issue_node_leaves(self.network_ca, self.network_ca_key, [(i, ips, keys.get(i)) for i, ips in todo])
            forget_extracted(self.dir / "nodes", (node_id for node_id, _ in todo))  # files written from the old rows
            self.store.put(_aki(self.network_ca).key_identifier.hex(), rows)
        if len(topology.nodes) <= FILES_UP_TO:  # curl, openssl and the docs' examples read a node's files
            for node_id in topology.nodes:
                self.node_paths(node_id)  # written once: a file already there is left as it is

    def _ensure_ocsp_signer(self) -> None:
        base = self.dir / "ocsp-signer"
        cert_path, key_path = base.with_suffix(".pem"), base.with_suffix(".key")
        if cert_path.exists() and key_path.exists() and _issued_by(_load_cert(cert_path), self.jpki_ca):
            return
        key = _load_key(key_path) if key_path.exists() else None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            key = ec.generate_private_key(ec.SECP256R1())
            write_atomic(key_path, _key_pem(key), 0o600)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_ca_name("konbini JPKI OCSP responder"))
            .issuer_name(self.jpki_ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_ERA_START)
            .not_valid_after(_ERA_END)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(digital_signature=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]), critical=False)
            # RFC 6960 §4.2.2.2.1: clients need not check the responder's own status.
            .add_extension(x509.OCSPNoCheck(), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(_aki(self.jpki_ca), critical=False)
            .sign(self.jpki_ca_key, hashes.SHA256())
        )
        write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def verify_card_certificate(
    cert: x509.Certificate, jpki_ca: x509.Certificate, now: datetime, allow_legacy: bool = False
) -> str | None:
    """None when the card certificate is acceptable at `now`, else the BIZ-2/BIZ-8 refusal code.

    Trust is checked first so nothing else is reported about a certificate we did not issue.
    """
    ca_key = jpki_ca.public_key()
    if cert.issuer != jpki_ca.subject or not isinstance(ca_key, rsa.RSAPublicKey):
        return "card-untrusted"
    hash_alg = cert.signature_hash_algorithm
    pad = cert.signature_algorithm_parameters
    if hash_alg is None or not isinstance(pad, padding.PKCS1v15):
        return "card-untrusted"
    try:
        # Verified by hand because cryptography's own chain checks reject SHA-1 outright, and the
        # legacy profile must be recognised (and refused with its own reason), not called untrusted.
        ca_key.verify(cert.signature, cert.tbs_certificate_bytes, pad, hash_alg)
    except InvalidSignature:
        return "card-untrusted"
    card_key = cert.public_key()
    legacy = isinstance(hash_alg, hashes.SHA1) or (isinstance(card_key, rsa.RSAPublicKey) and card_key.key_size < 2048)
    if legacy and not allow_legacy:
        return "legacy-profile-refused"
    if now < cert.not_valid_before_utc:
        return "card-not-yet-valid"
    if now > cert.not_valid_after_utc:
        return "card-expired"
    return None


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace `path` with `data` in one step: readers see the old or the new file, never a part."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock between processes sharing a state directory."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def load_private_key(pem: bytes) -> PrivateKeyTypes:
    # Skipping RSA key validation takes a load from ~30 ms to ~10 µs; these keys were written by
    # us into a 0600 file, so the check (meant for keys from untrusted sources) buys nothing.
    return serialization.load_pem_private_key(pem, password=None, unsafe_skip_rsa_key_validation=True)


def _ensure_ca(
    base: Path, cn: str, keygen: Callable[[], CertificateIssuerPrivateKeyTypes]
) -> tuple[x509.Certificate, PrivateKeyTypes]:
    """Load or create a self-signed CA. Certificates it issued are checked against its key id by
    the callers, so a CA recreated after a lost file makes them reissue, never mix."""
    cert_path, key_path = base.with_suffix(".pem"), base.with_suffix(".key")
    if key_path.exists():
        key = _load_key(key_path)
        if cert_path.exists():
            return _load_cert(cert_path), key
        if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
            raise PKIError(f"{key_path}: not an ECDSA or RSA key; remove it and run again")
    else:
        key = keygen()
        write_atomic(key_path, _key_pem(key), 0o600)
    name = _ca_name(cn)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_ERA_START)
        .not_valid_after(_ERA_END)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True, digital_signature=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert, key


# -- node certificates in bulk -------------------------------------------------------------

_BULK_CHUNK = 2000  # leaves per worker task; below one chunk everything is issued in this process
_Leaf = tuple[str, list[str], float, bytes, bytes]  # a nodes.db row: id, IP SANs, notAfter, cert DER, key DER


def issue_node_leaves(ca: x509.Certificate, ca_key, todo: list[tuple[str, list[str], bytes | None]]) -> list[_Leaf]:
    """Issue `todo` (node id, IP SANs, key DER to keep or None) leaves; over one chunk, in one
    process per core. Returns their `nodes.db` rows."""
    chunks = [todo[i : i + _BULK_CHUNK] for i in range(0, len(todo), _BULK_CHUNK)]
    if len(chunks) <= 1:
        return _issue_chunk(ca, ca_key, todo)
    issued: list[_Leaf] = []
    ca_pem, key_pem = ca.public_bytes(serialization.Encoding.PEM), _key_pem(ca_key)
    fork = multiprocessing.get_context("fork")  # the children need no imports; nothing of trio runs in them
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1, mp_context=fork) as pool:
        for part in pool.map(_issue_chunk_pem, [(ca_pem, key_pem, chunk) for chunk in chunks]):
            issued.extend(part)
    return issued


def _issue_chunk_pem(job: tuple[bytes, bytes, list[tuple[str, list[str], bytes | None]]]) -> list[_Leaf]:
    ca_pem, key_pem, todo = job
    return _issue_chunk(x509.load_pem_x509_certificate(ca_pem), load_private_key(key_pem), todo)


def _issue_chunk(ca: x509.Certificate, ca_key, todo: list[tuple[str, list[str], bytes | None]]) -> list[_Leaf]:
    template = _leaf_certificate(ca, ca_key, ec.generate_private_key(ec.SECP256R1()), "template", "node", [])
    stamp, not_after = LeafStamp(template, ca_key, "node"), template.not_valid_after_utc.timestamp()
    out: list[_Leaf] = []
    for node_id, ips, key_der in todo:
        key = serialization.load_der_private_key(key_der, None) if key_der is not None else None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            key = ec.generate_private_key(ec.SECP256R1())
        pkcs8 = key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        out.append((node_id, ips, not_after, stamp.issue(node_id, ips, key), pkcs8))
    return out


def _node_ips(node) -> list[str]:
    """A node certificate's IP SANs, as nodes.db keeps them: both addresses, sorted."""
    return sorted({node.address, node.address_in(Mode.NETNS)})


def _issue_leaf(ca: x509.Certificate, ca_key, base: Path, name: str, role: str, ips: list) -> x509.Certificate:
    """Issue the leaf at `base` (.pem, .key): a principal's, which people and tools read as files."""
    cert_path, key_path = base.with_suffix(".pem"), base.with_suffix(".key")
    # Reuse an existing key: the certificate is written after the key, so a crash between
    # the two leaves a key whose next certificate still matches it.
    try:
        key = _load_key(key_path) if key_path.exists() else None
    except ValueError:
        key = None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        key = ec.generate_private_key(ec.SECP256R1())
        write_atomic(key_path, _key_pem(key), 0o600)
    cert = _leaf_certificate(ca, ca_key, key, name, role, ips)
    write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert


def _leaf_certificate(
    ca: x509.Certificate, ca_key, key: ec.EllipticCurvePrivateKey, name: str, role: str, ips: list
) -> x509.Certificate:
    now = datetime.now(UTC)
    # Nodes are TLS servers and clients (relays are both); principals only ever connect.
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if role == "node":
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
    sans: list[x509.GeneralName] = [x509.DNSName(name), *(x509.IPAddress(ip) for ip in ips)]
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "konbini test PKI"),
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                    x509.NameAttribute(NameOID.COMMON_NAME, name),
                ]
            )
        )
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=_LEAF_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(_aki(ca), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except x509.ExtensionNotFound:
        return False
    return aki.key_identifier == _aki(issuer).key_identifier


def _leaf_is_current(cert: x509.Certificate, issuer: x509.Certificate, name: str, ips: list[_IPAddress]) -> bool:
    if not _issued_by(cert, issuer):
        return False
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    return (
        san.get_values_for_type(x509.DNSName) == [name]
        and sorted(san.get_values_for_type(x509.IPAddress), key=str) == sorted(ips, key=str)
        and cert.not_valid_after_utc - _RENEW_BEFORE > datetime.now(UTC)
    )


def _resign_sha1(cert: x509.Certificate, ca_key: rsa.RSAPrivateKey) -> x509.Certificate:
    # cryptography refuses SHA-1 in CertificateBuilder.sign, but seed 004's legacy profile must
    # exist so that it can be refused. Both signature-algorithm OIDs have the same DER length and
    # an RSA-2048 signature is 256 bytes whatever the hash, so swapping the OID and the signature
    # bytes in place changes no length field; the result is re-parsed (and so validated) below.
    der = cert.public_bytes(serialization.Encoding.DER)
    if der.count(_SHA256_RSA) != 2 or not der.endswith(cert.signature):
        raise PKIError("unexpected certificate layout while building the legacy SHA-1 profile")
    tbs = cert.tbs_certificate_bytes.replace(_SHA256_RSA, _SHA1_RSA)
    signature = ca_key.sign(tbs, padding.PKCS1v15(), hashes.SHA1())
    legacy = x509.load_der_x509_certificate(der[: -len(signature)].replace(_SHA256_RSA, _SHA1_RSA) + signature)
    if legacy.tbs_certificate_bytes != tbs or not isinstance(legacy.signature_hash_algorithm, hashes.SHA1):
        raise PKIError("the legacy SHA-1 certificate did not re-parse as built")
    return legacy


def _key_pem(key: PrivateKeyTypes) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _load_key(path: Path) -> PrivateKeyTypes:
    return load_private_key(path.read_bytes())


def _load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _ca_name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "JP"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "konbini test PKI"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _aki(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _key_usage(digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _check_name(name: str, what: str) -> None:
    if not _SAFE_NAME.match(name):
        raise PKIError(f"{what} {name!r} cannot name a certificate file: use letters, digits, '.', '_' or '-'")
