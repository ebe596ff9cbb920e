"""One byte stream, two receivers: a konbini HTTP/2 core and python-hyper's h2 set up to advertise the
same settings, each reduced to one comparable `Outcome` (tests/test_h2_oracle.py, docs/http2.md).

This is the only module of the differential tests that names konbini's cores, so a core moving
house changes the imports below and nothing else.

Both receivers get the same chunks, one `receive_data` call each, and stop after the first chunk
that ends the connection: what a chunk decoded before an error is what the last good chunk left
(h2 drops a failing call's events; konbini's stream table keeps them). Neither consumer acks DATA,
so each side's receive windows are the ones it advertised.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.settings import SettingCodes
from h2.stream import StreamState

from gateway.protocol.errors import ConnectionClosed
from gateway.protocol.frames import CONNECTION_WINDOW, MAX_FRAME_SIZE, STREAM_WINDOW
from gateway.protocol.h2lean import LeanClientCore, LeanServerCore
from topology.spec.model import Limits

Core = LeanServerCore | LeanClientCore
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_DATA, _HEADERS, _RST_STREAM, _SETTINGS, _PING, _GOAWAY = 0, 1, 3, 4, 6, 7


def konbini_server(limits: Limits | None = None) -> LeanServerCore:
    """A server core as a node runs it: with its limits, on a clock that never moves (floods are
    counted, never forgiven, within one case)."""
    return LeanServerCore(limits=limits or Limits(), clock=lambda: 0.0)


def konbini_client() -> LeanClientCore:
    return LeanClientCore()


def reference(*, client_side: bool, limits: Limits | None = None) -> h2.connection.H2Connection:
    """h2 advertising what konbini's core advertises (frame size, windows, stream and header list
    limits, no push) and holding itself to it from the start, as konbini does."""
    lim = limits or Limits()
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=client_side, header_encoding=None))
    conn.local_settings = h2.settings.Settings(
        client=client_side,
        initial_values={
            SettingCodes.ENABLE_PUSH: 0,
            SettingCodes.MAX_CONCURRENT_STREAMS: lim.max_concurrent_streams,
            SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            SettingCodes.MAX_FRAME_SIZE: MAX_FRAME_SIZE,
            SettingCodes.MAX_HEADER_LIST_SIZE: lim.max_header_list_size,
        },
    )
    conn.max_inbound_frame_size = MAX_FRAME_SIZE
    conn.decoder.max_header_list_size = lim.max_header_list_size
    conn.initiate_connection()
    conn.increment_flow_control_window(CONNECTION_WINDOW - 65535)
    conn.data_to_send()
    return conn


@dataclass
class StreamView:
    """What the receiver decoded on one stream: the peer's message and whether the peer reset it."""

    headers: tuple | None = None
    body: bytes = b""
    trailers: tuple | None = None
    ended: bool = False
    reset: int | None = None  # the peer's RST_STREAM code


@dataclass
class Outcome:
    """One receiver's verdict on a byte stream, in a form both sides reach."""

    error: int | None = None  # the GOAWAY code it closed the connection with, None while it accepts
    goaway: bool = False  # the peer ended the connection
    streams: dict[int, StreamView] = field(default_factory=dict)
    resets_sent: dict[int, int] = field(default_factory=dict)  # stream errors: RST_STREAM it sent, by stream
    pings: tuple[bytes, ...] = ()  # the opaque data of each PING it acked
    settings_acks: int = 0
    send_window: int = 0  # the connection window the peer gave it
    stream_windows: dict[int, int] = field(default_factory=dict)  # the same per stream still open both ways
    max_frame_size: int = 0  # the peer's SETTINGS_MAX_FRAME_SIZE as it applies it
    detail: str = field(default="", compare=False)  # the rule it said was broken, for the allow-list and the reader
    culprit: bytes = field(default=b"", compare=False)  # the chunk that ended the connection

    def settle(self) -> Outcome:
        """Once the connection ended with an error, the windows it left mean nothing (konbini may have
        applied half a SETTINGS frame)."""
        if self.error is not None:
            self.send_window, self.stream_windows = 0, {}
        return self

    def summary(self) -> str:
        if self.error is not None:
            return f"GOAWAY {self.error}"
        return "goaway received" if self.goaway else "open"


def _frames(wire: bytes):
    pos = 0
    while pos + 9 <= len(wire):
        length = int.from_bytes(wire[pos : pos + 3], "big")
        kind, flags, sid = wire[pos + 3], wire[pos + 4], struct.unpack(">L", wire[pos + 5 : pos + 9])[0]
        yield kind, flags, sid, wire[pos + 9 : pos + 9 + length]
        pos += 9 + length


def _read_output(out: Outcome, wire: bytes) -> None:
    """What the receiver answered: GOAWAY, stream resets, PING and SETTINGS acks."""
    for kind, flags, sid, payload in _frames(wire):
        if kind == _GOAWAY:
            out.error = struct.unpack(">L", payload[4:8])[0]
        elif kind == _RST_STREAM:
            out.resets_sent.setdefault(sid, struct.unpack(">L", payload)[0])
        elif kind == _PING and flags & 1:
            out.pings += (payload,)
        elif kind == _SETTINGS and flags & 1:
            out.settings_acks += 1


def run_konbini(core: Core, chunks: list[bytes]) -> Outcome:
    out = Outcome()
    core.data_to_send()  # its own preface and SETTINGS
    resets: dict[int, int] = {}
    for chunk in chunks:
        try:
            core.receive_data(chunk)
        except ConnectionClosed as exc:
            out.detail = str(exc.__cause__ or exc)
        _read_output(out, core.data_to_send())
        if core.closed:
            out.culprit = chunk
            out.goaway = core.close_reason == "goaway"
            break
        resets = {sid: st.reset_code for sid, st in core.streams.items() if st.reset_code is not None}
    for sid, st in sorted(core.streams.items()):
        if st.headers is None and sid not in resets:
            continue
        body = b"".join(bytes(data) for data, _ in st.chunks)
        view = out.streams[sid] = StreamView(_fields(st.headers), body, _fields(st.trailers), st.ended, resets.get(sid))
        state = core._state.get(sid)  # the per-stream send window has no public name
        if not (view.reset is not None or state is None or state.reset or state.ended):
            out.stream_windows[sid] = state.window
    out.send_window = core.send_window
    out.max_frame_size = core.max_frame_size
    return out.settle()


def run_h2(conn: h2.connection.H2Connection, chunks: list[bytes]) -> Outcome:
    out = Outcome()
    for chunk in chunks:
        try:
            events = conn.receive_data(chunk)
        except h2.exceptions.ProtocolError as exc:
            out.detail, events = str(exc) or type(exc).__name__, []
        for ev in events:
            _record(out, ev)
        _read_output(out, conn.data_to_send())
        if out.error is not None or out.goaway:
            out.culprit = chunk
            break
    out.send_window = conn.outbound_flow_control_window
    for sid, view in out.streams.items():
        stream = conn.streams.get(sid)
        sending = stream is not None and stream.state_machine.state in (
            StreamState.OPEN,
            StreamState.HALF_CLOSED_REMOTE,
        )
        if sending and view.reset is None and sid not in out.resets_sent:
            out.stream_windows[sid] = stream.outbound_flow_control_window
    out.max_frame_size = conn.max_outbound_frame_size
    return out.settle()


def _record(out: Outcome, ev: h2.events.Event) -> None:
    if isinstance(ev, (h2.events.RequestReceived, h2.events.ResponseReceived)):
        out.streams[ev.stream_id] = StreamView(_fields(ev.headers))
    elif isinstance(ev, h2.events.DataReceived):
        out.streams[ev.stream_id].body += ev.data
    elif isinstance(ev, h2.events.TrailersReceived):
        out.streams[ev.stream_id].trailers = _fields(ev.headers)
    elif isinstance(ev, h2.events.StreamReset) and ev.remote_reset:
        out.streams.setdefault(ev.stream_id, StreamView()).reset = ev.error_code
    elif isinstance(ev, h2.events.ConnectionTerminated):
        out.goaway = True
    if isinstance(ev, h2.events.StreamEnded) and ev.stream_id in out.streams:
        out.streams[ev.stream_id].ended = True


def _fields(headers) -> tuple | None:
    return None if headers is None else tuple((bytes(n), bytes(v)) for n, v in headers)
