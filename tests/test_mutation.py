"""Mutation testing of the policy: every single-rule mutation of the default topology's compiled
policy is caught by the check (100 % required)."""

from __future__ import annotations

from topology.check.matrix import check_matrix
from topology.check.mutate import mutants, run_mutations
from topology.policy.compiler import compile_admin_allowlists, compile_allowlists


def test_the_unmutated_policy_matches_its_matrix(topo) -> None:
    assert all(r.ok for r in check_matrix(topo, compile_allowlists(topo), compile_admin_allowlists(topo)))


def test_every_single_rule_mutation_of_the_default_policy_is_caught(topo) -> None:
    result = run_mutations(topo)
    assert result["survivors"] == [] and result["score"] == 100.0
    assert set(result["by_kind"]) == {"allow-removed", "forbidden-allowed", "port-shifted"}
    assert result["mutants"] == sum(1 for _ in mutants(topo)) > 800


def test_live_accept_rules_are_read_from_an_nft_listing(topo) -> None:
    """`policy mutate --netns` finds each allow entry's accept rule and its handle in `nft -a list table`
    (a saved listing of store-a1); the established/related and anti-spoofing rules are not among them."""
    from pathlib import Path

    from topology.check.mutate import _accept_rules
    from topology.policy.nft import compile_ruleset

    listing = (Path(__file__).parent / "data" / "nft-store-a1.txt").read_text()
    rules = _accept_rules("store-a1", listing)
    compiled = sum("ct state new" in line for line in compile_ruleset(topo, "store-a1").splitlines())
    assert len(rules) == compiled == 17
    assert [r.chain for r in rules].count("input") == 9 and [r.chain for r in rules].count("output") == 8
    first = rules[0]
    assert (first.chain, first.handle, first.src_ip, first.dst_ip, first.port) == (
        "input",
        13,
        "198.18.11.11",
        "198.18.11.1",
        8443,
    )
    assert first.comment == "nodes.store-router-a1.allow[0]: kiosk-a1-1 -> store-router-a1"
    assert len({r.handle for r in rules}) == 17


def test_policy_mutate_netns_needs_a_running_netns_topology() -> None:
    import subprocess
    import sys
    from pathlib import Path

    konbini = str(Path(sys.executable).parent / "konbini")
    out = subprocess.run(
        [konbini, "policy", "mutate", "--netns", "--tag", "nosuchtag"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.startswith("konbini: ") and ("konbini-nosuchtag-" in out.stderr or "needs root" in out.stderr)
