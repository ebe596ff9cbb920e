"""Frame-level fuzzing of every node kind: sequences of well- and ill-formed HTTP/2 frames from an
allowed peer (right address, right certificate), so the frames reach the HTTP/2 layer.

Seeded and bounded (hypothesis, derandomized). Per case: the node either closes the connection
or answers a PING sent after the case within CASE_BOUND seconds (no hang), and a well-behaved
peer's request on another connection to the same node still completes (no crash, no stall).
After all cases the fuzzed node holds no connection. More cases for a longer run:

    KONBINI_FUZZ_CASES=5000 .venv/bin/pytest tests/test_fuzz_frames.py -q

Every finding becomes a regression test in tests/test_hostile.py or tests/test_h2core.py (the cores against h2).
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path

import hpack
import pytest
import trio
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.protocol.http import request_headers
from gateway.transport.tls import client_context
from topology.policy.compiler import reachability

CASES = int(os.environ.get("KONBINI_FUZZ_CASES", "300"))  # per node kind: 2,100 cases over 7 kinds in CI
RSS_GROWTH_LIMIT = 64 << 20  # bytes the whole test process may grow over one kind's cases
CASE_BOUND = 3.0  # seconds for the node to close or answer after a case
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

stream_ids = st.sampled_from([0, 1, 3, 5, 7, 2, 0x7FFFFFFF])
small = st.integers(0, 2**31 - 1)


def _headers_block(headers: list[tuple[bytes, bytes]]) -> bytes:
    return hpack.Encoder().encode(headers)


header_lists = st.lists(
    st.tuples(
        st.sampled_from(
            [
                b":method",
                b":path",
                b":scheme",
                b":authority",
                b"x",
                b"content-length",
                b"te",
                b"connection",
                b"Upper",
                b"",
            ]
        ),
        st.binary(max_size=40),
    ),
    max_size=6,
)


def _flag(frame, names) -> None:
    for name in names:
        frame.flags.add(name)


@st.composite
def well_formed(draw) -> bytes:
    """A frame hyperframe can serialize: valid layout, any field values."""
    sid = draw(stream_ids)
    kind = draw(
        st.sampled_from(["headers", "continuation", "data", "rst", "settings", "ping", "window", "priority", "goaway"])
    )
    if kind == "headers":
        f = HeadersFrame(sid or 1, _headers_block(draw(header_lists)))
        _flag(f, draw(st.sets(st.sampled_from(["END_STREAM", "END_HEADERS"]))))
    elif kind == "continuation":
        f = ContinuationFrame(sid or 1, _headers_block(draw(header_lists)))
        _flag(f, draw(st.sets(st.sampled_from(["END_HEADERS"]))))
    elif kind == "data":
        f = DataFrame(sid or 1, draw(st.binary(max_size=300)))
        _flag(f, draw(st.sets(st.sampled_from(["END_STREAM"]))))
    elif kind == "rst":
        f = RstStreamFrame(sid or 1, draw(st.integers(0, 20)))
    elif kind == "settings":
        f = SettingsFrame(0, {draw(st.integers(0, 10)): draw(small) for _ in range(draw(st.integers(0, 3)))})
        if draw(st.booleans()) and not f.settings:
            f.flags.add("ACK")
    elif kind == "ping":
        f = PingFrame(0, draw(st.binary(min_size=8, max_size=8)))
    elif kind == "window":
        f = WindowUpdateFrame(draw(stream_ids), draw(st.integers(0, 2**31 - 1)))
    elif kind == "priority":
        f = PriorityFrame(sid or 1, depends_on=draw(stream_ids), stream_weight=draw(st.integers(0, 255)))
    else:
        f = GoAwayFrame(0, last_stream_id=draw(stream_ids), error_code=draw(st.integers(0, 20)))
    return f.serialize()


@st.composite
def raw_frame(draw) -> bytes:
    """A 9-byte frame header whose length matches its payload, with anything in type, flags and id."""
    payload = draw(st.binary(max_size=64))
    ftype = draw(st.integers(0, 255))
    flags = draw(st.integers(0, 255))
    sid = draw(st.integers(0, 2**32 - 1))
    return len(payload).to_bytes(3, "big") + bytes([ftype, flags]) + sid.to_bytes(4, "big") + payload


cases = st.tuples(
    st.lists(st.one_of(well_formed(), raw_frame()), min_size=1, max_size=8),
    st.sampled_from(["whole", "whole", "whole", "truncated"]),  # sometimes the last frame is cut short
)


def _targets(net) -> list[tuple[str, str]]:
    """One (server node, allowed client node) pair per server kind."""
    seen: dict[str, tuple[str, str]] = {}
    for r in reachability(net.topo):
        kind = net.topo.node(r.dst).kind
        if r.allowed and kind not in seen:
            seen[kind] = (r.dst, r.src)
    return sorted(seen.values())


async def _open_tls(net, dst: str, src: str) -> trio.SSLStream:
    chain, key = net.pki.node_paths(src)
    ctx: ssl.SSLContext = client_context(Path(chain), Path(key), Path(net.pki.network_ca_path))
    node = net.topo.node(dst)
    tcp = await trio.open_tcp_stream(node.address, node.port, local_address=net.topo.node(src).address)
    tls = trio.SSLStream(tcp, ctx, server_hostname=dst)
    await tls.do_handshake()
    return tls


async def _run_case(net, dst: str, src: str, frames: list[bytes], how: str) -> str:
    """Send the case, then a PING; 'closed' or 'answered', or raise when the node does neither in time."""
    tls = await _open_tls(net, dst, src)
    try:
        blob = b"".join(frames)
        if how == "truncated" and len(frames[-1]) > 1:
            blob = blob[: len(blob) - len(frames[-1]) // 2]
        ping = PingFrame(0, b"fuzzping")
        try:
            await tls.send_all(
                PREFACE + SettingsFrame(0).serialize() + blob + (b"" if how == "truncated" else ping.serialize())
            )
        except (trio.BrokenResourceError, OSError):
            return "closed"
        got = b""
        with trio.fail_after(CASE_BOUND):
            while True:
                try:
                    data = await tls.receive_some(65536)
                except (trio.BrokenResourceError, OSError, ssl.SSLError):
                    return "closed"
                if not data:
                    return "closed"
                got += data
                if how == "truncated" or b"fuzzping" in got:
                    return "answered"  # a cut frame leaves the node waiting for its rest: that is no hang
    except trio.TooSlowError:
        raise AssertionError(f"{dst} neither closed nor answered within {CASE_BOUND} s: {frames!r}") from None
    finally:
        await trio.aclose_forcefully(tls)


async def _probe(net, dst: str, src: str) -> None:
    """A well-behaved request to the fuzzed node from its allowed peer completes."""
    with trio.fail_after(10):
        conn = await net.context(src).connect(net.topo.node(dst))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.run)
            stream = await conn.open_stream(request_headers("GET", "/no-such-path", dst), end_stream=True)
            headers = await stream.receive_headers()
            await stream.read_body()
            conn.close()
    assert dict(headers)[b":status"] in (b"200", b"400", b"403", b"404", b"405")


@pytest.mark.parametrize("kind_index", range(7))
async def test_no_frame_sequence_crashes_or_hangs_a_node(net, kind_index):
    targets = _targets(net)
    if kind_index >= len(targets):
        pytest.skip("the default topology has fewer server kinds")
    dst, src = targets[kind_index]
    outcomes: dict[str, int] = {}

    # hypothesis drives examples synchronously: run it in a worker thread and each case back in
    # this Trio run, where the topology's servers live
    @settings(
        max_examples=CASES, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
    )
    @given(case=cases)
    def fuzz(case):
        frames, how = case
        outcome = trio.from_thread.run(_run_case, net, dst, src, frames, how)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1

    rss_before = _rss()
    await trio.to_thread.run_sync(fuzz)
    grown = _rss() - rss_before
    await _probe(net, dst, src)
    assert sum(outcomes.values()) >= min(CASES, 50)
    assert grown < RSS_GROWTH_LIMIT, f"memory grew {grown >> 20} MiB over {CASES} cases"
    print(f"{dst} fuzzed from {src}: {outcomes}, RSS {grown / 2**20:+.1f} MiB")


def _rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
