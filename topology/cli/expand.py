"""`konbini expand FILE` and `konbini schema`: the compact format written out in full, and its JSON Schema.

The expansion is printed as YAML an explicit-format loader reads back to the same topology; each
node is one flow mapping (JSON, which YAML reads as is), so 250,000 nodes print in seconds. An
allow entry that came from a template carries the template's file:line in a comment.
"""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

import msgspec

from topology.cli.common import default_topology_path, load
from topology.spec.expand import json_schema
from topology.spec.model import Node, Topology, derive_netns_address

_enc = msgspec.json.Encoder()


def _node_fields(node: Node) -> dict[str, Any]:
    out = msgspec.to_builtins(node)
    del out["id"]
    if node.netns_address == derive_netns_address(node.address):
        out.pop("netns_address", None)  # the loader derives it again
    if node.upstream_policy == "failover":
        out.pop("upstream_policy", None)
    for rule in out.get("allow", ()):
        if rule.get("port") is None:
            rule.pop("port", None)
    return {k: v for k, v in out.items() if not _empty(v)}


def _empty(value: Any) -> bool:
    return value is None or (isinstance(value, (list, tuple, dict)) and not value)


def write_expanded(topo: Topology, out: TextIO) -> None:
    head = {
        "name": topo.name,
        "state_dir": topo.state_dir,
        "service_hours": msgspec.to_builtins(topo.service_hours),
        "tls_min_version": topo.tls_min_version,
    }
    if topo.ledger is not None:
        head["ledger"] = topo.ledger
    if topo.ocsp_cache:
        head["ocsp_cache"] = True
    if topo.limits:
        head["limits"] = msgspec.to_builtins(topo.limits)
    if topo.upstream_connections:
        head["upstream_connections"] = msgspec.to_builtins(topo.upstream_connections)
    out.write(f"# expanded from {topo.source}: {len(topo.nodes)} nodes, {len(topo.lines)} lines\n")
    for key, value in head.items():
        out.write(f"{key}: {_enc.encode(value).decode()}\n")
    out.write("nodes:\n")
    origins = topo.rule_origins
    write = out.write
    for node in topo.nodes.values():
        line = f"  {node.id}: {_enc.encode(_node_fields(node)).decode()}"
        if origins and node.allow:
            came = [
                f"allow[{i}] from {origins[k]}"
                for i in range(len(node.allow))
                if (k := f"nodes.{node.id}.allow[{i}]") in origins
            ]
            if came:
                line += "  # " + ", ".join(came)
        write(line + "\n")
    write("lines:\n")
    for line in topo.lines:
        fields = msgspec.to_builtins(line)
        if not fields.get("impair"):
            fields.pop("impair", None)
        write(f"  - {_enc.encode(fields).decode()}\n")


def cmd_expand(args) -> int:
    topo = load(args.file or default_topology_path())
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            write_expanded(topo, f)
        print(f"{args.out}: {len(topo.nodes)} nodes, {len(topo.lines)} lines")
    else:
        write_expanded(topo, sys.stdout)
    return 0


def cmd_schema(args) -> int:
    print(json.dumps(json_schema(), indent=2))
    return 0


def register(sub) -> None:
    e = sub.add_parser("expand", help="print the fully expanded topology (every node and allow entry)")
    e.add_argument("file", nargs="?", help="topology file (default: the shipped default topology)")
    e.add_argument("--out", help="write to this file instead of stdout")
    e.set_defaults(func=cmd_expand)
    s = sub.add_parser("schema", help="the topology file's JSON Schema (for editors)")
    s.set_defaults(func=cmd_schema)
