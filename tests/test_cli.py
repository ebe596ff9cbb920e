"""The command line as a user meets it: one JSON object from `issue --json`, one clear line
(never a traceback) and a non-zero exit for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from gateway.business.clock import Clock
from tests.conftest import TEST_TIME
from topology.launch.loopback import run_topology
from topology.pki import PKI
from topology.spec.load import DEFAULT_TOPOLOGY


def konbini(*args: str, state: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "topology.cli", *args]
    if state is not None and args and args[0] in ("issue", "card"):
        cmd[3:4] = [args[0], "--state", str(state)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def assert_one_clear_line(p: subprocess.CompletedProcess, *words: str) -> None:
    assert p.returncode != 0
    assert "Traceback" not in p.stderr + p.stdout
    for w in words:
        assert w in p.stderr + p.stdout


def test_issue_up_json_prints_one_object_with_the_promised_fields(state):
    p = konbini("issue", "--up", "--json", "--clock", "2026-11-24T10:00:00+09:00", state=state)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["status"] == "issued" and out["reason"] is None and out["signature_valid"] is True
    assert out["document_bytes"] == 65536 and out["issuance_id"].startswith("iss-")
    assert {"store-router-a1", "issuance-center"} <= {h["node"] for h in out["hops"]}
    assert out["latency_ms"] > 0


def test_wrong_pin_is_one_line_with_tries_left_and_exit_1(state):
    p = konbini(
        "issue", "--up", "--pin", "0000", "--card", "pool-0219", "--clock", "2026-11-24T10:00:00+09:00", state=state
    )
    assert p.returncode == 1
    assert "pin-wrong" in p.stdout and "tries left" in p.stdout and "Traceback" not in p.stderr


def test_a_wrong_pin_on_the_default_pool_card_is_refused_as_the_readme_shows(tmp_path):
    # `konbini issue --pin 0000` typed 0000 at the kiosk and also reset the pool card's PIN to it,
    # so it issued; --pin is what the resident types, the pool card's PIN stays 1234
    p = konbini("issue", "--up", "--pin", "0000", "--clock", "2026-11-24T10:00:00+09:00", state=tmp_path)
    assert p.returncode == 1 and "pin-wrong" in p.stdout and "2 tries left" in p.stdout, p.stdout + p.stderr


def test_too_many_copies_says_so_with_the_limit(state):
    p = konbini("issue", "--up", "--copies", "1000", "--clock", "2026-11-24T10:00:00+09:00", state=state)
    assert p.returncode == 1 and "copies-out-of-range" in p.stdout and "1 to 10 copies" in p.stdout


def test_unknown_certificate_type_is_refused_cleanly(state):
    p = konbini("issue", "--up", "--cert", "moon-deed", "--clock", "2026-11-24T10:00:00+09:00", state=state)
    assert p.returncode == 1 and "certificate-type-not-offered" in p.stdout


def test_missing_card_is_one_clear_line(state):
    assert_one_clear_line(
        konbini("issue", "--up", "--card", "card-000000000000", state=state), "konbini:", "card-000000000000"
    )


def test_issue_without_a_running_topology_says_how_to_start_one(state):
    assert_one_clear_line(konbini("issue", state=state), "konbini up", "--up")


def test_bad_topology_file_is_one_line_per_problem(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(DEFAULT_TOPOLOGY.read_text().replace("upstream: store-router-a1", "upstream: store-router-zz", 1))
    p = konbini("check", str(bad))
    assert_one_clear_line(p, f"{bad}:", "store-router-zz")


def test_up_on_a_taken_address_is_one_clear_line(tmp_path, state):
    import socket

    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.18.0.2", 8443))  # the OCSP responder's address
    s.listen()
    try:
        p = konbini("up", "--state", str(state), timeout=60)
    finally:
        s.close()
    assert_one_clear_line(p, "ocsp", "127.18.0.2:8443", "taken")


@pytest.mark.parametrize("args", [["card", "new", "--pin", "12"], ["card", "unlock", "nobody-here"]])
def test_card_bad_input_is_one_clear_line(state, args):
    assert_one_clear_line(konbini(*args, state=state), "konbini:")


def test_clock_against_a_running_topology_is_said_to_apply_to_the_kiosk_only(state):
    p = konbini("issue", "--clock", "2026-11-24T10:00:00+09:00", state=state)
    assert "--clock sets this kiosk's time only" in p.stderr and "konbini up --clock" in p.stderr


def test_outside_hours_refusal_shows_the_emulated_time_and_how_to_set_it(state):
    p = konbini("issue", "--up", "--clock", "2026-11-24T23:30:00+09:00", state=state)
    assert p.returncode == 1 and "outside-hours" in p.stdout
    assert "emulated time: 2026-11-24 23:30 JST" in p.stdout and "--clock" in p.stdout


def test_demo_piped_to_a_file_prints_whole_records_not_truncated_columns(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "topology.cli", "demo", "--state", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "COLUMNS": "80"},
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert "…" not in p.stdout  # rich truncates cells with an ellipsis when columns do not fit
    assert "wrong PIN: expected pin-wrong, status refused, reason pin-wrong" in p.stdout
    assert "demo passed" in p.stdout


# -- issue #28: what a first-time user types --------------------------------------------------------


@pytest.mark.parametrize("size", ["-5", "0"])
def test_a_document_size_below_one_byte_is_refused_before_anything_is_charged(state, size):
    assert_one_clear_line(konbini("issue", "--size", size, state=state), "konbini:", f"--size {size}", "1 to")


def test_a_kiosk_outside_the_named_store_is_refused_not_silently_used(state):
    assert_one_clear_line(
        konbini("issue", "--kiosk", "kiosk-b1-1", "--store", "store-a1", state=state),
        "konbini:",
        "kiosk-b1-1 is in store store-b1, not store-a1",
    )


def test_an_unknown_store_is_called_unknown_and_the_stores_are_named(state):
    assert_one_clear_line(konbini("issue", "--store", "store-zz", state=state), "unknown store 'store-zz'", "store-a1")


def test_a_new_card_never_replaces_an_existing_one(tmp_path):
    assert konbini("card", "new", "--id", "card-twice", state=tmp_path).returncode == 0
    before = (tmp_path / "cards" / "card-twice.json").read_bytes()
    assert_one_clear_line(
        konbini("card", "new", "--id", "card-twice", "--pin", "9999", state=tmp_path),
        "konbini:",
        "card-twice",
        "already exists",
    )
    assert (tmp_path / "cards" / "card-twice.json").read_bytes() == before


def test_revoking_a_revoked_card_says_so_and_keeps_the_first_revocation(tmp_path):
    assert konbini("card", "new", "--id", "card-gone", state=tmp_path).returncode == 0
    assert konbini("card", "revoke", "card-gone", "--reason", "key-compromise", state=tmp_path).returncode == 0
    assert_one_clear_line(konbini("card", "revoke", "card-gone", state=tmp_path), "already revoked", "key-compromise")


def test_a_legacy_card_says_it_is_legacy_and_the_list_shows_what_a_kiosk_decides_on(tmp_path):
    p = konbini("card", "new", "--id", "card-old", "--legacy", state=tmp_path)
    assert p.returncode == 0 and "legacy SHA-1/RSA-1024" in p.stdout
    assert konbini("card", "new", "--id", "card-ok", state=tmp_path).returncode == 0
    listed = konbini("card", "list", state=tmp_path).stdout.splitlines()
    assert listed[0].split() == [
        "card",
        "PIN",
        "profile",
        "key",
        "certificate",
        "PIN",
        "tries",
        "left",
        "valid",
        "until",
    ]
    rows = {line.split()[0]: line.split() for line in listed[1:-1]}
    assert rows["card-old"][1:5] == ["mynumber-auth", "RSA-1024", "legacy", "legacy-profile-refused"]
    assert rows["card-ok"][1:7] == ["mynumber-auth", "RSA-2048", "valid", "3", "of", "3"]


@pytest.mark.parametrize(
    "command, option, words",
    [
        (["issue"], "--copies", ["1 to 10"]),
        (["issue"], "--cert", ["residence-record", "family-register", "vaccination"]),
        (["card", "new"], "--pin", ["4 digits"]),
        (["card", "revoke"], "--reason", ["revocation cause"]),
        (["card", "revoke"], "id", ["card list"]),
        (["settle"], "--json", ["JSON"]),
    ],
)
def test_every_option_a_user_meets_has_help(command, option, words):
    text = " ".join(
        subprocess.run(
            [sys.executable, "-m", "topology.cli", *command, "--help"],
            capture_output=True,
            text=True,
            env={**os.environ, "COLUMNS": "400"},
        ).stdout.split()
    )  # unwrapped
    described = text[text.index(option, text.index("options:" if option.startswith("-") else "positional")) :][:400]
    assert all(w in described for w in words), described


def test_a_clock_without_offset_is_japan_time(state):
    p = konbini("issue", "--up", "--clock", "2026-11-24T23:30", state=state)
    assert p.returncode == 1 and "emulated time: 2026-11-24 23:30 JST" in p.stdout


@pytest.mark.parametrize("command", [["issue", "--up"], ["settle", "--month", "2026-11"]])
def test_a_clock_that_is_not_a_time_is_one_clear_line(state, command):
    p = (
        konbini(*command, "--clock", "tomorrow", state=state)
        if command[0] == "issue"
        else konbini(*command, "--state", str(state), "--clock", "tomorrow")
    )
    assert_one_clear_line(p, "konbini: --clock 'tomorrow' is not a time")


def test_the_outside_hours_hint_names_the_next_opening_in_the_emulated_time(state):
    p = konbini("issue", "--up", "--clock", "2026-12-28T23:30", state=state)
    assert "open again 2027-01-04 10:00 JST: `konbini issue --up --clock 2027-01-04T10:00:00+09:00`" in p.stdout


def test_graph_into_a_missing_directory_is_one_clear_line(tmp_path):
    assert_one_clear_line(konbini("graph", "--out", str(tmp_path / "missing" / "g.svg")), "konbini: cannot write --out")


async def _konbini_async(*args: str) -> subprocess.CompletedProcess:
    return await trio.run_process(
        [sys.executable, "-m", "topology.cli", *args], capture_stdout=True, capture_stderr=True, check=False
    )


async def test_cards_issue_makes_are_valid_in_the_running_topologys_time(topo, tmp_path, nursery):
    """A topology up at an emulated date before today: `issue` with a fresh state makes its pool
    card in that time, not the wall clock's (which would be refused `card-not-yet-valid`)."""
    running = await nursery.start(
        lambda task_status: run_topology(topo, tmp_path, clock=Clock(TEST_TIME), task_status=task_status)
    )
    p = await _konbini_async("issue", "--state", str(tmp_path), "--json")
    running.stop()
    assert p.returncode == 0, p.stdout.decode() + p.stderr.decode()
    assert json.loads(p.stdout)["status"] == "issued"


async def test_issue_with_another_state_directorys_pki_is_one_clear_line(net, tmp_path):
    PKI.ensure(tmp_path, net.topo)
    p = await _konbini_async("issue", "--state", str(tmp_path))
    out = p.stdout.decode() + p.stderr.decode()
    assert p.returncode != 0 and "Traceback" not in out
    assert "does not trust the PKI" in out and "--state" in out
    assert not (tmp_path / "cards").exists() or not any((tmp_path / "cards").iterdir())


def test_issue_never_makes_a_pki_in_a_state_directory_without_one(tmp_path):
    assert_one_clear_line(konbini("issue", state=tmp_path), "no PKI in", "--state")
    assert not (tmp_path / "pki").exists()
