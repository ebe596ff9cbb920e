"""What a long-lived connection keeps per request (the soak bench's RSS growth, issue 10).

Two cores, a client and a server (`gateway.protocol.h2lean`), wired to each other by hand (no sockets, no event loop),
as a kiosk's or a relay's connection is: thousands of requests one after another over one
connection. Whatever either side still holds once a request is done grows a process's memory
for as long as the connection lives; here it must stay flat. A stream that ended in a reset is
still remembered (a frame that crossed the RST_STREAM must not close the connection).

And what the issuance center keeps per issuance: finished ones are forgotten after a while (the
ledger answers for them), so the center's memory holds a window of issuances, not all of them.

And what malloc keeps: the pages a process's freed buffers leave between live objects go back to
the system (`gateway.node.heap`), in every node process while it serves.
"""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
import tracemalloc

import trio

import gateway.node.heap
import gateway.nodes.center.issuing
from gateway.business.clock import Clock
from gateway.protocol.frames import CANCEL
from gateway.protocol.h2lean import LeanClientCore, LeanServerCore
from gateway.protocol.http import request_headers
from gateway.protocol.messages import IssueRequest
from kiosk_emu.kiosk import Kiosk, issue_at
from tests.conftest import TEST_TIME
from tests.test_notices import MUNI_A, post
from topology.launch.servers import run_servers
from topology.pkifiles import PKIFiles

REQUEST = request_headers("GET", "/bench/blob?size=512", "store-router-a1")
BODY = b"k" * 512


class Pair:
    """A client core and a server core with bytes moved between them until both are quiet."""

    def __init__(self) -> None:
        self.client = LeanClientCore()
        self.server = LeanServerCore()
        self.exchange()

    def exchange(self) -> None:
        while True:
            out = self.client.data_to_send()
            back = self.server.data_to_send()
            if not out and not back:
                return
            if out:
                self.server.receive_data(out)
            if back:
                self.client.receive_data(back)

    def request(self) -> None:
        """One whole request and response, both sides done with the stream (as the drivers are)."""
        st = self.client.send_request(REQUEST, end_stream=True)
        self.exchange()
        req = self.server.new_requests.popleft()
        self.server.send_headers(req.id, [(b":status", b"200"), (b"server-timing", b"x;dur=0.1")])
        self.server.send_data(req.id, BODY, end_stream=True)
        self.exchange()
        self.server.forget(req.id)
        assert self.client.take_chunk(st) == BODY and st.ended
        self.client.forget(st.id)


def retained(pair: Pair, requests: int) -> int:
    """Bytes of Python memory still allocated after `requests` more requests than before."""
    gc.collect()
    before = tracemalloc.get_traced_memory()[0]
    for _ in range(requests):
        pair.request()
    gc.collect()
    return tracemalloc.get_traced_memory()[0] - before


def test_requests_over_one_connection_leave_nothing_behind():
    pair = Pair()
    for _ in range(300):  # warm-up: HPACK tables, h2's frame and window bookkeeping
        pair.request()
    tracemalloc.start()
    try:
        grown = retained(pair, 3000)
    finally:
        tracemalloc.stop()
    # h2 used to remember how each of these 3,000 streams ended, ~100 bytes per stream on each side
    # (~600 KB here); nothing per request may stay now. Bounded, not zero: allocator and cache noise.
    assert grown < 48 * 1024, f"{grown} bytes retained by 3,000 finished requests"
    for core in (pair.client, pair.server):
        assert not core.streams
        assert not core._state  # the core's own record of each stream's windows goes with it


def test_a_reset_stream_is_still_remembered_and_a_late_frame_on_it_keeps_the_connection():
    pair = Pair()
    st = pair.client.send_request(REQUEST, end_stream=True)
    pair.exchange()
    req = pair.server.new_requests.popleft()
    pair.server.send_headers(req.id, [(b":status", b"200")])
    pair.server.send_data(req.id, BODY)
    pair.exchange()
    pair.client.reset(st.id, CANCEL)  # the kiosk gave up...
    pair.client.forget(st.id)
    # ...while the server's trailers were already on the wire: they cross the RST_STREAM
    pair.server.end_stream(req.id, [(b"konbini-binding", b"x")])
    trailers = pair.server.data_to_send()
    pair.client.receive_data(trailers)  # a connection error without the record
    pair.exchange()
    assert not pair.client.closed and not pair.server.closed
    pair.request()  # the connection goes on


async def test_the_center_forgets_finished_issuances_and_the_ledger_still_answers_for_them(net, monkeypatch):
    # The center used to keep every issuance in memory for as long as it ran (~0.8 KB each: the
    # soak bench's origin grew +16 % in 10 minutes). Finished ones now go after FINISHED_TTL.
    monkeypatch.setattr(gateway.nodes.center.issuing, "FINISHED_TTL", 0.0)  # forgotten at the next issuance
    center = net.app("issuance-center")
    cards = net.cards.ensure_pool(4)
    results = [
        await issue_at(net, "kiosk-a1-1", card, "1234", IssueRequest(MUNI_A, "residence-record")) for card in cards
    ]
    assert [r.status for r in results] == ["issued"] * 4
    assert list(center.issuances) == [results[-1].issuance_id]  # the earlier three are gone from memory
    assert len(center._finished) == 1
    # a repeated notice for a forgotten issuance is answered from the ledger, as after a restart
    kiosk = Kiosk(net.context("kiosk-a1-1"), net.state_dir)
    first = results[0].issuance_id
    body = kiosk.outbox.conn.execute("SELECT body FROM notices WHERE issuance_id = ?", (first,)).fetchone()[0]
    status, ack = await post(kiosk, "/v1/notice", body)
    assert (status, ack["duplicate"]) == (200, True)


# A relay's pattern, in a fresh interpreter (a clean heap): buffers of 256 KiB taken and freed
# between long-lived allocations. The first free of a large buffer raises glibc's mmap threshold,
# so the rest come from the heap, and freeing them leaves holes malloc keeps (RSS stays up).
FRAGMENT = textwrap.dedent("""
    from gateway.node.heap import give_back

    def rss_kib():
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS:"))

    first = b"x" * (512 * 1024)
    del first  # glibc's mmap threshold is now above 256 KiB
    buffers, kept = [], []
    for i in range(64):
        buffers.append(b"x" * (256 * 1024))  # filled: its pages are resident
        kept.append(bytes([i]) * 2048)  # too big for Python's allocator: malloc's heap, between the buffers
    del buffers
    before = rss_kib()
    went = give_back()
    print(before, rss_kib(), went)
""")


def test_a_process_gives_back_the_pages_its_freed_buffers_left_in_the_heap():
    out = subprocess.run([sys.executable, "-c", FRAGMENT], capture_output=True, text=True, check=True).stdout
    before, after, went = out.split()
    # 16 MiB of freed buffers: malloc kept every page of them until `give_back`
    assert went == "True"
    assert int(before) - int(after) > 12 * 1024, out


async def test_a_node_process_gives_its_freed_heap_back_while_it_serves(topo, tmp_path, nursery, monkeypatch):
    trims = []
    trimmed = trio.Event()

    def trim(pad: int) -> int:
        trims.append(pad)
        if len(trims) == 2:  # periodically, not once at start
            trimmed.set()
        return 1

    monkeypatch.setattr(gateway.node.heap, "TRIM_EVERY", 0.01)
    monkeypatch.setattr(gateway.node.heap, "_TRIM", trim)
    # what every node process runs (bench.serve, a nodehost, `konbini up`); no node is needed for the trim
    pki = PKIFiles(tmp_path, frozenset())
    running = await nursery.start(
        lambda task_status: run_servers(topo, tmp_path, pki, None, Clock(TEST_TIME), only=[], task_status=task_status)
    )
    with trio.fail_after(10):
        await trimmed.wait()
    running.stop()
    assert trims[:2] == [0, 0]  # every arena, nothing kept at the top
