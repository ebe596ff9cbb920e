"""The admin and maintenance surfaces (SEC-ST-3/KI-6, SEC-KI-4) and the annex's live checks,
against the running default topology."""

from __future__ import annotations

import json

import pytest

from gateway.nodes.kiosk_maintenance import LoginLimiter, MaintenanceCredentials
from topology.check import annex
from topology.policy.compiler import DENY_IDENTITY, compile_admin_allowlists
from topology.spec.load import DEFAULT_TOPOLOGY, check_file


def test_password_is_stored_only_as_an_scrypt_hash(tmp_path) -> None:
    creds = MaintenanceCredentials.ensure(tmp_path)
    password = (tmp_path / "maintenance" / "password").read_text().strip()
    stored = (tmp_path / "maintenance" / "credentials.json").read_text()
    assert json.loads(stored)["kdf"] == "scrypt" and password not in stored
    assert creds.matches(password) and not creds.matches(password + "x")
    assert (tmp_path / "maintenance" / "password").stat().st_mode & 0o077 == 0


def test_the_credentials_are_read_once_a_process_and_again_when_their_file_changes(tmp_path) -> None:
    """A national node process starts 4,000 kiosks' maintenance endpoints: each read the file."""
    first = MaintenanceCredentials.ensure(tmp_path)
    assert MaintenanceCredentials.ensure(tmp_path) is first  # not read again
    path = tmp_path / "maintenance" / "credentials.json"
    other = MaintenanceCredentials.of("another password")
    data = {**json.loads(path.read_text()), "salt": other.salt.hex(), "digest": other.digest.hex()}
    (tmp_path / "new.json").write_text(json.dumps(data))
    (tmp_path / "new.json").replace(path)  # another inode: replaced, as _create writes it
    again = MaintenanceCredentials.ensure(tmp_path)
    assert again.matches("another password") and not first.matches("another password")


def test_login_limiter_locks_out_after_the_limit_and_lets_go_after_the_lockout() -> None:
    lim = LoginLimiter(max_failures=3, window=10, lockout=5)
    for t in (0, 1, 2):
        assert lim.retry_after("k", t) == 0
        lim.failed("k", t)
    assert lim.retry_after("k", 3) == pytest.approx(4)
    assert lim.retry_after("k", 7.5) == 0


def test_store_staff_and_node_certificates_never_pass_the_admin_allow_list(topo) -> None:
    lists = compile_admin_allowlists(topo)
    ctl, kiosk = lists["store-controller-a1"], lists["kiosk-a1-1"]
    console = topo.node("store-controller-a1").address
    assert ctl.check_request("operator", "PUT", "/admin/config").allowed
    assert ctl.check_request("store-staff", "GET", "/admin/kiosks").reason == "principal-not-allowed"
    assert ctl.check_identity(console, "kiosk-a1-1") == DENY_IDENTITY
    assert not ctl.check_address(topo.node("wifi-a1").address).allowed
    assert kiosk.check_request("operator", "POST", "/maintenance/login").reason == "principal-not-allowed"
    assert (
        kiosk.check_address(topo.node("store-controller-a2").address).reason == "peer-address"
    )  # another store's console


def test_an_admin_rule_naming_store_staff_is_refused_at_load(tmp_path, topo) -> None:
    text = DEFAULT_TOPOLOGY.read_text().replace(
        "{principals: [operator], at: [store-controller-a2]", "{principals: [store-staff], at: [store-controller-a2]"
    )
    path = tmp_path / "t.yaml"
    path.write_text(text)
    problems = check_file(path)
    assert [p.rule for p in problems] == ["SEC-ST-3/KI-6"]
    assert problems[0].field == "nodes.store-controller-a2.admin[0].principals[0]"


async def test_admin_api_admits_the_operator_and_refuses_store_staff_counted(net) -> None:
    checks = await annex.check_admin_principals(net)
    assert all(c.ok for c in checks), [c.observed for c in checks]
    staff = next(c for c in checks if "as store-staff" in c.check and "admin API" in c.check)
    assert staff.numbers["denials_counted"] >= 4
    assert net.admin_servers["store-controller-a1"].denials["principal-not-allowed"] >= 4


async def test_maintenance_logins_are_rate_limited_even_for_the_right_password(net) -> None:
    c = await annex.check_maintenance_logins(net)
    assert c.ok, c.observed
    assert c.numbers["counted"] == {"ok": 1, "bad-credentials": 5, "rate-limited": 2}


async def test_no_card_signature_no_document(net) -> None:
    c = await annex.check_no_card_signature(net)
    assert c.ok and c.numbers["refused"] == 3, c.observed


async def test_spool_erased_and_logs_hold_no_personal_data(net) -> None:
    assert (await annex.check_spool_erase(net, 2)).ok
    c = await annex.check_logs_hold_no_personal_data(net)
    assert c.ok and c.numbers["entries"] > 0, c.observed


def test_the_log_scan_finds_planted_personal_data() -> None:
    lines = [
        '{"time":"t","event":"x","note":"123456789012"}',
        '{"time":"t","pin":"1234"}',
        '{"time":"t","who":"Yamada Taro"}',
        '{"time":"t","event":"printed","issuance":"ab12cd"}',
    ]
    found = annex.scan_for_personal_data(lines, {"Yamada Taro"}, {"1234"})
    assert {f.split(":")[0] for f in found} == {"line 1", "line 2", "line 3"}


async def test_a_fault_reaches_both_receivers_and_a_silent_kiosk_is_reported_in_bound(net) -> None:
    assert (await annex.check_fault_fan_out(net)).ok
    c = await annex.check_silent_kiosk(net, short=1.0)
    assert c.ok, c.observed
    assert c.numbers["configured_bound_s"] == 30.0 and c.numbers["controller_silent_for_s"] <= 1.5
    assert net.app("store-controller-a1").monitor.limit == 30.0  # restored


async def test_a_topology_without_admin_surfaces_still_gets_every_check_it_allows(topo, state, nursery) -> None:
    """Issue #28: on a topology whose stores have no admin surfaces, the checks that need none
    (SEC-KI-1, KI-2, KI-5) run and pass; only those that need one say NOT RUN, and why."""
    import msgspec

    from gateway.business.clock import Clock
    from tests.conftest import TEST_TIME
    from topology.launch.loopback import run_topology

    bare = {k: msgspec.structs.replace(n, admin_port=None, admin=()) for k, n in topo.nodes.items()}
    topo = msgspec.structs.replace(topo, nodes=bare)
    running = await nursery.start(
        lambda task_status: run_topology(topo, state, clock=Clock(TEST_TIME), task_status=task_status)
    )
    checks = await annex.run_annex_checks(running)
    running.stop()
    by_req = {}
    for c in checks:
        by_req.setdefault(c["requirement"], []).append(c)
    for req in ("SEC-KI-1", "SEC-KI-2", "SEC-KI-5"):
        assert all(c["ok"] for c in by_req[req]), by_req[req]
    for req in ("SEC-ST-3/KI-6", "SEC-KI-4", "SEC-KI-7", "SEC-KI-8"):
        assert [c["observed"][:8] for c in by_req[req]] == ["NOT RUN:"], by_req[req]
