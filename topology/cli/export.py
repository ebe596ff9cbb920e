"""`konbini export k8s|compose`: write a topology as Kubernetes manifests or a compose file.

The manifests are built in `topology/export/`; this module ensures the test PKI, reads the
topology file and writes the files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from topology.cli.common import UserError, load, state_dir
from topology.export.compose import export_compose
from topology.export.k8s import (
    ExportError,
    KubeOptions,
    dump,
    export_k8s,
    exported_nodes,
    grouped,
    monitoring_files,
    pki_files,
    pki_topology,
)
from topology.pki import PKI, PKIError
from topology.spec.model import STORE_KINDS


def _pki(args, topo) -> PKI:
    try:
        return PKI.ensure(state_dir(args, topo), topo)
    except (PKIError, OSError) as exc:
        raise UserError(f"test PKI: {exc}") from None


def cmd_export_k8s(args) -> int:
    topo = load(args.file)
    source = Path(topo.source)
    opts = KubeOptions(
        namespace=args.namespace,
        image=args.image,
        topology_text=source.read_text(encoding="utf-8"),
        group_stores=args.group_stores,
    )
    pki = _pki(args, pki_topology(topo, opts))
    files = {n.id: pki_files(pki, n) for n in exported_nodes(topo, opts)}
    try:
        manifests = export_k8s(topo, opts, files, monitoring_files(pki))
    except ExportError as exc:
        raise UserError(f"{topo.source}: {exc}") from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, docs in manifests.items():
        (out / name).write_text(dump(docs), encoding="utf-8")
    count = sum(len(docs) for docs in manifests.values())
    print(f"topology {topo.name}: {count} manifests in {out}/ (namespace {args.namespace}, image {args.image})")
    for name, docs in manifests.items():
        kinds = sorted({d["kind"] for d in docs})
        print(f"  {name:28} {len(docs):3}  {', '.join(kinds)}")
    if grouped(topo, opts):
        store = [n for n in topo.nodes.values() if n.kind in STORE_KINDS]
        print(
            f"store side grouped: {len(store)} nodes selected by kind and operator, policies only, no workloads "
            "(per-node identities and Service names for every store do not fit a bounded export)"
        )
    print(f"apply: kubectl apply -f {out}/   (the Secrets hold the test PKI's private keys: a test cluster only)")
    return 0


def cmd_export_compose(args) -> int:
    topo = load(args.file)
    pki = _pki(args, topo)
    for node in topo.nodes.values():  # the containers mount pki/ read-only: their files written out now
        if node.is_server or node.kind == "kiosk":
            pki.node_paths(node.id)
    try:
        doc = export_compose(topo, args.image, str(Path(topo.source).resolve()), str(pki.dir.resolve()))
    except ExportError as exc:
        raise UserError(f"{topo.source}: {exc}") from None
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    print(f"topology {topo.name}: {len(doc['services'])} services, {len(doc['networks'])} networks in {out}")
    print(f"run: podman compose -f {out} up   (or docker compose)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("export", help="write the topology as Kubernetes manifests or a compose file")
    esub = e.add_subparsers(dest="export_cmd", required=True)
    k = esub.add_parser("k8s", help="Kubernetes manifests with NetworkPolicy compiled from the allow-lists")
    k.add_argument("file", nargs="?", help="topology file (default: the shipped default topology)")
    k.add_argument("--out", required=True, help="directory for the manifests")
    k.add_argument("--namespace", default="konbini")
    k.add_argument("--image", default="konbini:latest", help="container image built from the Containerfile")
    k.add_argument("--state", help="state directory holding the test PKI (created when missing)")
    k.add_argument(
        "--group-stores",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="select the store side by kind and operator, without its workloads (default: past 1000 store-side nodes)",
    )
    k.set_defaults(func=cmd_export_k8s)
    c = esub.add_parser("compose", help="a compose file for one host: a network per line")
    c.add_argument("file", nargs="?", help="topology file (default: the shipped default topology)")
    c.add_argument("--out", required=True, help="the compose file to write")
    c.add_argument("--image", default="konbini:latest")
    c.add_argument("--state", help="state directory holding the test PKI (created when missing)")
    c.set_defaults(func=cmd_export_compose)
