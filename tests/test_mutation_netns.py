"""Mutation testing of the kernel policy (root): every allow entry's accept rule of every namespace
of the running default topology dropped in turn, and `policy check --netns`'s probes see each one.

Its own netns topology (namespaces `konbini-m<pid>-*`), torn down at the end whatever happens.
"""

from __future__ import annotations

import os
import time

import pytest

from tests.test_netns import needs_root, netns_running
from topology.check.mutate import run_nft_mutations
from topology.netns.plan import MONITORING_SITE
from topology.policy.nft import compile_ruleset

TAG = f"m{os.getpid()}"


@pytest.fixture(scope="module")
def netns_up(tmp_path_factory, topo):
    yield from netns_running(topo, TAG, tmp_path_factory.mktemp("konbini-mutate"))


@needs_root
def test_every_dropped_nft_accept_rule_is_caught_and_restored(netns_up, topo) -> None:
    plan, _ = netns_up
    t0 = time.monotonic()
    live = run_nft_mutations(topo, plan, timeout=0.3)
    elapsed = time.monotonic() - t0
    rows = live["mutants"]
    compiled = sum(
        "ct state new" in line
        for site in [*plan.sites, MONITORING_SITE]
        for line in compile_ruleset(topo, site, plan).splitlines()
    )
    assert len(rows) == compiled > 150  # every accept rule of every namespace, none skipped
    survivors = [r["description"] for r in rows if r["differences"] == 0]
    assert survivors == [], survivors  # 100 % nft-rule-dropped
    # each difference is on the connection the dropped rule accepts, not a flaky probe elsewhere
    assert live["unexplained"] == 0, [r for r in rows if r["unexplained"]]
    assert live["reruns"] <= 5, [
        r for r in rows if r["attempts"] > 1
    ]  # a rerun now and then on a busy machine, not a habit
    assert all(r["restored"] for r in rows) and live["before_ok"] and live["after_ok"], live["after_differences"]
    assert {r["chain"] for r in rows} == {"input", "output"}  # output rules too: seen through the senders' own stacks
    print(f"\n{len(rows)} mutants in {elapsed:.0f} s")  # a figure, not a bound: the machine is shared
