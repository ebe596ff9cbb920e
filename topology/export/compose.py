"""A topology as a compose file for plain containers on one host: one service per server node and
kiosk, one internal network per line, so a container can reach only the nodes it shares a line
with (the netns mode's veths, as bridges). Each node still enforces its own allow-list; the
networks add no per-port filtering and no impairments (those stay netns mode's `tc netem`).
"""

from __future__ import annotations

from topology.export.k8s import STATE, TOPOLOGY_PATH, check_name, issue_command, nodehost_command
from topology.export.netpol import impairment_text, node_labels
from topology.spec.kinds import KINDS
from topology.spec.model import Topology


def export_compose(topo: Topology, image: str, topology_file: str, pki_dir: str) -> dict:
    """The compose document. `topology_file` and `pki_dir`: host paths, bind-mounted read-only."""
    networks: dict[str, dict] = {}
    joined: dict[str, list[str]] = {n: [] for n in topo.nodes}
    for line in topo.lines:
        check_name("line id", line.id)
        net: dict = {"internal": True, "labels": {"konbini.dev/line-kind": line.kind}}
        if text := impairment_text(line.impair):
            net["labels"]["konbini.dev/impair"] = f"{text} (not applied by compose)"
        networks[line.id] = net
        for end in (line.a, line.b):
            joined[end].append(line.id)
    services: dict[str, dict] = {}
    for node in sorted(topo.nodes.values(), key=lambda n: n.id):
        if KINDS[node.kind].workload is None:  # runs nothing (in-store Wi-Fi): a network member only
            continue
        check_name("node id", node.id)
        command = nodehost_command(node) if node.is_server else issue_command(node)
        service: dict = {
            "image": image,
            "command": command,
            "hostname": node.id,
            "labels": node_labels(node),
            "read_only": True,
            "user": "10001:10001",
            "cap_drop": ["ALL"],
            "security_opt": ["no-new-privileges:true"],
            "tmpfs": ["/tmp", STATE],
            "volumes": [f"{topology_file}:{TOPOLOGY_PATH}:ro", f"{pki_dir}:{STATE}/pki:ro"],
            "networks": {net: {"aliases": [node.id]} for net in sorted(joined[node.id])},
        }
        if node.is_server:
            service["stdin_open"] = True  # nodehost runs until its stdin reaches EOF
            service["restart"] = "unless-stopped"
        else:
            service["restart"] = "no"
            service["depends_on"] = [node.upstream] if node.upstream else []
        services[node.id] = service
    return {"name": f"konbini-{topo.name}".lower(), "services": services, "networks": networks}
