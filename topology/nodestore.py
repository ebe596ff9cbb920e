"""The node identities of the test PKI in one SQLite file, and their extraction for `ssl`.

A national file has ~250,000 nodes: as pairs of small files their identities took 2 GB of
blocks and most of a start's time to write. `pki/nodes.db` holds one row per node instead
(certificate and PKCS#8 key as DER, IP SANs, notAfter, the issuing CA's key id), which an
auditor reads with `sqlite3` or `konbini`'s own `PKI`. `ssl` loads only files, so a node's
`nodes/<id>.pem` and `.key` are written from its row the first time a process asks for them
(a node's first connection): most nodes of a large file are never dialled and never written.

No `cryptography` here: a relay process reads the store through `topology.pkifiles`.
"""

from __future__ import annotations

import base64
import os
import secrets
import sqlite3
from collections.abc import Iterable
from pathlib import Path

NODES_DB = "nodes.db"  # under STATE/pki
_SCHEMA = """CREATE TABLE IF NOT EXISTS node (
    id TEXT PRIMARY KEY,  -- the topology node id: CN and DNS SAN
    ips TEXT NOT NULL,    -- its IP SANs, sorted, space-separated
    not_after REAL NOT NULL,
    ca TEXT NOT NULL,     -- key id (hex) of the network CA that issued it
    cert BLOB NOT NULL,   -- DER
    key BLOB NOT NULL     -- PKCS#8 DER, unencrypted: the file is 0600
)"""


class NodeStore:
    """`pki/nodes.db`, opened on first use in each process (a connection never crosses a fork)."""

    def __init__(self, pki_dir: Path) -> None:
        self.path = Path(pki_dir) / NODES_DB
        self._db: sqlite3.Connection | None = None
        self._pid = 0

    def _conn(self, create: bool = False) -> sqlite3.Connection | None:
        if self._db is None or self._pid != os.getpid():
            if not create and not self.path.exists():
                return None
            if create and not self.path.exists():
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))  # keys inside: never world-readable
            self._db, self._pid = sqlite3.connect(self.path, timeout=60.0, isolation_level=None), os.getpid()
            if create:
                self._db.execute(_SCHEMA)
        return self._db

    def current(self, ca_id: str, renew_at: float) -> dict[str, str]:
        """Node id -> IP SANs (sorted, space-separated, as stored) of every row issued by `ca_id`
        and valid past `renew_at`. As stored: splitting 248,000 of them was 1.1 s of every start."""
        db = self._conn()
        if db is None:
            return {}
        return dict(db.execute("SELECT id, ips FROM node WHERE ca = ? AND not_after > ?", (ca_id, renew_at)))

    def keys(self, node_ids: Iterable[str]) -> dict[str, bytes]:
        """The stored keys of these nodes (a reissued certificate keeps its node's key)."""
        db = self._conn()
        if db is None:
            return {}
        out = {}
        for node_id in node_ids:
            row = db.execute("SELECT key FROM node WHERE id = ?", (node_id,)).fetchone()
            if row is not None:
                out[node_id] = row[0]
        return out

    def put(self, ca_id: str, rows: Iterable[tuple[str, list[str], float, bytes, bytes]]) -> None:
        """(node id, IP SANs, notAfter, certificate DER, key DER) rows, in one transaction."""
        db = self._conn(create=True)
        assert db is not None
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(
                "INSERT OR REPLACE INTO node VALUES (?, ?, ?, ?, ?, ?)",
                ((node_id, " ".join(ips), not_after, ca_id, cert, key) for node_id, ips, not_after, cert, key in rows),
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def identity(self, node_id: str) -> tuple[bytes, bytes] | None:
        """(certificate DER, key DER) of a node, or None."""
        db = self._conn()
        row = None if db is None else db.execute("SELECT cert, key FROM node WHERE id = ?", (node_id,)).fetchone()
        return None if row is None else (row[0], row[1])

    def having(self, node_ids: list[str]) -> set[str]:
        """Those of `node_ids` with a row: a query per 500 ids, not one each (a node process checks
        its thousands of nodes at start)."""
        db = self._conn()
        if db is None:
            return set()
        found: set[str] = set()
        for i in range(0, len(node_ids), 500):  # under SQLite's bound on parameters (999 before 3.32)
            chunk = node_ids[i : i + 500]
            marks = ",".join("?" * len(chunk))
            found.update(row[0] for row in db.execute(f"SELECT id FROM node WHERE id IN ({marks})", chunk))
        return found

    def extract(self, node_id: str, cert_path: Path, key_path: Path) -> bool:
        """Write a node's PEM files from its row (the key first, 0600); False when it has none."""
        found = self.identity(node_id)
        if found is None:
            return False
        cert, key = found
        cert_path.parent.mkdir(parents=True, exist_ok=True)
        _write_new(key_path, _pem("PRIVATE KEY", key), 0o600)
        _write_new(cert_path, _pem("CERTIFICATE", cert), 0o644)
        return True


def forget_extracted(nodes_dir: Path, node_ids: Iterable[str]) -> None:
    """Remove the PEM files written for these nodes: their rows were reissued."""
    try:
        present = {name.rsplit(".", 1)[0] for name in os.listdir(nodes_dir)}
    except FileNotFoundError:
        return
    for node_id in present.intersection(node_ids):
        for suffix in (".pem", ".key"):
            (nodes_dir / f"{node_id}{suffix}").unlink(missing_ok=True)


def _pem(label: str, der: bytes) -> bytes:
    body = base64.encodebytes(der).replace(b"\n", b"")
    lines = b"\n".join(body[i : i + 64] for i in range(0, len(body), 64))
    return b"-----BEGIN %s-----\n%s\n-----END %s-----\n" % (label.encode(), lines, label.encode())


def _write_new(path: Path, data: bytes, mode: int) -> None:
    # Two processes may extract the same node at once: each renames its own complete file.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
