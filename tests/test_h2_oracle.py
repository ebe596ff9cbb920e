"""HTTP/2 conformance with python-hyper's h2 as the referee (docs/http2.md).

The same byte streams go to konbini's server core and to h2's server, and to konbini's client
core and h2's client; both must accept or reject alike (the GOAWAY code, the RST_STREAM codes)
and decode alike (headers, bodies, trailers, ends, resets, PING and SETTINGS acks, the windows
and frame size the peer granted). Two sources of bytes: valid exchanges made by h2 itself as the
peer, and hypothesis-made malformed ones. Where konbini differs on purpose the difference is in
DIFFERENCES, by name and with its reason; any other disagreement fails. Bounded for CI:

    KONBINI_ORACLE_CASES=2000 .venv/bin/pytest tests/test_h2_oracle.py -q -s
"""

from __future__ import annotations

import os
import re
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import h2.config
import h2.connection
import h2.errors
import h2.events
import hpack
import pytest
from h2.settings import SettingCodes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.h2oracle import PREFACE, Outcome, konbini_client, konbini_server, reference, run_h2, run_konbini
from topology.spec.model import Limits

CASES = int(os.environ.get("KONBINI_ORACLE_CASES", "150"))  # per test; four hypothesis tests
E = h2.errors.ErrorCodes
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20

REQUEST = [(b":method", b"POST"), (b":scheme", b"https"), (b":path", b"/v1/x"), (b":authority", b"router")]
GET = [(b":method", b"GET"), *REQUEST[1:]]
TALLY: Counter[str] = Counter()  # cases run, agreements, and each allowed difference met


def frame(kind: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes((kind, flags)) + struct.pack(">L", sid) + payload


def cut(wire: bytes) -> list[bytes]:
    """`wire` as one chunk per frame (a frame's length field decides where it ends)."""
    out, pos = [], 0
    while pos < len(wire):
        stop = pos + 9 + int.from_bytes(wire[pos : pos + 3], "big")
        out.append(wire[pos:stop])
        pos = stop
    return out


# -- deliberate differences --------------------------------------------------------------------


@dataclass(frozen=True)
class Difference:
    """Where konbini's core and h2 part ways on purpose: why, and the test that recognises it
    (given konbini's and h2's outcomes, and the chunks both were fed)."""

    reason: str
    matches: Callable[[Outcome, Outcome], bool]
    client_only: bool = False  # a rule of konbini's client core alone


def _same_but(k: Outcome, r: Outcome, *, error: bool = False, resets: bool = False, streams: bool = False) -> bool:
    """The two outcomes agree on everything but the named parts."""
    return (
        (error or k.error == r.error)
        and (resets or k.resets_sent == r.resets_sent)
        and (streams or k.streams == r.streams)
        and k.pings == r.pings
        and k.goaway == r.goaway
    )


def _kind(chunk: bytes) -> int | None:
    return chunk[3] if len(chunk) >= 9 else None


def _sid(chunk: bytes) -> int | None:
    return struct.unpack(">L", chunk[5:9])[0] & 0x7FFFFFFF if len(chunk) >= 9 else None


# frames of a fixed length (GOAWAY: at least 8 bytes) and stream: whether the length is right, whether it must be on 0
_FIXED = {
    RST_STREAM: (lambda n: n == 4, False),
    PING: (lambda n: n == 8, True),
    PRIORITY: (lambda n: n == 5, False),
    GOAWAY: (lambda n: n >= 8, True),
}


def _breaks_two_rules(chunk: bytes) -> bool:
    """A frame of the wrong length on the wrong stream: which rule a receiver names first is its choice."""
    if _kind(chunk) not in _FIXED:
        return False
    length_ok, on_zero = _FIXED[_kind(chunk)]
    return not length_ok(len(chunk) - 9) and (_sid(chunk) == 0) != on_zero


FLOODS = {"rapid-reset", "ping-flood", "settings-flood", "empty-data-flood", "a header block that does not end"}

# h2's messages for a header field list it refuses (h2/utilities.py)
_FIELD_RULES = re.compile(
    r"Received (uppercase header|header name with zero|header value surrounded|duplicate pseudo|pseudo-header"
    r"|custom pseudo)|Illegal character|Invalid value for TE|Connection-specific|Header block missing mandatory"
    r"|Encountered (request|response|connect-request)-only|Ordinary CONNECT|Request header block"
)

DIFFERENCES: dict[str, Difference] = {
    "response-fields-not-validated": Difference(
        "konbini's client core does not check a response's header fields: its peers are konbini's next hops,"
        " authenticated by certificate, and fields are checked once per hop, by the server core (H2Core's rule);"
        " h2's client checks them",
        lambda k, r: (
            r.error == E.PROTOCOL_ERROR
            and _kind(r.culprit) in (HEADERS, CONTINUATION)
            and bool(_FIELD_RULES.match(r.detail))
        ),
        client_only=True,
    ),
    "frames-after-the-peers-reset": Difference(
        "frames on a stream the peer reset are dropped, as frames crossing konbini's own reset are (their DATA"
        " still counts against the connection window); h2 answers each with RST_STREAM STREAM_CLOSED",
        lambda k, r: (
            k.error == r.error
            and not k.resets_sent
            and r.resets_sent
            and all(code == E.STREAM_CLOSED and k.streams[sid].reset is not None for sid, code in r.resets_sent.items())
        ),
    ),
    "floods-end-the-connection": Difference(
        "konbini counts what costs it work and the peer nothing (RST_STREAM, PING, SETTINGS, empty DATA per"
        " `Limits`, CONTINUATIONs per header block) and ends the connection with ENHANCE_YOUR_CALM one past a"
        " limit; h2 counts no floods, and ends an endless header block with PROTOCOL_ERROR",
        lambda k, r: (
            k.error == E.ENHANCE_YOUR_CALM
            and k.detail in FLOODS
            and (r.error is None or (r.error == E.PROTOCOL_ERROR and r.culprit == k.culprit))
        ),
    ),
    "refused-stream": Difference(
        "a stream beyond SETTINGS_MAX_CONCURRENT_STREAMS ends the connection with REFUSED_STREAM, a code RFC 9113"
        " §5.1.2 allows that tells the client the request was not processed; h2 says PROTOCOL_ERROR",
        lambda k, r: (
            (k.error, r.error) == (E.REFUSED_STREAM, E.PROTOCOL_ERROR)
            and k.detail == "beyond SETTINGS_MAX_CONCURRENT_STREAMS"
            and k.culprit == r.culprit
        ),
    ),
    "content-length-without-a-body": Difference(
        "a request that declares a content-length above 0 and ends with its HEADERS is malformed (RFC 9113 §8.1.1);"
        " h2 lets it through",
        lambda k, r: k.error == E.PROTOCOL_ERROR and k.detail == "content-length without a body",
    ),
    "content-length-checked-at-trailers": Difference(
        "a body that differs from its content-length is malformed however the stream ends (RFC 9113 §8.1.1); h2"
        " checks it only when DATA ends the stream, not trailers",
        lambda k, r: (
            k.error == E.PROTOCOL_ERROR
            and k.detail == "body length differs from content-length"
            and _kind(k.culprit) == HEADERS
        ),
    ),
    "stream-error-as-connection-error": Difference(
        "konbini ends the connection on a stream error (RFC 9113 §5.4.1 allows it), h2 resets the stream;"
        " the code is the same",
        lambda k, r: k.error is not None and r.resets_sent.get(_sid(k.culprit)) == k.error and not k.resets_sent,
    ),
    "client-preface-settings": Difference(
        "konbini takes nothing before the client's SETTINGS, as RFC 9113 §3.4 has it; h2 takes any first frame",
        lambda k, r: k.error == E.PROTOCOL_ERROR and k.detail == "the first frame is not SETTINGS",
    ),
    "hpack-compression-error": Difference(
        "a header block that does not decode is a COMPRESSION_ERROR (RFC 9113 §4.3); h2 says PROTOCOL_ERROR",
        lambda k, r: (
            (k.error, r.error) == (E.COMPRESSION_ERROR, E.PROTOCOL_ERROR)
            and r.detail.startswith("Error decoding header block")
            and k.culprit == r.culprit
            and _same_but(k, r, error=True)
        ),
    ),
    "frame-size-at-its-header": Difference(
        "konbini refuses a frame beyond its SETTINGS_MAX_FRAME_SIZE once its 9-byte header is in; h2 buffers the"
        " whole frame first, so a peer that never sends it holds h2's buffer",
        lambda k, r: (
            k.error == E.FRAME_SIZE_ERROR
            and k.detail.startswith("frame of")
            and (r.error is None or r.culprit == k.culprit)  # or h2 refused the same header for another of its fields
            and _same_but(k, r, error=True)
        ),
    ),
    "rst-on-an-idle-stream": Difference(
        "RST_STREAM on an idle stream is a connection error (RFC 9113 §6.4); h2 ignores it",
        lambda k, r: k.error == E.PROTOCOL_ERROR and k.detail == "RST_STREAM on an idle stream",
    ),
    "settings-frame-size": Difference(
        "a SETTINGS frame whose length is not a multiple of 6, or an ACK with a payload, is a FRAME_SIZE_ERROR"
        " (RFC 9113 §6.5); h2 says PROTOCOL_ERROR",
        lambda k, r: (
            k.error == E.FRAME_SIZE_ERROR
            and k.detail == "bad SETTINGS"
            and r.error == E.PROTOCOL_ERROR
            and k.culprit == r.culprit
        ),
    ),
    "window-update-reserved-bit": Difference(
        "the reserved bit of a WINDOW_UPDATE's increment is ignored (RFC 9113 §6.9); h2 rejects the frame",
        lambda k, r: (
            _kind(r.culprit) == WINDOW_UPDATE
            and r.culprit[9] & 0x80
            and r.detail == "Received frame with non-compliant data"
        ),
    ),
    "enable-connect-protocol-ignored": Difference(
        "konbini does not implement RFC 8441 and ignores SETTINGS_ENABLE_CONNECT_PROTOCOL as an unsupported"
        " setting (RFC 9113 §6.5.2); h2 checks its value",
        lambda k, r: r.detail.startswith("Setting 8 has invalid value"),
    ),
    "extension-frames-ignored": Difference(
        "konbini ignores every frame type beyond RFC 9113's (§5.5); h2 parses ALTSVC and ORIGIN and refuses"
        " malformed ones",
        lambda k, r: (_kind(r.culprit) or 0) >= 10 and r.detail == "Frame data missing or invalid",
    ),
    "frame-inside-a-header-block": Difference(
        "any frame but CONTINUATION inside a header block is a PROTOCOL_ERROR, whatever it holds; h2 first parses"
        " the frame and may name what is wrong with it",
        lambda k, r: (
            k.error == E.PROTOCOL_ERROR
            and k.detail == "a header block interrupted"
            and r.culprit == k.culprit
            and r.error is not None
        ),
    ),
    "self-dependency-checked-first": Difference(
        "a HEADERS frame whose priority names its own stream (RFC 9113 §5.3.1) is refused as it arrives, before"
        " its block is decoded; h2 decodes the block first, so it names a bad block or waits for the block's end",
        lambda k, r: (
            k.error == E.PROTOCOL_ERROR
            and k.detail == "a stream depending on itself"
            and _kind(k.culprit) == HEADERS
            and (not k.culprit[4] & END_HEADERS or (r.culprit == k.culprit and r.error is not None))
        ),
    ),
    "frame-header-checked-first": Difference(
        "h2 refuses a frame on the wrong stream as soon as its 9-byte header is in; konbini reads the whole frame"
        " first (its header timeout bounds the wait)",
        lambda k, r: (
            k.error is None
            and r.detail.startswith("Received frame with invalid header")
            and len(r.culprit) < 9 + int.from_bytes(r.culprit[:3], "big")
        ),
    ),
    "two-rules-one-frame": Difference(
        "a frame of the wrong length on the wrong stream breaks two rules; konbini names the length, h2 the stream",
        lambda k, r: (
            k.culprit == r.culprit
            and _breaks_two_rules(k.culprit)
            and {k.error, r.error} == {E.FRAME_SIZE_ERROR, E.PROTOCOL_ERROR}
        ),
    ),
}


def classify(k: Outcome, r: Outcome, side: str) -> str:
    """'agree', or the name of the deliberate difference that explains the disagreement."""
    if k == r:
        return "agree"
    for name, diff in DIFFERENCES.items():
        if (side == "client" or not diff.client_only) and diff.matches(k, r):
            return name
    raise AssertionError(f"konbini and h2 disagree:\nkonbini {k}\nh2      {r}")


def judge(k: Outcome, r: Outcome, what: str) -> str:
    verdict = classify(k, r, what.split()[0])
    TALLY[f"{what} cases"] += 1
    TALLY[f"{what} {verdict}"] += 1
    return verdict


# -- the server core against h2's server: valid exchanges from h2's client ------------------------

token = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12).map(str.encode)
value = st.binary(max_size=30).map(lambda b: bytes(33 + c % 94 for c in b))  # visible ASCII
extra_fields = st.lists(
    st.tuples(token.filter(lambda n: n not in (b"te", b"host", b"content-length", b"connection")), value), max_size=4
)


class Recorder:
    """h2 as the peer: each call's output becomes the chunks, its HEADERS optionally re-framed."""

    def __init__(self, data, *, client_side: bool) -> None:
        self.data = data
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=client_side, header_encoding=None))
        self.conn.initiate_connection()
        self.chunks: list[bytes] = []
        self.open: list[int] = []  # streams we may still send on

    def take(self) -> None:
        wire = self.conn.data_to_send()
        for part in cut(wire):
            self.chunks.extend(self.reframe(part))

    def reframe(self, part: bytes) -> list[bytes]:
        """A HEADERS frame as h2 writes it, or padded, with a priority, split into CONTINUATIONs."""
        if part[3] != HEADERS:
            return [part]
        flags, sid, block = part[4], struct.unpack(">L", part[5:9])[0], part[9:]
        pad = self.data.draw(st.sampled_from([None, 0, 3]), label="header padding")
        prio = self.data.draw(st.booleans(), label="header priority")
        pieces = self.data.draw(st.integers(1, 3), label="continuations")
        size = -(-len(block) // pieces) if block else 1
        parts = [block[i : i + size] for i in range(0, len(block), size)] or [b""]
        head = b""
        flags &= END_STREAM
        if pad is not None:
            flags |= PADDED
            head += bytes((pad,))
        if prio:
            flags |= PRIORITY_FLAG
            head += struct.pack(">LB", sid + 2 if sid > 1 else 0, 15)  # never on itself
        out = [frame(HEADERS, flags | (END_HEADERS if len(parts) == 1 else 0), sid, head + parts[0] + bytes(pad or 0))]
        for i, piece in enumerate(parts[1:], 2):
            out.append(frame(CONTINUATION, END_HEADERS if i == len(parts) else 0, sid, piece))
        return out

    def common(self, step: str) -> None:
        """The steps either end may take on the connection."""
        c, d = self.conn, self.data
        if step == "ping":
            c.ping(d.draw(st.binary(min_size=8, max_size=8), label="opaque"))
        elif step == "settings":
            choices = {
                SettingCodes.HEADER_TABLE_SIZE: st.sampled_from([0, 100, 4096, 65536]),
                SettingCodes.INITIAL_WINDOW_SIZE: st.sampled_from([0, 1, 65535, 1 << 20, 2**31 - 1]),
                SettingCodes.MAX_FRAME_SIZE: st.sampled_from([16384, 65536, 2**24 - 1]),
                SettingCodes.MAX_CONCURRENT_STREAMS: st.sampled_from([0, 1, 100]),
                SettingCodes.MAX_HEADER_LIST_SIZE: st.sampled_from([0, 1024, 1 << 20]),
            }
            keys = d.draw(st.sets(st.sampled_from(sorted(choices)), min_size=1), label="settings")
            c.update_settings({key: d.draw(choices[key], label=key.name) for key in sorted(keys)})
        elif step == "window":
            sid = d.draw(st.sampled_from([0, *self.open]), label="stream")
            c.increment_flow_control_window(d.draw(st.sampled_from([1, 1000, 1 << 24]), label="increment"), sid or None)
        self.take()

    def act(self) -> bool:
        """One step a well-behaved client may take; False once it has said GOAWAY."""
        c, d = self.conn, self.data
        step = d.draw(
            st.sampled_from(
                ["request", "request", "upload", "upload", "end", "trailers", "reset", "ping", "settings", "window"]
                + ["priority", "goaway"]
            ),
            label="step",
        )
        if step == "request" or (step in ("upload", "end", "trailers", "reset") and not self.open):
            sid = c.get_next_available_stream_id()
            body = d.draw(st.sampled_from([None, b"", b"x", b"y" * 1000, b"z" * 20000]), label="body")
            fields = [*(GET if body is None else REQUEST), *d.draw(extra_fields, label="fields")]
            if body:
                fields.append((b"content-length", str(len(body)).encode()))
            c.send_headers(sid, fields, end_stream=body is None)
            if body is not None:
                self.open.append(sid)
                if body and c.local_flow_control_window(sid) >= len(body):
                    for i in range(0, len(body), c.max_outbound_frame_size):
                        c.send_data(sid, body[i : i + c.max_outbound_frame_size])
                    c.end_stream(sid)
                    self.open.remove(sid)
        elif step == "upload":
            sid = d.draw(st.sampled_from(self.open), label="stream")
            chunk = d.draw(st.sampled_from([b"", b"a", b"b" * 5000, b"c" * 16000]), label="chunk")
            pad = d.draw(st.sampled_from([None, 0, 9, 255]), label="data padding")
            cost = len(chunk) + (0 if pad is None else pad + 1)
            if cost <= c.local_flow_control_window(sid) and len(chunk) + 256 <= c.max_outbound_frame_size:
                c.send_data(sid, chunk, pad_length=pad)
        elif step == "end":
            sid = d.draw(st.sampled_from(self.open), label="stream")
            c.end_stream(sid)
            self.open.remove(sid)
        elif step == "trailers":
            sid = d.draw(st.sampled_from(self.open), label="stream")
            c.send_headers(sid, d.draw(extra_fields, label="trailers") or [(b"x-sum", b"1")], end_stream=True)
            self.open.remove(sid)
        elif step == "reset":
            sid = d.draw(st.sampled_from(self.open), label="stream")
            c.reset_stream(sid, d.draw(st.sampled_from([0, 2, 8, 11]), label="code"))
            self.open.remove(sid)
        elif step in ("ping", "settings", "window"):
            self.common(step)
            return True
        elif step == "priority":
            sid = c.get_next_available_stream_id() if not self.open else d.draw(st.sampled_from(self.open))
            c.prioritize(sid, weight=d.draw(st.integers(1, 256), label="weight"), depends_on=0)
        else:
            c.close_connection(d.draw(st.sampled_from([0, 2, 11]), label="goaway code"))
            self.take()
            return False
        self.take()
        return True


@settings(max_examples=CASES, deadline=None, derandomize=True, database=None)
@given(st.data())
def test_the_server_core_decodes_what_h2_decodes_from_h2s_client(data) -> None:
    peer = Recorder(data, client_side=True)
    peer.take()
    for _ in range(data.draw(st.integers(1, 12), label="steps")):
        if not peer.act():
            break
    k = run_konbini(konbini_server(), peer.chunks)
    r = run_h2(reference(client_side=False), peer.chunks)
    judge(k, r, "server valid")  # h2's peer may still break a rule: overflow a window it raised by SETTINGS


@pytest.fixture(autouse=True, scope="module")
def _report():
    """The count of cases and of each verdict, for the log (pytest -s) and docs/http2.md."""
    yield
    print("\nh2 oracle:", ", ".join(f"{k} {v}" for k, v in sorted(TALLY.items())))


# -- the server core against h2's server: malformed input ----------------------------------------

stream_ids = st.sampled_from([0, 1, 1, 3, 3, 5, 2, 4, 0x7FFFFFFF, 0x80000003])
FIELD_NAMES = [b":method", b":path", b":scheme", b":authority", b":status", b":protocol", b":x", b"host"]
FIELD_NAMES += [b"x", b"X-Up", b"content-length", b"te", b"connection", b"keep-alive", b"x:y", b"", b"a b", b"\xff"]
FIELD_VALUES = [b"GET", b"POST", b"CONNECT", b"/", b"", b"https", b"router", b"other", b"trailers", b"gzip", b"0"]
FIELD_VALUES += [b"5", b" x", b"x\t", b"a\nb", b"a\x00b", b"a\rb", b"\x7f", b"\xff"]
field_lists = st.lists(st.tuples(st.sampled_from(FIELD_NAMES), st.sampled_from(FIELD_VALUES)), max_size=5)
header_lists = st.one_of(
    st.just(GET),
    st.just(REQUEST),
    field_lists,
    field_lists.map(lambda f: [*GET, *f]),
    field_lists.map(lambda f: [*f, *GET]),
    st.permutations(GET).map(lambda g: g[1:]),  # one pseudo-header missing
    st.just([*GET, (b"x-big", b"v" * 17000)]),  # beyond the header list limit
)


RESPONSE = [(b":status", b"200")]
response_lists = st.one_of(
    st.just(RESPONSE),
    st.just([(b":status", b"103")]),
    field_lists,
    field_lists.map(lambda f: [*RESPONSE, *f]),
    field_lists.map(lambda f: [*f, *RESPONSE]),
    st.sampled_from([b"", b"20", b"2000", b"abc", b"099", b"600", b"101"]).map(lambda s: [(b":status", s)]),
    st.just([*RESPONSE, (b"x-big", b"v" * 17000)]),
)


@st.composite
def header_block(draw, encoder: hpack.Encoder, lists=header_lists) -> bytes:
    """A header list through the connection's encoder (its dynamic table in step with the
    receiver's), or bytes HPACK cannot make sense of."""
    how = draw(st.sampled_from(["encoded", "encoded", "encoded", "garbage", "truncated"]))
    if how == "garbage":
        return draw(st.binary(min_size=1, max_size=20))
    block = encoder.encode(draw(lists), huffman=draw(st.booleans()))
    return block[: len(block) // 2] if how == "truncated" else block


@st.composite
def bad_frame(draw, encoder: hpack.Encoder, lists=header_lists) -> bytes:
    sid = draw(stream_ids)
    kind = draw(
        st.sampled_from(
            ["headers", "headers", "headers", "continuation", "data", "data", "rst", "settings", "ping", "window"]
            + ["priority", "goaway", "push", "unknown", "raw"]
        )
    )
    flags = draw(st.sampled_from([0, END_STREAM, END_HEADERS, END_STREAM | END_HEADERS, PADDED, 0xFF]))
    if kind == "headers":
        flags = draw(st.sampled_from([END_HEADERS, END_STREAM | END_HEADERS, 0, END_STREAM]))
        head = b""
        if draw(st.booleans()):
            flags |= PRIORITY_FLAG
            head += struct.pack(">LB", draw(stream_ids), 16)
        return frame(HEADERS, flags, sid, head + draw(header_block(encoder, lists)))
    if kind == "continuation":
        return frame(CONTINUATION, draw(st.sampled_from([0, END_HEADERS])), sid, draw(header_block(encoder, lists)))
    if kind == "data":
        payload = b"d" * draw(st.sampled_from([0, 1, 300, 16384, 65536]))
        if flags & PADDED:
            payload = bytes((draw(st.sampled_from([0, 10, 255])),)) + payload
        return frame(DATA, flags, sid, payload)
    if kind == "rst":
        return frame(
            RST_STREAM,
            0,
            sid,
            struct.pack(">L", draw(st.sampled_from([0, 1, 8, 11, 99])))[: draw(st.sampled_from([4, 4, 3]))],
        )
    if kind == "settings":
        values = st.sampled_from([0, 1, 2, 16383, 16384, 65535, 2**24 - 1, 2**24, 2**31 - 1, 2**31, 2**32 - 1])
        pairs = draw(st.lists(st.tuples(st.integers(0, 9), values), max_size=3))
        payload = b"".join(struct.pack(">HL", k, v) for k, v in pairs)
        return frame(
            SETTINGS,
            draw(st.sampled_from([0, 0, 0, ACK])),
            draw(st.sampled_from([0, 0, 0, 1])),
            payload[: draw(st.sampled_from([len(payload), len(payload), 5]))],
        )
    if kind == "ping":
        return frame(
            PING,
            draw(st.sampled_from([0, ACK])),
            draw(st.sampled_from([0, 0, 1])),
            b"p" * draw(st.sampled_from([8, 8, 7])),
        )
    if kind == "window":
        inc = draw(st.sampled_from([0, 1, 65535, 2**31 - 1, 2**32 - 1]))
        return frame(WINDOW_UPDATE, 0, sid, struct.pack(">L", inc)[: draw(st.sampled_from([4, 4, 2]))])
    if kind == "priority":
        return frame(
            PRIORITY,
            0,
            sid,
            struct.pack(">LB", draw(st.sampled_from([0, sid, 1, 3])), 7)[: draw(st.sampled_from([5, 5, 4]))],
        )
    if kind == "goaway":
        return frame(
            GOAWAY,
            0,
            draw(st.sampled_from([0, 0, 1])),
            struct.pack(">LL", 0, draw(st.sampled_from([0, 1, 2])))[: draw(st.sampled_from([8, 8, 6]))],
        )
    if kind == "push":
        return frame(PUSH_PROMISE, END_HEADERS, sid, struct.pack(">L", 2) + encoder.encode(GET))
    if kind == "unknown":
        return frame(draw(st.integers(10, 255)), flags, sid, draw(st.binary(max_size=10)))
    return draw(st.binary(min_size=1, max_size=30))  # no frame at all


@settings(
    max_examples=CASES, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(st.data())
def test_the_server_core_accepts_and_rejects_what_h2_does(data) -> None:
    encoder = hpack.Encoder()
    first = data.draw(st.sampled_from([frame(SETTINGS, 0, 0), frame(SETTINGS, 0, 0), b""]), label="settings first")
    frames = data.draw(st.lists(bad_frame(encoder), min_size=1, max_size=8), label="frames")
    chunks = [PREFACE + first, *frames]
    k = run_konbini(konbini_server(), chunks)
    r = run_h2(reference(client_side=False), chunks)
    judge(k, r, "server malformed")


# -- the client core against h2's client: responses from h2's server -------------------------------


def _requested(data) -> tuple[list[tuple[list, bool]], Callable[[], object], h2.connection.H2Connection]:
    """The same requests opened on konbini's client core and on h2's client; konbini's bytes, which
    h2's server as the peer reads first."""
    requests = data.draw(st.lists(st.tuples(st.sampled_from([GET, REQUEST]), st.booleans()), min_size=1, max_size=4))
    core, ref = konbini_client(), reference(client_side=True)
    for fields, end in requests:
        st_ = core.send_request(fields, end_stream=end)
        ref.send_headers(st_.id, fields, end_stream=end)
    ref.data_to_send()
    return requests, core, ref


class Responder(Recorder):
    """h2's server answering konbini's requests as a well-behaved server may."""

    def __init__(self, data, wire: bytes) -> None:
        super().__init__(data, client_side=False)
        for ev in self.conn.receive_data(wire):
            if isinstance(ev, h2.events.RequestReceived):
                self.open.append(ev.stream_id)
        self.answered: set[int] = set()
        self.take()

    def act(self) -> bool:
        c, d = self.conn, self.data
        steps = ["respond", "respond", "download", "download", "end", "trailers", "reset", "ping", "settings"]
        step = d.draw(st.sampled_from([*steps, "window", "goaway"]), label="step")
        answered = [sid for sid in self.open if sid in self.answered]
        if step == "respond" or (step in ("download", "end", "trailers") and not answered):
            waiting = [sid for sid in self.open if sid not in self.answered]
            if not waiting:
                return True
            sid = d.draw(st.sampled_from(waiting), label="stream")
            if d.draw(st.booleans(), label="informational first"):
                c.send_headers(sid, [(b":status", d.draw(st.sampled_from([b"100", b"103"])))])
            status = d.draw(st.sampled_from([b"200", b"204", b"404", b"503"]), label="status")
            end = d.draw(st.booleans(), label="end with headers")
            c.send_headers(sid, [(b":status", status), *d.draw(extra_fields, label="fields")], end_stream=end)
            self.answered.add(sid)
            if end:
                self.open.remove(sid)
        elif step == "download":
            sid = d.draw(st.sampled_from(answered), label="stream")
            chunk = d.draw(st.sampled_from([b"", b"a", b"b" * 5000, b"c" * 16000]), label="chunk")
            pad = d.draw(st.sampled_from([None, 0, 9, 255]), label="data padding")
            cost = len(chunk) + (0 if pad is None else pad + 1)
            if cost <= c.local_flow_control_window(sid) and len(chunk) + 256 <= c.max_outbound_frame_size:
                c.send_data(sid, chunk, pad_length=pad, end_stream=d.draw(st.booleans(), label="last"))
                if c.streams[sid].closed or c.streams[sid].state_machine.state.name == "HALF_CLOSED_LOCAL":
                    self.open.remove(sid)
        elif step == "end":
            sid = d.draw(st.sampled_from(answered), label="stream")
            c.end_stream(sid)
            self.open.remove(sid)
        elif step == "trailers":
            sid = d.draw(st.sampled_from(answered), label="stream")
            c.send_headers(sid, d.draw(extra_fields, label="trailers") or [(b"x-sum", b"1")], end_stream=True)
            self.open.remove(sid)
        elif step == "reset":
            if self.open:
                sid = d.draw(st.sampled_from(self.open), label="stream")
                c.reset_stream(sid, d.draw(st.sampled_from([0, 2, 7, 8, 11]), label="code"))
                self.open.remove(sid)
        elif step in ("ping", "settings", "window"):
            self.common(step)
            return True
        else:
            c.close_connection(d.draw(st.sampled_from([0, 2, 11]), label="goaway code"))
            self.take()
            return False
        self.take()
        return True


@settings(max_examples=CASES, deadline=None, derandomize=True, database=None)
@given(st.data())
def test_the_client_core_decodes_what_h2_decodes_from_h2s_server(data) -> None:
    _requests, core, ref = _requested(data)
    peer = Responder(data, core.data_to_send())
    for _ in range(data.draw(st.integers(1, 12), label="steps")):
        if not peer.act():
            break
    k = run_konbini(core, peer.chunks)
    r = run_h2(ref, peer.chunks)
    judge(k, r, "client valid")  # h2's peer may still break a rule: overflow a window it raised by SETTINGS


@settings(max_examples=CASES, deadline=None, derandomize=True, database=None)
@given(st.data())
def test_the_client_core_accepts_and_rejects_what_h2_does(data) -> None:
    _requests, core, ref = _requested(data)
    encoder = hpack.Encoder()
    first = data.draw(st.sampled_from([frame(SETTINGS, 0, 0), frame(SETTINGS, 0, 0), b""]), label="settings first")
    frames = data.draw(st.lists(bad_frame(encoder, response_lists), min_size=1, max_size=8), label="frames")
    chunks = [first, *frames] if first else frames
    k = run_konbini(core, chunks)
    r = run_h2(ref, chunks)
    judge(k, r, "client malformed")


# -- each difference on purpose, and each bug the referee found, pinned -----------------------------

SERVER_START = PREFACE + frame(SETTINGS, 0, 0)


def _block(fields: list[tuple[bytes, bytes]]) -> bytes:
    return hpack.Encoder().encode(fields)


def _pair(side: str, limits: Limits | None = None) -> tuple[object, h2.connection.H2Connection]:
    """Fresh receivers; a client side has stream 1 (a GET, ended) and 3 (a POST, open) open."""
    if side == "server":
        return konbini_server(limits), reference(client_side=False, limits=limits)
    core, ref = konbini_client(), reference(client_side=True)
    for fields, end in ((GET, True), (REQUEST, False)):
        ref.send_headers(core.send_request(fields, end_stream=end).id, fields, end_stream=end)
    ref.data_to_send()
    return core, ref


def verdict(side: str, chunks: list[bytes], limits: Limits | None = None) -> tuple[str, Outcome]:
    core, ref = _pair(side, limits)
    k = run_konbini(core, chunks)
    return judge(k, run_h2(ref, chunks), f"{side} pinned"), k


EXAMPLES: dict[str, tuple[str, list[bytes]] | tuple[str, list[bytes], Limits]] = {
    "floods-end-the-connection": ("server", [SERVER_START, *[frame(PING, 0, 0, bytes(8))] * 4], Limits(max_pings=3)),
    "refused-stream": (
        "server",
        [SERVER_START, *(frame(HEADERS, END_HEADERS, sid, _block(GET)) for sid in (1, 3, 5))],
        Limits(max_concurrent_streams=2),
    ),
    "content-length-checked-at-trailers": (
        "server",
        [SERVER_START, frame(HEADERS, END_HEADERS, 1, _block([*REQUEST, (b"content-length", b"5")]))]
        + [frame(DATA, 0, 1, b"xy"), frame(HEADERS, END_HEADERS | END_STREAM, 1, _block([(b"x-t", b"1")]))],
    ),
    "content-length-without-a-body": (
        "server",
        [SERVER_START, frame(HEADERS, END_HEADERS | END_STREAM, 1, _block([*GET, (b"content-length", b"5")]))],
    ),
    "response-fields-not-validated": (
        "client",
        [frame(SETTINGS, 0, 0), frame(HEADERS, END_HEADERS, 3, _block([*RESPONSE, (b"X-Up", b"1")]))],
    ),
    "frames-after-the-peers-reset": (
        "server",
        [SERVER_START, frame(HEADERS, END_HEADERS, 1, _block(REQUEST)), frame(RST_STREAM, 0, 1, bytes(4))]
        + [frame(DATA, 0, 1, b"x")],
    ),
    "stream-error-as-connection-error": (
        "server",
        [SERVER_START, frame(HEADERS, END_HEADERS | END_STREAM, 1, _block(GET)), frame(DATA, 0, 1, b"x")],
    ),
    "client-preface-settings": ("server", [PREFACE + frame(PING, 0, 0, bytes(8))]),
    "hpack-compression-error": ("server", [SERVER_START, frame(HEADERS, END_HEADERS, 1, b"\xff\xff\xff\xff")]),
    "frame-size-at-its-header": ("server", [SERVER_START, frame(DATA, 0, 1, bytes(70000))[:100]]),
    "rst-on-an-idle-stream": (
        "server",
        [SERVER_START, frame(HEADERS, END_HEADERS | END_STREAM, 3, _block(GET)), frame(RST_STREAM, 0, 2, bytes(4))],
    ),
    "settings-frame-size": ("server", [SERVER_START, frame(SETTINGS, ACK, 0, bytes(6))]),
    "window-update-reserved-bit": ("server", [SERVER_START, frame(WINDOW_UPDATE, 0, 0, b"\x80\x00\x00\x01")]),
    "enable-connect-protocol-ignored": ("server", [SERVER_START, frame(SETTINGS, 0, 0, struct.pack(">HL", 8, 2))]),
    "extension-frames-ignored": ("server", [SERVER_START, frame(10, 0, 0, b"\x00")]),
    "frame-inside-a-header-block": (
        "server",
        [SERVER_START, frame(HEADERS, 0, 1, _block(GET)), frame(PING, 0, 0, b"short")],
    ),
    "self-dependency-checked-first": (
        "server",
        [SERVER_START, frame(HEADERS, PRIORITY_FLAG, 1, struct.pack(">LB", 1, 16) + _block(GET))],
    ),
    "two-rules-one-frame": ("server", [SERVER_START, frame(PING, 0, 1, b"1234567")]),
    "frame-header-checked-first": ("server", [SERVER_START, frame(DATA, 0, 0, b"x")[:9]]),
}


@pytest.mark.parametrize("name", list(DIFFERENCES))
def test_each_deliberate_difference_is_met_by_its_example(name: str) -> None:
    assert verdict(*EXAMPLES[name])[0] == name


def test_an_endless_header_block_is_a_flood_to_konbini_and_an_error_to_h2() -> None:
    chunks = [SERVER_START, frame(HEADERS, 0, 1, _block(GET)), *[frame(CONTINUATION, 0, 1)] * 70]
    assert verdict("server", chunks)[0] == "floods-end-the-connection"


# Where h2 showed konbini's core wrong: konbini now rejects each as h2 does (the GOAWAY code; a stream
# error konbini takes as a connection error), where before it accepted the frame.
FOUND: dict[str, tuple[str, list[bytes], int]] = {
    "goaway-shorter-than-8-bytes": ("server", [SERVER_START, frame(GOAWAY, 0, 0, bytes(6))], E.FRAME_SIZE_ERROR),
    "goaway-on-a-stream": ("server", [SERVER_START, frame(GOAWAY, 0, 1, bytes(8))], E.PROTOCOL_ERROR),
    "priority-on-itself": ("server", [SERVER_START, frame(PRIORITY, 0, 3, struct.pack(">LB", 3, 7))], E.PROTOCOL_ERROR),
    "headers-depending-on-itself": (
        "server",
        [SERVER_START, frame(HEADERS, END_HEADERS | PRIORITY_FLAG, 1, struct.pack(">LB", 1, 16) + _block(GET))],
        E.PROTOCOL_ERROR,
    ),
    "headers-on-a-stream-the-client-did-not-open": (
        "client",
        [frame(SETTINGS, 0, 0), frame(HEADERS, END_HEADERS, 5, _block(RESPONSE))],
        E.PROTOCOL_ERROR,
    ),
    "headers-on-an-even-stream": (
        "client",
        [frame(SETTINGS, 0, 0), frame(HEADERS, END_HEADERS, 2, _block(RESPONSE))],
        E.PROTOCOL_ERROR,
    ),
    "data-before-the-response-headers": (
        "client",
        [frame(SETTINGS, 0, 0), frame(DATA, 0, 3, b"body")],
        E.PROTOCOL_ERROR,
    ),
    "informational-response-ending-the-stream": (
        "client",
        [frame(SETTINGS, 0, 0), frame(HEADERS, END_HEADERS | END_STREAM, 3, _block([(b":status", b"103")]))],
        E.PROTOCOL_ERROR,
    ),
    "enable-push-from-a-server": (
        "client",
        [frame(SETTINGS, 0, 0, struct.pack(">HL", 2, 1))],
        E.PROTOCOL_ERROR,
    ),
    "trailers-without-end-stream": (
        "client",
        [frame(SETTINGS, 0, 0), frame(HEADERS, END_HEADERS, 3, _block(RESPONSE))]
        + [frame(HEADERS, END_HEADERS, 3, _block([(b"x-t", b"1")]))],
        E.PROTOCOL_ERROR,
    ),
    "headers-after-end-stream": (
        "client",
        [frame(SETTINGS, 0, 0), frame(HEADERS, END_HEADERS | END_STREAM, 1, _block(RESPONSE))]
        + [frame(HEADERS, END_HEADERS | END_STREAM, 1, _block([(b"x-late", b"1")]))],
        E.STREAM_CLOSED,
    ),
}


@pytest.mark.parametrize("name", list(FOUND))
def test_what_h2_found_wrong_in_konbini_stays_fixed(name: str) -> None:
    side, chunks, code = FOUND[name]
    found, k = verdict(side, chunks)
    assert found in ("agree", "stream-error-as-connection-error") and k.error == code
