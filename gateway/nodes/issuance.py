"""The certificate issuance center: card authentication, business checks, streamed signed documents.

Flow per kiosk session (each step one HTTP/2 request relayed from the kiosk's store router):
  POST /v1/session                 -> a fresh challenge, bound to the attested kiosk
  POST /v1/session/{id}/auth       -> card certificate + signature over the challenge; the center
                                      checks signature, chain, validity and revocation (OCSP)
  POST /v1/session/{id}/issue      -> business checks, then the municipality's document streams
                                      through, hashed on the way; the trailers carry the binding
                                      (issuance id, session, kiosk, card, digest) and its signature
  POST /v1/notice                  -> completion notice, deduplicated by issuance id in the ledger
                                      (so across restarts too); acknowledged only once durable
  POST /v1/correction              -> amends a noticed issuance until its month is fixed (BIZ-5/6)
  POST /v1/session/{id}/misdelivery-> a kiosk refused a document; counted, never silent (INT-1)
This module is the HTTP surface and the wiring; each step's work is a part under
gateway/nodes/center/ (authentication, issuing, notices), and its rules the state machines of
gateway/business/session.py. /bench/* is the relay benchmarks' origin (gateway/nodes/bench_origin.py),
served at this node's address.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from gateway.business import ocsp
from gateway.business.ledger import Ledger, ledger_path
from gateway.business.refusal import Refusal
from gateway.business.session import Issuance, IssuanceState, Session
from gateway.business.sessions import LocalSessions, SessionMoved, SharedSessions
from gateway.node.server import NodeContext, Peer
from gateway.nodes.bench_origin import serve_bench
from gateway.nodes.center.authentication import SESSION_TTL, CardAuthentication
from gateway.nodes.center.issuing import DocumentServers
from gateway.nodes.center.notices import Notices
from gateway.protocol.driver import Stream
from gateway.protocol.http import BadRequest, decode, method_path
from gateway.protocol.messages import AuthRequest, CompletionNotice, CorrectionNotice, IssueRequest, MisdeliveryReport
from gateway.protocol.streams import header
from gateway.transport.upstream import Upstream

log = logging.getLogger("konbini.center")


class IssuanceCenter(CardAuthentication, Notices):
    def __init__(self, ctx: NodeContext, nursery: trio.Nursery, state_dir: Path | None = None) -> None:
        self.ctx = ctx
        # The ledger is the center's memory across restarts: issuances, notices, settlement facts.
        self.ledger = Ledger.open(ledger_path(ctx.topo.ledger, state_dir or ctx.topo.state_dir))
        nursery.start_soon(self.ledger.run)
        # One process: its sessions in memory. Workers on one address (SO_REUSEPORT): in a file
        # they share, since a relay that pools connections spreads one kiosk's requests over them.
        if ctx.reuse_port:
            where = Path(state_dir or ctx.topo.state_dir) / f"sessions-{ctx.node.id}.sqlite"
            self.sessions: LocalSessions | SharedSessions = SharedSessions(where, SESSION_TTL)
        else:
            self.sessions = LocalSessions(SESSION_TTL)
        self.issuances: dict[str, Issuance] = {}
        self._awaited: dict[str, float] = {}  # issuance id -> monotonic time it was sent; its notice is awaited
        self._finished: dict[str, float] = {}  # issuance id -> monotonic time it was completed or cancelled
        self.expired = 0  # delivered issuances whose notice never came, in memory or in the ledger
        self.refusals: Counter[Refusal] = Counter()
        self.misdeliveries: list[MisdeliveryReport] = []
        pki = ctx.pki
        key = pki.node_paths(ctx.node.id)[1]
        self._sign_key = serialization.load_pem_private_key(key.read_bytes(), password=None)
        self.jpki_ca: x509.Certificate = pki.jpki_ca
        topo = ctx.topo
        self.munis = topo.municipalities()
        ocsp_nodes = topo.of_kind("ocsp")
        self.ocsp = Upstream(ctx, ocsp_nodes[0], nursery) if ocsp_nodes else None
        # `ocsp_cache: true`: a card's good (or revoked) answer is relied on until its nextUpdate
        self.ocsp_answers = ocsp.OcspCache() if topo.ocsp_cache else None
        # A municipality may run several document servers (the same municipality data): every one,
        # in file order, so that the next is tried when one is down or hung (`_open_document`).
        self._nursery = nursery
        links: dict[str, list[Upstream]] = {}
        for node in topo.of_kind("municipality"):
            if node.municipality is not None:
                links.setdefault(node.municipality.code, []).append(Upstream(ctx, node, nursery))
        self.muni_servers = {code: DocumentServers(ups) for code, ups in links.items()}
        nursery.start_soon(self._sweep)

    def collect(self) -> Iterator[Metric]:
        """Read at scrape time (the NodeServer registers the app as a collector): what the center
        knows of the kiosks' notice outboxes, documents delivered whose completion notice is not in;
        the issuances it holds in memory, by state (each leaves within its bound); the document
        servers it has set aside."""
        states = Counter(iss.state.value for iss in self.issuances.values())
        yield GaugeMetricFamily(
            "konbini_notices_awaited",
            "Delivered documents whose completion notice is not in yet.",
            value=states[IssuanceState.SENT.value],
        )
        held = GaugeMetricFamily(
            "konbini_issuances_in_memory", "Issuances the center holds in memory, by state.", labels=["state"]
        )
        for state in IssuanceState:
            held.add_metric([state.value], states[state.value])
        yield held
        yield CounterMetricFamily(
            "konbini_issuances_expired", "Delivered issuances whose completion notice never came.", value=self.expired
        )
        aside = GaugeMetricFamily(
            "konbini_document_servers_set_aside", "Document servers set aside until a probe finds them answering."
        )
        aside.add_metric([], sum(len(servers.outliers.set_aside_at) for servers in self.muni_servers.values()))
        yield aside

    # -- routing ---------------------------------------------------------------------------

    async def handle(self, stream: Stream, peer: Peer) -> None:
        t0 = time.perf_counter()
        method, path = method_path(stream.headers)
        parts = path.strip("/").split("/")
        try:
            if method == "POST" and parts == ["v1", "session"]:
                await stream.read_body(4096)
                await self._start_session(stream, t0)
            elif method == "POST" and len(parts) == 4 and parts[:2] == ["v1", "session"]:
                session = self._session(parts[2], stream)
                body = await stream.read_body(64 * 1024)
                if session is None:
                    await self._refuse(stream, 404, Refusal.SESSION_UNKNOWN, t0)
                elif parts[3] == "auth":
                    await self._authenticate(stream, session, decode(body, AuthRequest), t0)
                elif parts[3] == "issue":
                    await self._issue(stream, session, decode(body, IssueRequest), t0)
                elif parts[3] == "misdelivery":
                    await self._misdelivery(stream, session, decode(body, MisdeliveryReport), t0)
                else:
                    await self._refuse(stream, 404, Refusal.BAD_REQUEST, t0)
            elif method == "POST" and parts == ["v1", "notice"]:
                await self._notice(stream, decode(await stream.read_body(4096), CompletionNotice), t0)
            elif method == "POST" and parts == ["v1", "correction"]:
                await self._correction(stream, decode(await stream.read_body(4096), CorrectionNotice), t0)
            elif parts[:1] == ["bench"]:  # the relay benchmarks' origin lives at the center's address
                await serve_bench(stream, method, self.ctx.node.id, t0)
            else:
                await self._refuse(stream, 404, Refusal.BAD_REQUEST, t0)
        except BadRequest as exc:
            log.info("bad request on %s: %s", path, exc)
            await self._refuse(stream, 400, Refusal.BAD_REQUEST, t0)
        except SessionMoved as exc:  # another worker answered this challenge or issued on it first
            log.info("%s", exc)
            await self._refuse(stream, 409, Refusal.SESSION_STATE, t0)

    def _session(self, sid: str, stream: Stream) -> Session | None:
        s = self.sessions.get(sid)
        kiosk = (header(stream.headers, b"konbini-kiosk") or b"").decode()
        if s is None or s.kiosk != kiosk:  # a session belongs to the kiosk that opened it
            return None
        return s
