"""Live evidence for the kiosk and store items of the security annex (DESIGN §2), each against a
running topology (`topology.launch.loopback.Running`), never against code:

- SEC-KI-1      an issuance with no card signature, and one with a forged one: refused, no document;
- SEC-ST-3/KI-6 the admin API called as the operator (allowed) and as store staff (refused with
                `principal-not-allowed`, counted in the node's `denials`); store staff and the
                operator at a kiosk's maintenance endpoint: refused likewise;
- SEC-KI-4      maintenance logins: the right password, then wrong ones past the rate limit, then
                the right one again while locked out (still refused);
- SEC-KI-2      issuances, then the spool checked on disk and the erase found in the kiosk log;
- SEC-KI-5      every kiosk log scanned for card-number patterns, the emulated cards' names, PINs
                and the maintenance password;
- SEC-KI-7      a fault reported by a kiosk, observed at the store register and the maintenance
                center (through the admin API);
- SEC-KI-8      a kiosk's heartbeats stopped, the controller's silence report timed under a short
                bound set through the admin API (the configured one is restored afterwards).
Every result: requirement, check, expected, observed, ok, the tool that observed it, numbers.

Netns mode runs the same checks as `ip netns exec <store namespace> python -m topology.check.annex`
against the nodehosts (`RemoteRun`): every check starts from the store's namespace, where the
kiosks and the store console live. The servers' counters are in other processes there; the
caller reads them through the monitoring namespace's scrape (topology/check/live.py).
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import secrets
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import trio
from cryptography.x509.oid import NameOID

from gateway.business import rules
from gateway.business.clock import JST, Clock
from gateway.node.server import NodeContext, NodeServer, connect_h2
from gateway.nodes.kiosk_maintenance import password_path
from gateway.protocol.h2trio import TrioH2
from gateway.protocol.http import request_headers
from gateway.protocol.messages import IssueRequest
from gateway.protocol.streams import header
from gateway.transport.tls import client_context
from kiosk_emu.card import DEFAULT_PIN, CardStore
from kiosk_emu.kiosk import Kiosk, issue_at
from topology.launch.loopback import run_topology
from topology.pki import PKI
from topology.spec.evidence import (
    EVIDENCE_CERTIFICATE,
    NotCheckable,
    evidence_municipality,
    evidence_site,
    first_store,
    monitored_store,
)
from topology.spec.load import load_topology
from topology.spec.model import Mode, Topology

TOOL = "konbini annex (h2 + mTLS client, topology/check/annex.py)"
SHORT_SILENCE_LIMIT = 1.5  # seconds: the bound the SEC-KI-8 check sets, instead of waiting 30 s
CALL_TIMEOUT = 10.0
LOCKOUT_WAIT = 65.0  # seconds the SEC-KI-4 check waits out a lockout an earlier run left (the limiter's is 60 s)


@dataclass
class AnnexCheck:
    requirement: str
    check: str
    expected: str
    observed: str
    ok: bool
    tool: str = TOOL
    numbers: dict = field(default_factory=dict)


# -- clients ---------------------------------------------------------------------------------------


async def open_as_principal(running, principal: str, console: str, dst: str) -> TrioH2:
    """An h2 connection to `dst`'s admin port with `principal`'s certificate, from `console`'s address."""
    topo, pki, mode = running.topo, running.pki, running.mode
    chain, key = pki.principal_paths(principal)
    tls = client_context(Path(chain), Path(key), Path(pki.network_ca_path), topo.tls_min_version == "1.2")
    node = topo.node(dst)
    return await connect_h2(
        node.address_in(mode), node.admin_port or 0, dst, tls, local_address=topo.node(console).address_in(mode)
    )


async def call(conn: TrioH2, authority: str, method: str, path: str, body: object = None, extra=()) -> tuple[int, dict]:
    """One request with an optional JSON body: (status, decoded JSON answer or {})."""
    data = None if body is None else json.dumps(body).encode()
    stream = await conn.open_stream(request_headers(method, path, authority, list(extra)), end_stream=data is None)
    try:
        if data is not None:
            await stream.send_data(data, end_stream=True)
        headers = await stream.receive_headers()
        raw = await stream.read_body()
    finally:
        conn.release(stream)
    try:
        answer = json.loads(raw) if raw else {}
    except ValueError:
        answer = {}
    return int(header(headers, b":status") or 0), answer


class Session:
    """A running h2 connection for a few calls: `async with Session(conn, dst) as s: await s(...)`."""

    def __init__(self, opener, authority: str) -> None:
        self.opener, self.authority = opener, authority

    async def __aenter__(self):
        self.conn = await self.opener
        self._nursery_cm = trio.open_nursery()
        nursery = await self._nursery_cm.__aenter__()
        nursery.start_soon(self.conn.run)
        return self

    async def __aexit__(self, *exc):
        self.conn.close()
        return await self._nursery_cm.__aexit__(*exc)

    async def __call__(self, method: str, path: str, body: object = None, extra=()) -> tuple[int, dict]:
        with trio.fail_after(CALL_TIMEOUT):
            return await call(self.conn, self.authority, method, path, body, extra)


def _kiosks_at(topo: Topology) -> list[str]:
    site = evidence_site(topo)
    return [k.id for k in topo.of_kind("kiosk") if k.site == site]


def _denials(server: NodeServer | None, reason: str) -> int:
    return server.denials[reason] if server is not None else 0


# -- the checks ------------------------------------------------------------------------------------


async def check_no_card_signature(running) -> AnnexCheck:
    """SEC-KI-1: a kiosk asks for a document without the card's signature over the challenge."""
    topo = running.topo
    kiosk_id = _kiosks_at(topo)[0]
    kiosk = Kiosk(running.context(kiosk_id), running.state_dir)
    card = running.cards.ensure_pool(1)[0]
    seen = []
    async with Session(kiosk.connect(), kiosk.router.id) as s:
        request = {"municipality": next(iter(topo.municipalities())), "cert_type": "residence-record"}
        _, ch = await s("POST", "/v1/session", {})
        status, answer = await s("POST", f"/v1/session/{ch.get('session')}/issue", request)
        seen.append(("issue, no authentication", status, answer.get("reason")))
        _, ch = await s("POST", "/v1/session", {})
        forged = {
            "certificate": base64.b64encode(card.certificate_der).decode(),
            "signature": base64.b64encode(b"\0" * 256).decode(),
        }
        status, answer = await s("POST", f"/v1/session/{ch.get('session')}/auth", forged)
        seen.append(("auth, forged signature", status, answer.get("reason")))
        status, answer = await s("POST", f"/v1/session/{ch.get('session')}/issue", request)
        seen.append(("issue after failed authentication", status, answer.get("reason")))
    ok = all(st in (400, 401, 403, 409) for _, st, _ in seen)
    return AnnexCheck(
        "SEC-KI-1",
        "issuance without card authentication",
        "every step refused (4xx), no document",
        "; ".join(f"{what}: {st} {reason}" for what, st, reason in seen),
        ok,
        numbers={"attempts": len(seen), "refused": sum(st >= 400 for _, st, _ in seen)},
    )


ADMIN_CALLS = (
    ("GET", "/admin/kiosks", None),
    ("GET", "/admin/config", None),
    ("PUT", "/admin/config", "same"),
    ("POST", "/admin/kiosks/{kiosk}/restart", None),
)


async def check_admin_principals(running) -> list[AnnexCheck]:
    """SEC-ST-3/KI-6: the operator may operate the store controller; store staff may not, nor any
    principal but maintenance staff a kiosk's maintenance endpoint."""
    ctl, ctl_console, kiosk, kiosk_console = first_store(running.topo)
    server = running.admin_servers.get(ctl)
    out = []
    for principal, want in (("operator", "allowed"), ("store-staff", "refused")):
        before = _denials(server, "principal-not-allowed")
        seen = []
        async with Session(open_as_principal(running, principal, ctl_console, ctl), ctl) as s:
            limit = (await s("GET", "/admin/config"))[1].get("silence_limit")
            for method, path, body in ADMIN_CALLS:
                status, answer = await s(method, path.format(kiosk=kiosk), {"silence_limit": limit} if body else None)
                seen.append((f"{method} {path.format(kiosk=kiosk)}", status, answer.get("reason")))
        counted = _denials(server, "principal-not-allowed") - before
        if want == "allowed":
            ok = all(200 <= st < 300 for _, st, _ in seen)
        else:
            ok = all(st == 403 and r == "principal-not-allowed" for _, st, r in seen) and (
                server is None or counted >= len(seen)
            )
        out.append(
            AnnexCheck(
                "SEC-ST-3/KI-6",
                f"store controller admin API as {principal} (at {ctl_console})",
                "2xx on every call" if want == "allowed" else "403 principal-not-allowed on every call, each counted",
                "; ".join(f"{what}: {st}{' ' + r if r else ''}" for what, st, r in seen),
                ok,
                numbers={"calls": len(seen), "denials_counted": counted},
            )
        )
    kserver = running.admin_servers.get(kiosk)
    for principal in ("store-staff", "operator"):
        before = _denials(kserver, "principal-not-allowed")
        async with Session(open_as_principal(running, principal, kiosk_console, kiosk), kiosk) as s:
            status, answer = await s("POST", "/maintenance/login", {"password": "x"})
        counted = _denials(kserver, "principal-not-allowed") - before
        out.append(
            AnnexCheck(
                "SEC-ST-3/KI-6",
                f"kiosk {kiosk} maintenance endpoint as {principal}",
                "403 principal-not-allowed"
                + (", counted" if kserver is not None else " (its counter is in the node's process)"),
                f"POST /maintenance/login: {status} {answer.get('reason')}; denials counted {counted}",
                status == 403 and answer.get("reason") == "principal-not-allowed" and (kserver is None or counted == 1),
                numbers={"denials_counted": counted},
            )
        )
    return out


async def check_maintenance_logins(running) -> AnnexCheck:
    """SEC-KI-4: right password, wrong ones past the limit, the right one while locked out."""
    _, _, kiosk, console = first_store(running.topo)
    password = password_path(running.state_dir).read_text().strip()
    server = running.admin_servers.get(kiosk)
    app = getattr(server, "app", None)
    limit = app.limiter.max_failures if app is not None else 5
    seen: list[tuple[str, int, str | None]] = []
    waited = 0.0
    async with Session(open_as_principal(running, "maintenance", console, kiosk), kiosk) as s:
        status, answer = await s("POST", "/maintenance/login", {"password": password})
        if status == 429 and answer.get("reason") == "rate-limited":  # an earlier run's lockout (netns nodes live on)
            t0 = time.perf_counter()
            with trio.move_on_after(LOCKOUT_WAIT):
                while status == 429:
                    await trio.sleep(1.0)
                    status, answer = await s("POST", "/maintenance/login", {"password": password})
            waited = round(time.perf_counter() - t0, 1)
        seen.append(("right", status, answer.get("reason")))
        token = answer.get("token", "")
        status, answer = await s("GET", "/maintenance/status", extra=[(b"authorization", f"Bearer {token}".encode())])
        seen.append(("status with token", status, answer.get("reason")))
        status, answer = await s("GET", "/maintenance/status")
        seen.append(("status without token", status, answer.get("reason")))
        for _ in range(limit + 1):
            status, answer = await s("POST", "/maintenance/login", {"password": secrets.token_urlsafe(12)})
            seen.append(("wrong", status, answer.get("reason")))
        status, answer = await s("POST", "/maintenance/login", {"password": password})
        seen.append(("right, while locked out", status, answer.get("reason")))
    statuses = [st for _, st, _ in seen]
    want = [200, 200, 401, *([401] * limit), 429, 429]
    counts = dict(app.attempts) if app is not None else {}
    return AnnexCheck(
        "SEC-KI-4",
        f"maintenance logins at {kiosk} (maintenance principal, at {console})",
        f"right 200, status 200 with token / 401 without, {limit} wrong 401, then 429 even for the right password",
        " ".join(f"{what}:{st}" for what, st, _ in seen),
        statuses == want,
        numbers={
            "attempts": sum(1 for w, _, _ in seen if w not in ("status with token", "status without token")),
            "rate_limit": limit,
            "lockout_s": app.limiter.lockout if app is not None else None,
            "counted": counts,
            "kdf": "scrypt n=2^14 r=8 p=1",
            "waited_for_earlier_lockout_s": waited,
        },
    )


async def check_spool_erase(running, n: int = 3) -> AnnexCheck:
    """SEC-KI-2: issuances, then the spool on disk and the kiosk log."""
    topo = running.topo
    kiosk_id = _kiosks_at(topo)[-1]  # the store's other kiosk, where it has two
    cards = running.cards.ensure_pool(n)
    muni = evidence_municipality(topo)
    issued, erased_logged, left = [], 0, []
    for card in cards:
        r = await issue_at(running, kiosk_id, card, DEFAULT_PIN, IssueRequest(muni, EVIDENCE_CERTIFICATE))
        if r.status == "issued":
            issued.append(r.issuance_id)
    spool = running.state_dir / "spool" / kiosk_id
    left = sorted(p.name for p in spool.iterdir()) if spool.exists() else []
    log_path = running.state_dir / "kiosk-logs" / f"{kiosk_id}.jsonl"
    events = [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.exists() else []
    for iid in issued:
        erased_logged += any(
            e.get("issuance") == iid and e.get("event") == "spool-erased" and e.get("erased") is True for e in events
        )
    ok = len(issued) == n and erased_logged == n and not left
    return AnnexCheck(
        "SEC-KI-2",
        f"{n} issuances at {kiosk_id}, then the spool and the log",
        f"{n} issued; spool directory empty; {n} 'spool-erased' entries with erased=true",
        f"{len(issued)} issued; spool holds {len(left)} files; {erased_logged} erase entries",
        ok,
        numbers={"issuances": len(issued), "spool_files_left": len(left), "erase_entries": erased_logged},
    )


_CARD_NUMBER = re.compile(r"(?<![0-9a-fA-F])\d{12}(?![0-9a-fA-F])")  # My Number: 12 digits
_PAN = re.compile(r"(?<![0-9a-fA-F])(?:\d[ -]?){13,19}(?![0-9a-fA-F])")  # payment-card-like numbers
_PERSONAL_KEYS = re.compile(r"pin|name|address|birth|number|password", re.I)


def _card_names(running) -> set[str]:
    names = set()
    for card_id in running.cards.list():
        cert = running.cards.load(card_id).certificate
        for oid in (NameOID.COMMON_NAME, NameOID.GIVEN_NAME, NameOID.SURNAME, NameOID.PSEUDONYM):
            names |= {str(a.value) for a in cert.subject.get_attributes_for_oid(oid)}
    return {n for n in names if len(n) >= 3}


def scan_for_personal_data(lines: list[str], names: set[str], secrets_: set[str]) -> list[str]:
    """What in these log lines looks like personal data: numbers shaped like a My Number or a card
    number, a card holder's name, a PIN or password value, a field named for personal data."""
    found = []
    for i, line in enumerate(lines):
        for pattern, what in ((_CARD_NUMBER, "12-digit number"), (_PAN, "card-number pattern")):
            if pattern.search(line):
                found.append(f"line {i + 1}: {what}")
        try:
            entry = json.loads(line)
        except ValueError:
            found.append(f"line {i + 1}: not JSON")
            continue
        stack = [entry]
        while stack:
            value = stack.pop()
            if isinstance(value, dict):
                found += [f"line {i + 1}: field {k!r}" for k in value if _PERSONAL_KEYS.search(k)]
                stack += list(value.values())
            elif isinstance(value, list):
                stack += value
            elif str(value) in secrets_:
                found.append(f"line {i + 1}: a PIN or password value")
            elif isinstance(value, str) and any(n in value for n in names):
                found.append(f"line {i + 1}: a card holder's name")
    return found


async def check_logs_hold_no_personal_data(running) -> AnnexCheck:
    """SEC-KI-5: the issuance logs exist, carry date/time, and hold nothing personal."""
    logs = sorted((running.state_dir / "kiosk-logs").glob("*.jsonl"))
    lines = [line for p in logs for line in p.read_text().splitlines()]
    names = _card_names(running)
    pw = password_path(running.state_dir)
    hidden = {DEFAULT_PIN, *([pw.read_text().strip()] if pw.exists() else [])}
    found = scan_for_personal_data(lines, names, hidden)
    timed = sum(1 for line in lines if '"time":' in line)
    ok = bool(lines) and timed == len(lines) and not found
    return AnnexCheck(
        "SEC-KI-5",
        f"{len(logs)} kiosk logs scanned for personal data",
        "entries with date/time; no card numbers, names, PINs or passwords",
        f"{len(lines)} entries, {timed} with time; {len(found)} findings"
        + (f": {'; '.join(found[:5])}" if found else ""),
        ok,
        numbers={"logs": len(logs), "entries": len(lines), "names_searched": len(names), "findings": len(found)},
    )


async def check_fault_fan_out(running) -> AnnexCheck:
    """SEC-KI-7: a kiosk reports a fault; both receivers have it."""
    ctl, console, kiosk_id = monitored_store(running.topo)
    code = f"printer-jam-{secrets.token_hex(3)}"
    t0 = time.perf_counter()
    attempts = await Kiosk(running.context(kiosk_id), running.state_dir).report_fault(code)
    got: dict[str, float] = {}
    async with Session(open_as_principal(running, "operator", console, ctl), ctl) as s:
        with trio.move_on_after(5):
            while len(got) < 2:
                _, faults = await s("GET", "/admin/faults")
                for sink in ("register", "maintenance"):
                    if sink not in got and any(code in str(f.get("fault")) for f in faults.get(sink, ())):
                        got[sink] = round((time.perf_counter() - t0) * 1000, 1)
                await trio.sleep(0.02)
    return AnnexCheck(
        "SEC-KI-7",
        f"fault {code!r} from {kiosk_id}",
        "arrives at the store register and the maintenance center",
        ", ".join(f"{k} after {v} ms" for k, v in got.items()) or "arrived nowhere",
        len(got) == 2,
        numbers={"attempts": attempts, "ms": got},
    )


async def check_silent_kiosk(running, short: float = SHORT_SILENCE_LIMIT) -> AnnexCheck:
    """SEC-KI-8: heartbeats stop; the controller's report is timed under a short bound."""
    ctl, console, kiosk_id = monitored_store(running.topo)
    kiosk = Kiosk(running.context(kiosk_id), running.state_dir)
    async with Session(open_as_principal(running, "operator", console, ctl), ctl) as s:
        configured = (await s("GET", "/admin/config"))[1].get("silence_limit")
        await s("PUT", "/admin/config", {"silence_limit": short})
        reports_before = len((await s("GET", "/admin/kiosks"))[1].get("silence_reports", []))
        measured = report = None
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(kiosk.run_heartbeat, 0.2)
                with trio.move_on_after(5):  # until the controller sees this kiosk alive
                    while not any(
                        k["kiosk"] == kiosk_id and not k["silent"]
                        for k in (await s("GET", "/admin/kiosks"))[1]["kiosks"]
                    ):
                        await trio.sleep(0.05)
                await trio.sleep(0.5)
                nursery.cancel_scope.cancel()  # the kiosk falls silent
            stopped = time.perf_counter()
            with trio.move_on_after(short + 5):
                while report is None:
                    reports = (await s("GET", "/admin/kiosks"))[1].get("silence_reports", [])[reports_before:]
                    report = next((r for r in reports if r["kiosk"] == kiosk_id), None)
                    if report is None:
                        await trio.sleep(0.05)
                measured = round(time.perf_counter() - stopped, 3)
        finally:
            await s("PUT", "/admin/config", {"silence_limit": configured})
    silent_for = report["silent_for_s"] if report else None
    ok = report is not None and silent_for <= short + 0.5 and measured <= short + 1.0
    return AnnexCheck(
        "SEC-KI-8",
        f"{kiosk_id}'s heartbeats stopped (every 0.2 s before)",
        f"reported within the bound: configured {configured} s; this check set {short} s through PUT /admin/config",
        (
            f"reported {silent_for} s after its last heartbeat (controller), {measured} s after the check stopped it"
            if report
            else "never reported"
        ),
        ok,
        numbers={
            "configured_bound_s": configured,
            "test_bound_s": short,
            "controller_silent_for_s": silent_for,
            "measured_s": measured,
        },
    )


# in an order that leaves each its own evidence; the log scan last: it scans what the others logged
ANNEX_CHECKS = (
    ("SEC-KI-1", check_no_card_signature),
    ("SEC-ST-3/KI-6", check_admin_principals),
    ("SEC-KI-4", check_maintenance_logins),
    ("SEC-KI-2", check_spool_erase),
    ("SEC-KI-7", check_fault_fan_out),
    ("SEC-KI-8", check_silent_kiosk),
    ("SEC-KI-5", check_logs_hold_no_personal_data),
)


# the checks that issue documents, so need the service open at the nodes' time (BIZ-1)
NEEDS_OPEN_HOURS = frozenset({"SEC-KI-2"})


def closed_at(topo: Topology, now: datetime) -> str | None:
    """Why the issuing checks would be refused at `now` (the service closed), or None when open."""
    try:
        node = topo.municipalities()[evidence_municipality(topo)]
    except NotCheckable:
        return None  # the check itself says so
    refused = rules.refusal(now, topo.service_hours, node.municipality, EVIDENCE_CERTIFICATE, 1)
    return refused[1].get("hours", refused[0]) if refused and refused[0] == "outside-hours" else None


def open_time(topo: Topology, now: datetime) -> datetime | None:
    """The first time from the start of `now`'s day at which the issuing checks are served."""
    try:
        node = topo.municipalities()[evidence_municipality(topo)]
    except NotCheckable:
        return None
    day = now.astimezone(JST).replace(hour=0, minute=0, second=0, microsecond=0)
    return rules.next_open(day, topo.service_hours, node.municipality, EVIDENCE_CERTIFICATE)


async def run_annex_checks(
    running, only: frozenset[str] | None = None, skip: frozenset[str] = frozenset()
) -> list[dict]:
    """Every live check above against `running` (or those `only` names, less those in `skip`). One
    the topology cannot support (e.g. no store with an admin API) is a failed NOT RUN item, never a
    crash or a pass; the others still run."""
    out: list[AnnexCheck] = []
    for requirement, check in ANNEX_CHECKS:
        if requirement in skip or (only is not None and requirement not in only):
            continue
        try:
            got = await check(running)
        except NotCheckable as exc:
            what = " ".join(check.__doc__.split(":", 1)[1].split()).rstrip(".") if check.__doc__ else check.__name__
            out.append(AnnexCheck(requirement, what, "checked against the running topology", f"NOT RUN: {exc}", False))
            continue
        out += got if isinstance(got, list) else [got]
    return [asdict(c) for c in out]


# -- netns mode: the checks from the store's namespace, against the nodehosts ----------------------


@dataclass
class RemoteRun:
    """What the checks need of a running topology when its servers live in other processes
    (netns mode): no server objects, so counters are not read here."""

    topo: Topology
    state_dir: Path
    pki: PKI
    cards: CardStore
    clock: Clock
    mode: Mode = Mode.NETNS
    servers: dict = field(default_factory=dict)
    admin_servers: dict = field(default_factory=dict)

    def context(self, node_id: str) -> NodeContext:
        return NodeContext(self.topo, self.topo.node(node_id), self.pki, self.mode, self.clock)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m topology.check.annex")
    p.add_argument("--topology", required=True)
    p.add_argument("--state", required=True)
    p.add_argument("--clock", help="the nodes' emulated time now (ISO), so cards and logs agree with them")
    p.add_argument("--clock-speed", type=float, default=1.0)
    p.add_argument("--only", help="these requirements' checks only (comma-separated)")
    p.add_argument("--skip", default="", help="not these requirements' checks (comma-separated)")
    p.add_argument(
        "--launch",
        action="store_true",
        help="launch the topology here first (loopback, at --clock), in a network namespace of the caller's",
    )
    args = p.parse_args(argv)
    topo = load_topology(args.topology)
    state = Path(args.state)
    pki = PKI.ensure(state, topo)
    clock = Clock.parse(args.clock, args.clock_speed)
    only = frozenset(args.only.split(",")) if args.only else None
    skip = frozenset(filter(None, args.skip.split(",")))

    async def launched():
        async with trio.open_nursery() as nursery:
            running = await nursery.start(
                lambda task_status: run_topology(topo, state, clock=clock, pki=pki, task_status=task_status)
            )
            out = await run_annex_checks(running, only, skip)
            nursery.cancel_scope.cancel()
            return out

    if args.launch:
        out = trio.run(launched)
    else:
        out = trio.run(
            run_annex_checks, RemoteRun(topo, state, pki, CardStore(state, pki, clock.now), clock), only, skip
        )
    print(json.dumps(out))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
