"""Where the test PKI's files are, none of them loaded: what a node's TLS contexts need.

`topology.pki.PKI` reads the CAs with `cryptography` when it is made. A process that serves
relays only needs nothing but the paths of its nodes' certificates and of the network CA, which
`ssl` loads itself; with `PKIFiles` it never imports `cryptography` (~9 MiB of a relay process's
RSS). The layout is `topology/pki.py`'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from topology.nodestore import NodeStore

NETWORK_CA_PEM = "network-ca.pem"  # under STATE/pki: the trust anchor of every TLS hop (both classes read it here)


class PKIError(Exception):
    """A PKI request that cannot be met; the message says which identity and where to look."""


class NodeFiles:
    """The file layout under STATE/pki, for a class with `state_dir` and `node_ids`."""

    state_dir: Path
    node_ids: frozenset[str]

    @property
    def dir(self) -> Path:
        return self.state_dir / "pki"

    @property
    def store(self) -> NodeStore:
        if (store := self.__dict__.get("_store")) is None:
            store = NodeStore(self.dir)
            object.__setattr__(self, "_store", store)  # PKIFiles is frozen; the store is a cache
        return store

    def node_paths(self, node_id: str) -> tuple[Path, Path]:
        """(certificate PEM, key PEM) of a topology node, for `ssl.SSLContext.load_cert_chain`:
        written from `nodes.db` on first use, or as mounted (a pod's Secret has the files only)."""
        cert, key = self.dir / "nodes" / f"{node_id}.pem", self.dir / "nodes" / f"{node_id}.key"
        # The certificate alone is enough: extraction writes it after the key, and a kiosk's Secret
        # holds the center's certificate without its key.
        if node_id not in self.node_ids or not (cert.exists() or self.store.extract(node_id, cert, key)):
            raise PKIError(f"no certificate for node {node_id!r} in {self.dir}; is it in the topology file?")
        return cert, key

    def has_identity(self, node_id: str) -> bool:
        """Whether `node_paths` can give this node's files, without writing them."""
        return not self.without_identity([node_id])

    def without_identity(self, node_ids: list[str]) -> list[str]:
        """Those of `node_ids` that `node_paths` cannot give files for, without writing any (a start
        checks all of its nodes at once; only the dialled ones need files)."""
        stored = self.store.having(node_ids)
        nodes = self.dir / "nodes"
        return [
            n
            for n in node_ids
            if n not in self.node_ids
            or (n not in stored and not ((nodes / f"{n}.pem").exists() and (nodes / f"{n}.key").exists()))
        ]


@dataclass(frozen=True)
class PKIFiles(NodeFiles):
    """An existing PKI's paths, for the nodes `node_ids` (made by `PKI.ensure` elsewhere)."""

    state_dir: Path
    node_ids: frozenset[str]

    @property
    def network_ca_path(self) -> Path:
        return self.dir / NETWORK_CA_PEM
