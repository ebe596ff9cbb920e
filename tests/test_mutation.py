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
