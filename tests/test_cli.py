"""The command line as a user meets it: one JSON object from `issue --json`, one clear line
(never a traceback) and a non-zero exit for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
    p = konbini("issue", "--up", "--pin", "0000", "--card", "pool-0219", "--clock", "2026-11-24T10:00:00+09:00", state=state)
    assert p.returncode == 1
    assert "pin-wrong" in p.stdout and "tries left" in p.stdout and "Traceback" not in p.stderr


def test_too_many_copies_says_so_with_the_limit(state):
    p = konbini("issue", "--up", "--copies", "1000", "--clock", "2026-11-24T10:00:00+09:00", state=state)
    assert p.returncode == 1 and "copies-out-of-range" in p.stdout and "1 to 10 copies" in p.stdout


def test_unknown_certificate_type_is_refused_cleanly(state):
    p = konbini("issue", "--up", "--cert", "moon-deed", "--clock", "2026-11-24T10:00:00+09:00", state=state)
    assert p.returncode == 1 and "certificate-type-not-offered" in p.stdout


def test_missing_card_is_one_clear_line(state):
    assert_one_clear_line(konbini("issue", "--up", "--card", "card-000000000000", state=state), "konbini:", "card-000000000000")


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
    p = subprocess.run([sys.executable, "-m", "topology.cli", "demo", "--state", str(tmp_path)],
                       capture_output=True, text=True, timeout=180, env={**os.environ, "COLUMNS": "80"})
    assert p.returncode == 0, p.stdout + p.stderr
    assert "…" not in p.stdout  # rich truncates cells with an ellipsis when columns do not fit
    assert "wrong PIN: expected pin-wrong, status refused, reason pin-wrong" in p.stdout
    assert "demo passed" in p.stdout
