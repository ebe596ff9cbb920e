"""INT-1 on a running topology: the municipal incidents of 2023-2024 replayed where every
connection that can be shared is shared (docs/int1.md).

Today the relays pair each downstream connection with an upstream one, but the issuance center
talks to each municipality over one connection for every kiosk (`gateway/transport/upstream.py`):
every issuance below crosses that shared connection, interleaved with the others. The tests
take the relays' upstream mode as a parameter so that they run pooled too once relays pool
(`upstream_connections` in the topology file); until then only "paired" exists.

Each case is a `check_*` coroutine that raises AssertionError when a resident gets somebody
else's document, or a request is cancelled only in part. Its mutation test runs it again on a
deliberately broken variant of the component where the real bug lived (monkeypatched for that
test alone; every node runs in this process) and requires the check to catch it.

- Yokohama 2023: a timeout or cancellation cancels the whole request at every hop (the center's
  session, the ledger row, the municipality's stream, every relay's stream);
- Kawasaki 2023: two requests from two stores within one second for one municipality;
- Takamatsu 2024: a municipality served by two document servers;
- one issuance failing must not truncate or reset the others sharing the center's connection.

Every document is checked as the resident would read it: the PDF names the card's resident, the
card and the issuance id the kiosk was given (not just a status code).
"""

from __future__ import annotations

import re
from pathlib import Path

import msgspec
import pytest
import trio
import trio.testing
from cryptography import x509

from gateway.business.clock import Clock
from gateway.business.ledger import LedgerDB
from gateway.business.session import IssuanceState, SessionState
from gateway.node.server import App
from gateway.nodes.issuance import IssuanceCenter
from gateway.protocol.driver import H2Driver
from gateway.protocol.messages import IssueRequest
from gateway.protocol.splice import Splice
from kiosk_emu.card import Card, CardStore
from kiosk_emu.device.printer import Printer
from kiosk_emu.flow import State
from kiosk_emu.kiosk import IssuanceResult, Kiosk
from tests.conftest import TEST_TIME
from tests.test_cancel import CancelAt
from topology.launch.loopback import Running, run_topology
from topology.pki import PKI, card_id_of
from topology.spec import model
from topology.spec.load import DEFAULT_TOPOLOGY, load_topology
from topology.spec.model import Topology

MUNI_A, TAKAMATSU = "131016", "372013"
SETTLE = 10.0  # seconds a whole cancel has to reach every hop (polled; it takes milliseconds)
POOLING = hasattr(model, "UpstreamConnections")  # relays that pool their upstreams (issue 31 item 1)
RELAY_MODES = ["paired", pytest.param("pooled", marks=pytest.mark.skipif(not POOLING, reason="relays pair only"))]


def with_relay_mode(topo: Topology, mode: str) -> Topology:
    """`topo` with its EC routers and DMZ relays connecting upstream in `mode`."""
    if not POOLING:
        return topo  # every relay pairs
    settings = {kind: model.UpstreamConnections(mode=mode) for kind in ("ec-router", "dmz-relay")}
    return msgspec.structs.replace(topo, upstream_connections=settings)


@pytest.fixture(params=RELAY_MODES)
async def shared(request, topo: Topology, state: Path, nursery: trio.Nursery) -> Running:
    """The default topology, its relays in the parametrized upstream mode."""
    running = await nursery.start(
        lambda task_status: run_topology(
            with_relay_mode(topo, request.param), state, clock=Clock(TEST_TIME), task_status=task_status
        )
    )
    yield running
    running.stop()


# -- what a resident reads on the paper ---------------------------------------------------------

_INFO = re.compile(rb"/(Konbini\w+) <FEFF([0-9A-F]*)>")


def paper(pdf: bytes) -> dict[str, str]:
    """The certificate's metadata: whose it is (KonbiniResident), for which card and issuance."""
    return {k.decode(): bytes.fromhex(v.decode()).decode("utf-16-be") for k, v in _INFO.findall(pdf)}


class Resident:
    """A resident at a kiosk: their card, and the paper the kiosk printed for them."""

    def __init__(self, net: Running, kiosk_id: str, card: Card, tmp: Path) -> None:
        self.card = card
        self.saved = tmp / f"{kiosk_id}-{card.fingerprint[:8]}.pdf"
        self.kiosk = Kiosk(net.context(kiosk_id), net.state_dir, Printer(save_to=self.saved))

    def assert_own_document(self, r: IssuanceResult) -> None:
        assert r.status == "issued" and r.signature_valid, (r.kiosk, r.status, r.reason)
        facts = paper(self.saved.read_bytes())
        cert = x509.load_der_x509_certificate(self.card.certificate_der)
        assert facts["KonbiniResident"] == self.card.holder.name, (r.kiosk, facts)
        assert facts["KonbiniCard"] == card_id_of(cert), (r.kiosk, facts)
        assert facts["KonbiniIssuance"] == r.issuance_id, (r.kiosk, facts)


async def issue(resident: Resident, request: IssueRequest) -> IssuanceResult:
    conn = await resident.kiosk.connect()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.run)
        r = await resident.kiosk.issue(conn, resident.card, "1234", request)
        conn.close()
    return r


async def until(condition, what: str) -> None:
    """Poll `condition()` until true; AssertionError naming `what` after SETTLE seconds."""
    timeout = SETTLE
    with trio.move_on_after(timeout):
        while not condition():
            await trio.sleep(0.02)
        return
    raise AssertionError(f"{what}: not within {timeout} s")


async def caught(check, *args, **kwargs) -> bool:
    """Whether `check` raised the AssertionError it raises on a wrong delivery (from inside a
    nursery, in an exception group); what it found is printed."""
    try:
        await check(*args, **kwargs)
    except AssertionError as exc:
        print("caught:", exc)
        return True
    except BaseExceptionGroup as group:
        found = group.subgroup(AssertionError)
        if found is None:
            raise
        print("caught:", *found.exceptions)
        return True
    return False


def in_flight(app: App) -> float:
    """The relay's requests crossing it now, as its scrape shows them."""
    return app.metrics.registry.get_sample_value("konbini_streams_in_flight")


# -- Yokohama 2023: a cancel cancels the whole request, at every hop -----------------------------

PATH_A1 = ("store-router-a1", "ec-router-a", "dmz-relay-a")
BIG = 4 << 20  # a document that is still streaming from the municipality when the kiosk cancels


async def check_a_cancel_mid_document_is_whole_at_every_hop(net: Running, tmp: Path, cards: list[Card]) -> None:
    """The resident cancels while the document streams in (4 MiB: the municipality is still
    sending). Within SETTLE: the center's session is closed and its issuance cancelled, the ledger
    row says cancelled, the municipality's handler was stopped by the reset (it never finished the
    document), no relay on the path holds a stream, the center's connection to the municipality
    carries no stream. Then the next resident on the same kiosk gets their own document."""
    center: IssuanceCenter = net.app("issuance-center")
    muni = net.app("muni-a")
    endings: list[str] = []
    handle = muni.handle

    async def watched(stream, peer) -> None:
        try:
            await handle(stream, peer)
        except BaseException as exc:
            endings.append(type(exc).__name__)
            raise
        endings.append("finished")

    muni.handle = watched
    first, second = Resident(net, "kiosk-a1-1", cards[0], tmp), Resident(net, "kiosk-a1-1", cards[1], tmp)
    conn = await first.kiosk.connect()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.run)
        button = trio.CancelScope()
        flow = CancelAt(
            "kiosk-a1-1",
            first.card,
            "1234",
            IssueRequest(MUNI_A, "residence-record", 1, size=BIG),
            first.kiosk.center_keys,
            step=State.RECEIVING,
            button=button,
        )
        r = await first.kiosk.drive(conn, flow, cancel=button)
        assert r.status == "cancelled" and r.issuance_id, r
        iss = center.issuances[r.issuance_id]
        session = center.sessions.get(iss.session)
        await until(lambda: iss.state is IssuanceState.CANCELLED, "the center's issuance cancelled")
        assert session is None or session.state is SessionState.CLOSED, session.state
        await until(lambda: bool(endings), "the municipality's handler ended")
        assert endings in (["StreamReset"], ["Cancelled"]), endings  # stopped by the reset, not finished
        for relay in PATH_A1:
            await until(lambda relay=relay: in_flight(net.app(relay)) == 0, f"{relay}'s stream ended")
        link = center.muni_servers[MUNI_A].links[0]
        await until(lambda: not link._conn.core.streams, "the center's municipality stream ended")
        record = await center.ledger.call(LedgerDB.find_issuance, r.issuance_id)
        assert record.state == IssuanceState.CANCELLED.value, record.state
        # the same kiosk connection, the same center-municipality connection: the next resident's own paper
        second.kiosk = first.kiosk
        first.kiosk.printer.save_to = second.saved
        nxt = await first.kiosk.issue(conn, second.card, "1234", IssueRequest(MUNI_A, "residence-record", 1))
        second.assert_own_document(nxt)
        conn.close()


async def test_a_cancel_mid_document_cancels_the_whole_request_at_every_hop(shared, state, tmp_path):
    """Checked: fails on a relay that lets go of its own half only, and on a center that closes
    the session only (the next test): "the center's issuance cancelled: not within" the bound."""
    cards = CardStore(state, shared.pki, clock=lambda: TEST_TIME).ensure_pool(200)[180:182]
    await check_a_cancel_mid_document_is_whole_at_every_hop(shared, tmp_path, cards)


def relay_releasing_only_its_own_stream(monkeypatch) -> None:
    """Broken variant (Yokohama: the print-wait timeout released only the print-order control):
    a relay that, when its peer cancels, lets go of its own half of the pair and tells the next
    hop nothing; the hops behind it finish the request as if nobody had cancelled."""
    real = Splice._service

    def service(self, pair):
        if pair.down.reset_code is not None and not pair.over:
            self._leave(pair)
            self.down.forget(pair.down.id)
            carrier = getattr(pair, "carrier", None)  # pooled relays: the connection carrying it
            (carrier.core if carrier is not None else self.up).forget(pair.up.id)
            return
        real(self, pair)

    monkeypatch.setattr(Splice, "_service", service)


def center_closing_only_the_session(monkeypatch) -> None:
    """Broken variant: a center whose cancel closes the session but leaves the issuance (and its
    ledger row) as it was: part of the request's state cancelled, the rest not."""

    def cancel(self, s, iss) -> None:
        from gateway.business.session import SessionEvent

        self.sessions.fire(s, SessionEvent.CANCEL)

    monkeypatch.setattr(IssuanceCenter, "_cancel", cancel)


@pytest.mark.parametrize("broken", [relay_releasing_only_its_own_stream, center_closing_only_the_session])
async def test_the_whole_cancel_check_catches_a_request_cancelled_in_part(net, state, tmp_path, broken, monkeypatch):
    cards = CardStore(state, net.pki, clock=lambda: TEST_TIME).ensure_pool(200)[182:184]
    broken(monkeypatch)
    monkeypatch.setattr("tests.test_int1_topology.SETTLE", 3.0)
    assert await caught(check_a_cancel_mid_document_is_whole_at_every_hop, net, tmp_path, cards)


# -- Kawasaki 2023: two stores, one municipality, within one second --------------------------------

KAWASAKI = ("kiosk-a1-1", "kiosk-a2-1", "kiosk-a3-1", "kiosk-b1-1")  # four stores, two operators


async def check_simultaneous_requests_from_several_stores_each_get_their_own(
    net: Running, tmp: Path, cards: list[Card], kiosks=KAWASAKI, municipality: str = MUNI_A, rounds: int = 2
) -> None:
    """Each round, one resident at each kiosk (a store each) asks for the same municipality's
    certificate at the same moment; every one prints their own certificate."""
    it = iter(cards)
    for _ in range(rounds):
        residents = [Resident(net, k, next(it), tmp) for k in kiosks]
        results: dict[int, IssuanceResult] = {}
        go = trio.Event()

        async def one(i: int, resident: Resident, go: trio.Event, results: dict[int, IssuanceResult]) -> None:
            await go.wait()
            results[i] = await issue(resident, IssueRequest(municipality, "residence-record", 1, size=256 * 1024))

        async with trio.open_nursery() as nursery:
            for i, resident in enumerate(residents):
                nursery.start_soon(one, i, resident, go, results)
            await trio.testing.wait_all_tasks_blocked()
            go.set()
        for i, resident in enumerate(residents):
            resident.assert_own_document(results[i])


async def test_requests_from_several_stores_within_a_second_each_get_their_own_document(shared, state, tmp_path):
    """Checked: fails on one document slot per municipality (the next test): a kiosk refuses
    the paper, "misdelivered: resident-mismatch"."""
    cards = CardStore(state, shared.pki, clock=lambda: TEST_TIME).ensure_pool(200)[184:192]
    await check_simultaneous_requests_from_several_stores_each_get_their_own(shared, tmp_path, cards)


def one_document_slot_per_municipality(monkeypatch) -> None:
    """Broken variant (Kawasaki 2023, and the single-server program Takamatsu ran in 2024): the
    center keeps the document request being prepared in one slot per municipality; a second
    store's request within the preparation time overwrites the first, and both residents get the
    later one's certificate."""
    real = IssuanceCenter._open_document

    async def open_document(self, servers, doc_req):
        servers.preparing = doc_req
        await trio.sleep(0.5)  # preparing: the other store's request lands in the same second
        return await real(self, servers, servers.preparing)

    monkeypatch.setattr(IssuanceCenter, "_open_document", open_document)


async def test_the_several_stores_check_catches_one_document_slot_per_municipality(net, state, tmp_path, monkeypatch):
    cards = CardStore(state, net.pki, clock=lambda: TEST_TIME).ensure_pool(200)[192:196]
    one_document_slot_per_municipality(monkeypatch)
    assert await caught(
        check_simultaneous_requests_from_several_stores_each_get_their_own, net, tmp_path, cards, rounds=1
    )


# -- Takamatsu 2024: one municipality, two document servers ---------------------------------------

REDUNDANT = DEFAULT_TOPOLOGY.parent / "redundant.yaml"
TAKAMATSU_KIOSKS = ("kiosk-a1-1", "kiosk-a2-1", "kiosk-a3-1", "kiosk-a4-1")


@pytest.fixture(scope="module")
def takamatsu_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("konbini-takamatsu")
    pki = PKI.ensure(path, load_topology(REDUNDANT))
    CardStore(path, pki, clock=lambda: TEST_TIME).ensure_pool(12)
    return path


@pytest.fixture(params=RELAY_MODES)
async def takamatsu(request, takamatsu_state: Path, nursery: trio.Nursery) -> Running:
    """topology/redundant.yaml: Takamatsu's two document servers, the second taking over while the
    first refuses (a document server under maintenance for a moment)."""
    topo = with_relay_mode(load_topology(REDUNDANT), request.param)
    running = await nursery.start(
        lambda task_status: run_topology(topo, takamatsu_state, clock=Clock(TEST_TIME), task_status=task_status)
    )
    yield running
    running.stop()


async def check_a_municipality_on_two_document_servers_gives_each_their_own(net: Running, tmp: Path) -> None:
    """Round one on the first server; then the first refuses, so round two is served by the second
    (the center passes over the first). Every resident prints their own."""
    cards = CardStore(net.state_dir, net.pki, clock=lambda: TEST_TIME).ensure_pool(12)
    first = net.app("muni-takamatsu-1")
    served = [first.documents_served, net.app("muni-takamatsu-2").documents_served]
    await check_simultaneous_requests_from_several_stores_each_get_their_own(
        net, tmp, cards[0:4], TAKAMATSU_KIOSKS, TAKAMATSU, rounds=1
    )
    handle = first.handle

    async def refusing(stream, peer) -> None:
        from gateway.protocol.http import refuse

        await refuse(stream, 503, "maintenance", "under maintenance")

    first.handle = refusing
    await check_simultaneous_requests_from_several_stores_each_get_their_own(
        net, tmp, cards[4:8], TAKAMATSU_KIOSKS, TAKAMATSU, rounds=1
    )
    first.handle = handle
    assert net.app("muni-takamatsu-2").documents_served > served[1]  # the second server served some
    assert first.documents_served > served[0]


async def test_a_municipality_on_two_document_servers_gives_each_resident_their_own(takamatsu, tmp_path):
    """Checked: fails on the single-slot program (the next test): "misdelivered: resident-mismatch"."""
    await check_a_municipality_on_two_document_servers_gives_each_their_own(takamatsu, tmp_path)


@pytest.mark.parametrize("takamatsu", ["paired"], indirect=True)
async def test_the_two_servers_check_catches_the_single_server_program(takamatsu, tmp_path, monkeypatch):
    one_document_slot_per_municipality(monkeypatch)
    assert await caught(check_a_municipality_on_two_document_servers_gives_each_their_own, takamatsu, tmp_path)


# -- one issuance failing leaves the others on the shared connection whole ----------------------------

CROWD = ("kiosk-a1-1", "kiosk-a1-2", "kiosk-a2-1", "kiosk-a3-1", "kiosk-b1-1", "kiosk-b1-2")


async def check_one_failing_issuance_leaves_the_others_whole(net: Running, tmp: Path, cards: list[Card]) -> None:
    """Six residents in four stores download 2 MiB certificates at once, interleaved on the center's
    one connection to the municipality; one of them cancels as the document starts. The other five
    print their own certificate, whole (the kiosk checks its digest and length against the signed
    binding); the cancelled one left no paper."""
    residents = [Resident(net, k, c, tmp) for k, c in zip(CROWD, cards, strict=True)]
    results: dict[int, IssuanceResult] = {}
    go = trio.Event()

    async def one(i: int, resident: Resident) -> None:
        await go.wait()
        request = IssueRequest(MUNI_A, "residence-record", 1, size=2 << 20)
        if i:
            results[i] = await issue(resident, request)
            return
        conn = await resident.kiosk.connect()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.run)
            button = trio.CancelScope()
            flow = CancelAt(
                resident.kiosk.node.id,
                resident.card,
                "1234",
                request,
                resident.kiosk.center_keys,
                step=State.RECEIVING,
                button=button,
            )
            results[i] = await resident.kiosk.drive(conn, flow, cancel=button)
            conn.close()

    async with trio.open_nursery() as nursery:
        for i, resident in enumerate(residents):
            nursery.start_soon(one, i, resident)
        await trio.testing.wait_all_tasks_blocked()
        go.set()
    assert results[0].status == "cancelled" and not residents[0].kiosk.printer.tray
    for i, resident in enumerate(residents[1:], 1):
        resident.assert_own_document(results[i])
        assert results[i].document_bytes == 2 << 20


async def test_one_failing_issuance_leaves_the_others_on_the_shared_connection_whole(shared, state, tmp_path):
    """Checked: fails on a release that closes the shared connection (the next test): another
    resident's issuance ends "cancelled: stream-reset"."""
    cards = CardStore(state, shared.pki, clock=lambda: TEST_TIME).ensure_pool(210)[196:202]
    await check_one_failing_issuance_leaves_the_others_whole(shared, tmp_path, cards)


async def test_the_whole_issuances_check_catches_a_release_that_closes_the_shared_connection(
    net, state, tmp_path, monkeypatch
):
    """Broken variant: releasing an unfinished stream closes its connection (the HTTP/1.1 habit:
    a half-read response poisons the connection), so every issuance sharing the center's
    connection to the municipality is cut with it."""
    real = H2Driver.release

    def release(self, stream) -> None:
        unfinished = not stream.st.finished
        real(self, stream)
        if unfinished:
            self.close()

    monkeypatch.setattr(H2Driver, "release", release)
    cards = CardStore(state, net.pki, clock=lambda: TEST_TIME).ensure_pool(210)[202:208]
    assert await caught(check_one_failing_issuance_leaves_the_others_whole, net, tmp_path, cards)
