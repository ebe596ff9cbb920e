"""A part of a large file by site (topology/spec/part.py): what `konbini up --netns --sites` runs of
the national file, which a namespace per site cannot hold (248k nodes, more than 198.18.0.0/15)."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.konbinirun import konbini, running_up
from topology.check.probes import SOURCE_PORTS, plan_probes
from topology.netns.plan import build_plan
from topology.policy.compiler import reachability
from topology.spec.load import load_topology
from topology.spec.part import NETNS_POOL, PartError, part

NATIONAL = str(Path(__file__).resolve().parent.parent / "topology" / "national.yaml")
CLOCK = "2026-11-24T10:00:00+09:00"  # a Tuesday morning: every national municipality is open
ROOT = os.geteuid() == 0 and shutil.which("ip") and shutil.which("nft")


@pytest.fixture(scope="module")
def national():
    return load_topology(NATIONAL)


@pytest.fixture(scope="module")
def three(national):
    return part(national, ["store-a0000[1-3]"])


def test_a_part_is_the_named_stores_and_their_way_up(three):
    topo, notes = three
    sites = {n.site for n in topo.nodes.values()}
    assert sites == {
        "store-a00001",
        "store-a00002",
        "store-a00003",
        "ec-a",
        "dmz-a1",
        "dmz-a2",
        "center",
        "center-2",
        "lgwan-takamatsu",
    }  # the first municipality: none was named
    assert "ec-router-b" not in topo.nodes and "store-router-a00004" not in topo.nodes
    assert notes == ["3 site(s) named, 6 added for the way up: center, center-2, dmz-a1, dmz-a2, ec-a, lgwan-takamatsu"]


def test_a_parts_lines_and_allow_entries_name_only_its_nodes(three, national):
    topo, _ = three
    assert all(line.a in topo.nodes and line.b in topo.nodes for line in topo.lines)
    assert {line.id for line in topo.lines} >= {"dmz-a1", "dedicated-a2-c2", "lgwan-takamatsu-1"}
    for node in topo.nodes.values():
        assert len(node.allow) == len(national.nodes[node.id].allow)  # entries keep their places (labels)
        assert all(s in topo.nodes for rule in node.allow for s in rule.sources)
    ec = topo.nodes["ec-router-a"].allow[0].sources
    assert ec == ("store-router-a00001", "store-router-a00002", "store-router-a00003")
    allowed = {(r.src, r.dst) for r in reachability(topo) if r.allowed}
    assert ("store-router-a00002", "ec-router-a") in allowed and ("dmz-relay-a1", "issuance-center") in allowed


def test_a_parts_netns_addresses_are_renumbered_where_the_file_repeats_them(three, national):
    topo, _ = three
    # the file's derived netns addresses collide at national size: the center and a store controller
    assert national.nodes["issuance-center"].address_in("netns") == national.nodes[
        "store-controller-a00001"
    ].address_in("netns")
    addresses = [n.address_in("netns") for n in topo.nodes.values()]
    assert len(set(addresses)) == len(addresses)
    assert all(ipaddress.IPv4Address(a) in NETNS_POOL for a in addresses)
    assert [n.address for n in topo.nodes.values()] == [national.nodes[i].address for i in topo.nodes]  # loopback kept
    plan = build_plan(topo, "tpart")
    assert len(plan.sites) == 9 and all(v.site_a in plan.sites and v.site_b in plan.sites for v in plan.veths)


def test_a_large_parts_probes_get_source_ports_unique_per_source_address(national):
    """A part of 99 stores has more probes (87,505: every source against every server) than there
    are source ports; the agents match replies by the whole 5-tuple, so ports repeat only across
    source addresses."""
    topo, _ = part(national, ["store-a000[0-9][0-9]"])
    probes = plan_probes(topo, build_plan(topo, "tpart"))
    assert len(probes) > SOURCE_PORTS[1] - SOURCE_PORTS[0]
    assert len({(p.src_ip, p.sport) for p in probes}) == len(probes)
    assert all(SOURCE_PORTS[0] <= p.sport < SOURCE_PORTS[1] for p in probes)


def test_named_municipalities_replace_the_default_one(national):
    topo, _ = part(national, ["store-e0001", "lgwan-000[1-3]"])
    assert {n.site for n in topo.nodes.values() if n.kind == "municipality"} == {
        "lgwan-0001",
        "lgwan-0002",
        "lgwan-0003",
    }
    assert {n.site for n in topo.nodes.values() if n.kind == "dmz-relay"} == {"dmz-e"}


def test_a_pattern_matching_no_site_is_one_clear_error(national):
    with pytest.raises(PartError, match=r"--sites 'store-z\*' matches no site of 'national' \(sites are named like "):
        part(national, ["store-a00001", "store-z*"])


def test_sites_without_netns_and_netns_on_the_whole_national_file_are_refused():
    out = konbini("up", NATIONAL, "--sites", "store-a00001")
    assert out.returncode == 2 and "--sites chooses the part of a file that netns mode brings up" in out.stderr
    if os.geteuid() == 0:
        out = konbini("up", NATIONAL, "--netns")
        assert (
            out.returncode == 2
            and "247,989 nodes, too many for a namespace per site; bring up a part with --sites" in out.stderr
        )


@pytest.mark.skipif(not ROOT, reason="NETNS PART TEST SKIPPED: it needs root, iproute2 and nftables")
def test_a_national_part_runs_in_netns_issues_and_holds_its_policy(tmp_path):
    """`up --netns --sites` on the national file; `issue --netns` and `policy check --netns`, given
    the national file, join the part that runs (net/up.json) and not the whole file. Its 8
    namespaces are served by 2 node processes (`--processes 2`): the policy check's probes and
    the issuance show each node's sockets are in its own namespace (else the kernel rulesets,
    default drop, would refuse them, and the probes would find no listener)."""
    tag, state = f"p{os.getpid()}", str(tmp_path)
    # two node processes for the 8 namespaces: each process makes every socket in its node's namespace
    sites = ("--netns", "--sites", "store-b0000[1-2]", "--tag", tag, "--state", state, "--clock", CLOCK)
    with running_up(NATIONAL, *sites, "--processes", "2", tag=tag, state=state) as seen:
        # 2 stores, ec-b, dmz-b1, dmz-b2, center, center-2, lgwan-takamatsu
        assert "(8 namespaces" in seen[-1] and "2 node processes" in "".join(seen[-2:]), "".join(seen)
        joined = ("--netns", "--topology", NATIONAL, "--tag", tag, "--state", state, "--clock", CLOCK)
        out = konbini("issue", *joined, "--json", "--store", "store-b00002")
        assert out.returncode == 0, out.stdout + out.stderr
        result = json.loads(out.stdout)
        assert result["status"] == "issued" and result["signature_valid"]
        hops = [h["node"] for h in result["hops"]][:3]
        assert hops in [["issuance-center", f"dmz-relay-b{i}", "ec-router-b"] for i in (1, 2)], hops
        out = konbini("issue", *joined, "--store", "store-b00003")
        assert out.returncode == 2 and "store-b00003" in out.stderr  # not in the part that runs
        policy = ("--netns", "--tag", tag, "--state", state, "--json", "--no-outside-tools")
        out = konbini("policy", "check", NATIONAL, *policy, timeout=300)
        report = json.loads(out.stdout)
        assert report["source"].endswith("net/part.yaml") and report["differences"] == []
        assert report["probes"] > 100 and report["summary"]["SEC-EC-2"]["failed"] == 0
        # compact stores have the annex's admin surfaces: its live checks run in the part's store, and pass
        assert "inside konbini-" in report["annex_note"], report["annex_note"]
        assert out.returncode == 0 and report["ok"], [r for r in report["requirements"] if r["status"] != "pass"]


def test_node_processes_are_one_a_namespace_for_a_small_part_and_shared_for_a_large_one():
    from topology.launch.netns import GROUP_ABOVE, processes_for

    assert processes_for(20) == 20 and processes_for(GROUP_ABOVE) == GROUP_ABOVE
    assert processes_for(1005) == 2 * (os.cpu_count() or 1) < 1005
    assert processes_for(8, 2) == 2 and processes_for(3, 10) == 3


@pytest.mark.skipif(not ROOT, reason="NETNS PART TEST SKIPPED: it needs root, iproute2 and nftables")
def test_a_socket_made_in_namespace_stays_there_and_the_thread_comes_back():
    import errno
    import socket

    from topology.netns.enter import in_namespace

    ns, addr = f"konbini-t{os.getpid()}-enter", "198.18.255.1"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "addr", "add", f"{addr}/32", "dev", "lo"], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        with in_namespace(ns):
            inside = socket.create_server((addr, 0))
        try:
            with pytest.raises(OSError) as outside:  # back home: the address is only in the namespace
                socket.create_server((addr, 0)).close()
            assert outside.value.errno == errno.EADDRNOTAVAIL
            with in_namespace(ns):
                client = socket.create_connection(inside.getsockname(), timeout=5)
            conn, _ = inside.accept()  # the listener made in the namespace listens there still
            conn.close()
            client.close()
        finally:
            inside.close()
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def test_the_allowed_pairs_are_reachabilitys_allowed_entries_in_its_order(national):
    """The kernel rulesets and the Kubernetes NetworkPolicies list the allowed pairs from the allow
    entries (linear) instead of the whole matrix (quadratic: 7.2 million pairs for 999 stores, 34
    billion for the national file); they must be the same rows."""
    from topology.policy.compiler import (
        admin_reachability,
        allowed_admin_reachability,
        allowed_reachability,
        reachability,
    )

    shipped = [load_topology(str(p)) for p in Path(NATIONAL).parent.glob("*.yaml") if p.name != "national.yaml"]
    for topo in [*shipped, part(national, ["store-c0000[1-4]", "lgwan-00[0-2]*"])[0]]:
        assert allowed_reachability(topo) == [r for r in reachability(topo) if r.allowed], topo.source
        assert allowed_admin_reachability(topo) == [r for r in admin_reachability(topo) if r.allowed], topo.source
    assert any(allowed_admin_reachability(t) for t in shipped)  # admin surfaces compared too, not only empty lists
