"""Card-authenticated issuance end to end through every hop, and every refusal the kiosk can show."""

from __future__ import annotations

import base64
import json
from datetime import timedelta

import msgspec
import pytest
import trio
import trio.testing
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

import gateway.nodes.center.issuing
from gateway.business import ocsp
from gateway.business.certificate import certificate, certificate_font, document_chunks
from gateway.business.clock import Clock
from gateway.protocol.http import request_headers
from gateway.protocol.messages import AuthRequest, Binding, IssueRequest
from gateway.protocol.streams import header
from kiosk_emu.flow import KioskFlow, State
from kiosk_emu.kiosk import Kiosk, issue_at
from tests.conftest import POOL, TEST_TIME
from topology.launch.loopback import run_topology

MUNI_A, MUNI_B, MUNI_C = "131016", "141003", "271004"


def pool(net, n: int = POOL):
    return net.cards.ensure_pool(n)


async def test_issuance_succeeds_end_to_end(net):
    card = pool(net, 1)[0]
    r = await issue_at(net, "kiosk-a1-1", card, "1234", IssueRequest(MUNI_A, "residence-record"))
    assert (r.status, r.reason, r.signature_valid, r.document_bytes) == ("issued", None, True, 64 * 1024)
    assert r.fee == 200
    assert {h["node"] for h in r.hops} >= {
        "store-router-a1",
        "ec-router-a",
        "dmz-relay-a",
        "issuance-center",
        "ocsp",
        "muni-a",
    }
    center = net.app("issuance-center")
    assert center.issuances[r.issuance_id].state == "completed"
    # SEC-KI-2: spool erased after printing, and the erase is in the kiosk's log (no personal data there)
    assert r.spool_erased and not list((net.state_dir / "spool" / "kiosk-a1-1").iterdir())
    events = [json.loads(line) for line in (net.state_dir / "kiosk-logs" / "kiosk-a1-1.jsonl").read_text().splitlines()]
    mine = [e for e in events if e.get("issuance") == r.issuance_id]
    assert [e["event"] for e in mine] == ["paid", "printed", "spool-erased"]
    assert mine[-1]["erased"] is True


async def test_200_concurrent_issuances_each_print_exactly_their_own_document(net):
    cards = pool(net, 200)
    kiosks = [n.id for n in net.topo.of_kind("kiosk")]
    results = []

    async def one(i: int, kiosk: Kiosk, conn) -> None:
        results.append(
            (cards[i], await kiosk.issue(conn, cards[i], "1234", IssueRequest(MUNI_A, "residence-record"), timeout=60))
        )

    async with trio.open_nursery() as nursery:
        conns = []
        for kid in kiosks:  # each kiosk keeps one connection; all 200 requests arrive nearly together
            kiosk = Kiosk(net.context(kid), net.state_dir)
            conn = await kiosk.connect()
            nursery.start_soon(conn.run)
            conns.append((kiosk, conn))
        async with trio.open_nursery() as burst:
            for i in range(200):
                burst.start_soon(one, i, *conns[i % len(conns)])
        for _, conn in conns:
            conn.close()
    center = net.app("issuance-center")
    assert [r.status for _, r in results].count("issued") == 200
    assert len({r.issuance_id for _, r in results}) == 200
    for card, r in results:
        iss = center.issuances[r.issuance_id]
        session = center.sessions.get(iss.session)
        assert (iss.kiosk, session.card, iss.state) == (r.kiosk, card.fingerprint, "completed")
    assert center.misdeliveries == []


async def test_document_bound_to_another_session_is_refused_and_reported(net, monkeypatch):
    # The Kawasaki failure: a later request overwrote an earlier one. Emulate a center that binds
    # the document to someone else's session; the kiosk must refuse it, erase it and report it.
    real = gateway.nodes.center.issuing.Binding
    monkeypatch.setattr(
        gateway.nodes.center.issuing, "Binding", lambda iid, session, *rest: real(iid, "someone-elses-session", *rest)
    )
    r = await issue_at(net, "kiosk-a2-1", pool(net, 1)[0], "1234", IssueRequest(MUNI_A, "residence-record"))
    assert (r.status, r.reason) == ("misdelivered", "bound-to-another-session")
    assert r.spool_erased and r.fee == 0
    reports = net.app("issuance-center").misdeliveries
    assert [(m.issuance_id, m.problem) for m in reports] == [(r.issuance_id, "bound-to-another-session")]


def _signed_trailers(key, binding: Binding):
    blob = msgspec.json.encode(binding)
    sig = key.sign(blob, ec.ECDSA(hashes.SHA256()))
    return [(b"konbini-binding", base64.b64encode(blob)), (b"konbini-signature", base64.b64encode(sig))]


def _certificate_of(state, card_id: str) -> bytes:
    """A municipality's certificate for the holder of `card_id`, as the kiosk receives it."""
    page = certificate(
        issuance_id="iss-1",
        cert_type="residence-record",
        card_id=card_id,
        municipality_code=MUNI_A,
        municipality_name="千代田区",
        issued_at=TEST_TIME,
        cut=certificate_font(("千代田区",), state / "fonts"),
    )
    return b"".join(document_chunks(page, "iss-1", 0))


@pytest.mark.parametrize(
    "change, problem",
    [
        ({"session": "other"}, "bound-to-another-session"),
        ({"kiosk": "kiosk-b1-1"}, "bound-to-another-session"),
        ({"card": "0" * 64}, "bound-to-another-session"),
        ({"issuance_id": "iss-other"}, "issuance-id-mismatch"),
        ({"sha256": "0" * 64}, "document-altered"),
        ({"bytes": 1}, "document-altered"),
        ({"_resident": "someone-elses-card"}, "resident-mismatch"),  # signed right, another resident on the paper
    ],
)
def test_kiosk_flow_accepts_only_a_document_bound_to_itself(state, topo, change, problem):
    from kiosk_emu.card import CardStore
    from topology.pki import PKI

    pki = PKI.ensure(state, topo)
    card = CardStore(state, pki, clock=lambda: TEST_TIME).ensure_pool(1)[0]
    key = serialization.load_pem_private_key(pki.node_paths("issuance-center")[1].read_bytes(), None)
    flow = KioskFlow("kiosk-a1-1", card, "1234", IssueRequest(MUNI_A, "residence-record"), key.public_key())
    flow.state, flow.session = State.AUTHENTICATED, "sess-1"
    assert flow.on_document_headers(200, [(b":status", b"200"), (b"konbini-issuance-id", b"iss-1")])
    doc = _certificate_of(state, card.card_id)
    other = change.pop("_resident", None)
    import hashlib

    mine = doc
    if other is not None:
        doc = _certificate_of(state, other)
    flow.on_document_chunk(doc)

    fields = dict(
        issuance_id="iss-1",
        session="sess-1",
        kiosk="kiosk-a1-1",
        card=card.fingerprint,
        sha256=hashlib.sha256(doc).hexdigest(),
        bytes=len(doc),
        cert_type="residence-record",
        copies=1,
        fee=200,
    )
    good = Binding(**fields)
    # the untouched binding is accepted (so the parametrized refusals are not vacuous)
    control = KioskFlow("kiosk-a1-1", card, "1234", flow.request, key.public_key())
    control.state, control.session = State.AUTHENTICATED, "sess-1"
    control.on_document_headers(200, [(b"konbini-issuance-id", b"iss-1")])
    control.on_document_chunk(mine)
    good = Binding(**{**fields, "sha256": hashlib.sha256(mine).hexdigest(), "bytes": len(mine)})
    assert control.on_document_end(_signed_trailers(key, good)) is None
    assert flow.on_document_end(_signed_trailers(key, Binding(**{**fields, **change}))) == problem
    assert flow.state is State.MISDELIVERED


def test_kiosk_flow_refuses_a_binding_signed_by_anyone_but_the_center(state, topo):
    from kiosk_emu.card import CardStore
    from topology.pki import PKI

    pki = PKI.ensure(state, topo)
    card = CardStore(state, pki, clock=lambda: TEST_TIME).ensure_pool(1)[0]
    center = serialization.load_pem_private_key(pki.node_paths("issuance-center")[1].read_bytes(), None)
    relay = serialization.load_pem_private_key(pki.node_paths("dmz-relay-a")[1].read_bytes(), None)
    flow = KioskFlow("kiosk-a1-1", card, "1234", IssueRequest(MUNI_A, "residence-record"), center.public_key())
    flow.state, flow.session = State.AUTHENTICATED, "s"
    flow.on_document_headers(200, [(b"konbini-issuance-id", b"i")])
    b = Binding(
        "i",
        "s",
        "kiosk-a1-1",
        card.fingerprint,
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        0,
        "x",
        1,
        1,
    )
    assert flow.on_document_end(_signed_trailers(relay, b)) == "signature-invalid"
    assert flow.on_document_end.__self__.state is State.MISDELIVERED


def test_kiosk_flow_accepts_a_binding_signed_by_a_standby_center_it_was_given(state, topo):
    """national.yaml's DMZ relays fail over to issuance-center-2 when the first is overloaded: its
    bindings were counted as misdelivered (signature-invalid) by a kiosk that knew one key only."""
    from kiosk_emu.card import CardStore
    from topology.pki import PKI

    pki = PKI.ensure(state, topo)
    card = CardStore(state, pki, clock=lambda: TEST_TIME).ensure_pool(1)[0]
    center = serialization.load_pem_private_key(pki.node_paths("issuance-center")[1].read_bytes(), None)
    standby = ec.generate_private_key(ec.SECP256R1())  # stands for the second center's key
    other = ec.generate_private_key(ec.SECP256R1())
    import hashlib

    doc = _certificate_of(state, card.card_id)
    b = Binding("i", "s", "kiosk-a1-1", card.fingerprint, hashlib.sha256(doc).hexdigest(), len(doc), "x", 1, 1)

    def end(keys, signer) -> str | None:
        flow = KioskFlow("kiosk-a1-1", card, "1234", IssueRequest(MUNI_A, "residence-record"), keys)
        flow.state, flow.session = State.AUTHENTICATED, "s"
        flow.on_document_headers(200, [(b"konbini-issuance-id", b"i")])
        flow.on_document_chunk(doc)
        return flow.on_document_end(_signed_trailers(signer, b))

    both = (center.public_key(), standby.public_key())
    assert end(both, standby) is None and end(both, center) is None
    assert end(center.public_key(), standby) == "signature-invalid"  # one key: the standby's is refused
    assert end(both, other) == "signature-invalid"


# -- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "muni, cert, reason",
    [
        (MUNI_C, "residence-record", "municipality-not-participating"),
        (MUNI_B, "family-register", "certificate-type-not-offered"),
        ("999999", "residence-record", "municipality-unknown"),
        (MUNI_A, "no-such-certificate", "certificate-type-not-offered"),
    ],
)
async def test_business_refusals_reach_the_kiosk_with_reason_and_message(net, muni, cert, reason):
    r = await issue_at(net, "kiosk-a1-2", pool(net, 1)[0], "1234", IssueRequest(muni, cert))
    assert (r.status, r.reason) == ("refused", reason)
    assert r.message and r.document_bytes == 0 and r.fee == 0


async def test_outside_hours_is_refused_with_the_hours_on_screen(net):
    net.clock.set(TEST_TIME.replace(hour=19, minute=30))  # muni-b is open 08:30–19:00
    r = await issue_at(net, "kiosk-a1-1", pool(net, 1)[0], "1234", IssueRequest(MUNI_B, "residence-record"))
    assert (r.status, r.reason) == ("refused", "outside-hours")
    assert "08:30–19:00" in r.message
    net.clock.set(TEST_TIME.replace(hour=23, minute=0))  # the center closes at 23:00 for everyone
    r = await issue_at(net, "kiosk-a1-1", pool(net, 1)[0], "1234", IssueRequest(MUNI_A, "residence-record"))
    assert (r.status, r.reason) == ("refused", "outside-hours")


async def test_expired_card_is_refused(net):
    card = net.cards.new(expired=True)
    r = await issue_at(net, "kiosk-a1-1", card, "1234", IssueRequest(MUNI_A, "residence-record"))
    assert (r.status, r.reason) == ("refused", "card-expired")


async def test_revoked_card_is_refused_through_a_real_ocsp_request(net):
    card = net.cards.new()
    ok = await issue_at(net, "kiosk-a1-1", card, "1234", IssueRequest(MUNI_A, "residence-record"))
    assert ok.status == "issued"
    net.cards.revoke(card.card_id, "key-compromise")
    r = await issue_at(net, "kiosk-a1-1", card, "1234", IssueRequest(MUNI_A, "residence-record"))
    assert (r.status, r.reason) == ("refused", "card-revoked")
    assert any(h["node"] == "ocsp" for h in r.hops)


async def test_wrong_pin_shows_tries_left_then_locks_after_three(net):
    card = net.cards.new(pin="4321")
    seen = []
    for _ in range(4):
        r = await issue_at(net, "kiosk-a1-1", card, "0000", IssueRequest(MUNI_A, "residence-record"))
        seen.append((r.reason, r.tries_left))
    assert seen == [("pin-wrong", 2), ("pin-wrong", 1), ("pin-locked", 0), ("pin-locked", 0)]
    r = await issue_at(net, "kiosk-a1-1", card, "4321", IssueRequest(MUNI_A, "residence-record"))
    assert r.reason == "pin-locked"  # the right PIN does not help once locked
    net.cards.unlock(card.card_id)
    card = net.cards.load(card.card_id)
    r = await issue_at(net, "kiosk-a1-1", card, "4321", IssueRequest(MUNI_A, "residence-record"))
    assert r.status == "issued"


async def test_request_outside_the_allow_list_is_denied_by_policy(net):
    kiosk = Kiosk(net.context("kiosk-a1-1"), net.state_dir)
    conn = await kiosk.connect()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.run)
        stream = await conn.open_stream(request_headers("DELETE", "/v1/session/x", "store-router-a1"), end_stream=True)
        headers = await stream.receive_headers()
        body = json.loads(await stream.read_body())
        conn.close()
    assert header(headers, b":status") == b"403"
    assert body["reason"] == "request-not-allowed"
    assert net.servers["store-router-a1"].denials["request-not-allowed"] == 1
    assert net.servers["ec-router-a"].app.streams_forwarded == 0  # denied at the first hop


# -- card authentication -------------------------------------------------------------------------


async def _raw_session(conn, router: str) -> dict:
    stream = await conn.open_stream(request_headers("POST", "/v1/session", router), end_stream=True)
    await stream.receive_headers()
    return json.loads(await stream.read_body())


async def _raw_post(conn, router: str, path: str, body: bytes) -> dict:
    stream = await conn.open_stream(request_headers("POST", path, router))
    await stream.send_data(body, end_stream=True)
    await stream.receive_headers()
    return json.loads(await stream.read_body())


async def test_forged_and_replayed_challenge_signatures_are_refused(net):
    card, other = pool(net, 2)
    kiosk = Kiosk(net.context("kiosk-a1-1"), net.state_dir)
    conn = await kiosk.connect()
    cert = base64.b64encode(card.certificate_der).decode()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.run)
        # forged: card A's certificate, signature made with another card's key
        s1 = await _raw_session(conn, "store-router-a1")
        forged = other.sign_challenge("1234", base64.b64decode(s1["challenge"]))
        r = await _raw_post(
            conn,
            "store-router-a1",
            f"/v1/session/{s1['session']}/auth",
            msgspec.json.encode(AuthRequest(cert, base64.b64encode(forged).decode())),
        )
        assert r["reason"] == "signature-invalid"
        # replayed: a valid answer to session 2's challenge, sent again on session 3
        s2 = await _raw_session(conn, "store-router-a1")
        good = base64.b64encode(card.sign_challenge("1234", base64.b64decode(s2["challenge"]))).decode()
        ok = await _raw_post(
            conn, "store-router-a1", f"/v1/session/{s2['session']}/auth", msgspec.json.encode(AuthRequest(cert, good))
        )
        assert ok["status"] == "authenticated"
        again = await _raw_post(
            conn, "store-router-a1", f"/v1/session/{s2['session']}/auth", msgspec.json.encode(AuthRequest(cert, good))
        )
        assert again["reason"] == "session-state"  # a challenge is answered once
        s3 = await _raw_session(conn, "store-router-a1")
        replay = await _raw_post(
            conn, "store-router-a1", f"/v1/session/{s3['session']}/auth", msgspec.json.encode(AuthRequest(cert, good))
        )
        assert replay["reason"] == "signature-invalid"
        # and no document without card authentication (SEC-KI-1)
        s4 = await _raw_session(conn, "store-router-a1")
        issue = await _raw_post(
            conn,
            "store-router-a1",
            f"/v1/session/{s4['session']}/issue",
            msgspec.json.encode(IssueRequest(MUNI_A, "residence-record")),
        )
        assert (issue["status"], issue["reason"]) == ("refused", "session-state")
        conn.close()


async def test_a_session_cannot_be_used_from_another_kiosk(net):
    k1 = Kiosk(net.context("kiosk-a1-1"), net.state_dir)
    k2 = Kiosk(net.context("kiosk-a1-2"), net.state_dir)
    c1, c2 = await k1.connect(), await k2.connect()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(c1.run)
        nursery.start_soon(c2.run)
        s = await _raw_session(c1, "store-router-a1")
        r = await _raw_post(c2, "store-router-a1", f"/v1/session/{s['session']}/auth", b"{}")
        assert r["reason"] == "session-unknown"
        c1.close()
        c2.close()


async def test_cancelling_an_issuance_midway_cancels_it_whole(net):
    """A kiosk timeout while the document streams: nothing printed, spool erased, center cancels."""
    card = pool(net, 1)[0]
    kiosk = Kiosk(net.context("kiosk-b1-1"), net.state_dir)
    conn = await kiosk.connect()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.run)
        # The timeout must fall inside the document's streaming: the steps before it (four fresh
        # TLS hops, challenge, answer, OCSP) took over 0.3 s once on a loaded CI machine, and a
        # 64 MiB document (the center's largest) needs well over a second to cross four TLS hops here.
        r = await kiosk.issue(conn, card, "1234", IssueRequest(MUNI_A, "residence-record", size=64 << 20), timeout=1.0)
        conn.close()
    assert (r.status, r.reason) == ("cancelled", "timeout")
    assert r.spool_erased and r.fee == 0
    center = net.app("issuance-center")
    with trio.fail_after(5):
        await trio.testing.wait_all_tasks_blocked(0.05)  # the reset has travelled back through three relays
    assert r.issuance_id and center.issuances[r.issuance_id].state == "cancelled"  # never half-done


async def test_with_ocsp_cache_a_card_revoked_after_a_good_answer_is_refused_once_that_answer_expires(
    topo, state, nursery
):
    clock = Clock(TEST_TIME)
    net = await nursery.start(
        lambda task_status: run_topology(
            msgspec.structs.replace(topo, ocsp_cache=True), state, clock=clock, task_status=task_status
        )
    )
    card = net.cards.new()
    first = await issue_at(net, "kiosk-a1-1", card, "1234", IssueRequest(MUNI_A, "residence-record"))
    assert first.status == "issued" and any(h["node"] == "ocsp" for h in first.hops)
    net.cards.revoke(card.card_id, "key-compromise")
    cached = await issue_at(net, "kiosk-a1-1", card, "1234", IssueRequest(MUNI_A, "residence-record"))
    assert cached.status == "issued" and not any(h["node"] == "ocsp" for h in cached.hops)  # relied on, not asked
    clock.set(TEST_TIME + ocsp.DEFAULT_VALIDITY + timedelta(seconds=5))  # past the good answer's nextUpdate
    late = await issue_at(net, "kiosk-a1-1", card, "1234", IssueRequest(MUNI_A, "residence-record"))
    assert (late.status, late.reason) == ("refused", "card-revoked") and any(h["node"] == "ocsp" for h in late.hops)
    net.stop()
