"""h2 itself as the other end of a lean core in the sans-IO tests: an implementation we did not
write. `H2Peer` (tests/test_h2lean*.py), with the frame size and window it asks for, records what
arrives per stream and acks every DATA frame as it comes; `H2End` (tests/test_int1.py) is driven
as a core is, through a `StreamState` per stream, and acks what its consumer takes."""

from __future__ import annotations

import contextlib
import random
from collections import deque

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from gateway.protocol.errors import ConnectionClosed
from gateway.protocol.frames import CANCEL, CONNECTION_WINDOW, MAX_FRAME_SIZE, STREAM_WINDOW
from gateway.protocol.streams import Headers, StreamState
from topology.spec.model import Limits


class H2Peer:
    def __init__(self, *, client_side: bool, max_frame: int = 16384, window: int = 65535) -> None:
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=client_side, header_encoding=None))
        self.conn.local_settings = h2.settings.Settings(
            client=client_side,
            initial_values={
                h2.settings.SettingCodes.MAX_FRAME_SIZE: max_frame,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window,
            },
        )
        self.conn.max_inbound_frame_size = max_frame  # h2 applies initial values without waiting for the ack
        self.conn.initiate_connection()
        self.bodies: dict[int, bytearray] = {}
        self.ended: set[int] = set()
        self.headers: dict[int, list] = {}  # a request's (server) or a response's (client)
        self.trailers: dict[int, list] = {}
        self.resets: dict[int, int] = {}
        self.goaway: int | None = None
        self.pings = 0

    def feed(self, data: bytes) -> None:
        for ev in self.conn.receive_data(data):
            if isinstance(ev, (h2.events.RequestReceived, h2.events.ResponseReceived)):
                self.headers[ev.stream_id] = ev.headers
                self.bodies[ev.stream_id] = bytearray()
            elif isinstance(ev, h2.events.DataReceived):
                self.bodies[ev.stream_id] += ev.data
                self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.TrailersReceived):
                self.trailers[ev.stream_id] = ev.headers
            elif isinstance(ev, h2.events.StreamReset):
                self.resets[ev.stream_id] = ev.error_code
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self.goaway = ev.error_code
            elif isinstance(ev, h2.events.PingAckReceived):
                self.pings += 1
            if getattr(ev, "stream_ended", None) is not None or isinstance(ev, h2.events.StreamEnded):
                self.ended.add(ev.stream_id)

    def out(self) -> bytes:
        return self.conn.data_to_send()


def pieces(data: bytes, rng: random.Random) -> list[bytes]:
    """`data` cut as TCP may deliver it: pieces of 1 byte to beyond a frame."""
    out, i = [], 0
    while i < len(data):
        n = rng.choice((1, 2, 7, 9, 100, 4096, 70000))
        out.append(data[i : i + n])
        i += n
    return out


class H2End:
    """h2 as an independent end of a connection, driven through the calls of `interfaces.Core`
    that the sans-IO relay tests make (tests/test_int1.py): requests and responses, bodies taken and
    acked by the consumer, resets. Unlike the lean cores' static-table encoder, h2's HPACK encoder
    indexes every field it sends, so a lean core facing it keeps a real dynamic table. It advertises
    what konbini's cores advertise (frame size, windows, stream and header list limits, no push)."""

    def __init__(self, *, client_side: bool) -> None:
        lim = Limits()
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=client_side, header_encoding=None))
        self.conn.local_settings = h2.settings.Settings(
            client=client_side,
            initial_values={
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: lim.max_concurrent_streams,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                h2.settings.SettingCodes.MAX_FRAME_SIZE: MAX_FRAME_SIZE,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: lim.max_header_list_size,
            },
        )
        self.conn.max_inbound_frame_size = MAX_FRAME_SIZE
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self.streams: dict[int, StreamState] = {}
        self.new_requests: deque[StreamState] = deque()  # server side
        self.closed = False

    def receive_data(self, data: bytes) -> set[int]:
        """As a core: the stream ids woken; ConnectionClosed (GOAWAY queued) when the peer broke the protocol."""
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self.conn.close_connection(error_code=h2.errors.ErrorCodes.PROTOCOL_ERROR)
            self._close()
            raise ConnectionClosed(str(exc)) from exc
        woken: set[int] = set()
        for ev in events:
            sid = getattr(ev, "stream_id", 0) or 0
            woken.add(sid)
            if isinstance(ev, h2.events.ConnectionTerminated):
                self._close()
                continue
            if isinstance(ev, h2.events.RequestReceived):
                self.streams[sid] = StreamState(sid)
                self.new_requests.append(self.streams[sid])
            st = self.streams.get(sid)
            if isinstance(ev, h2.events.DataReceived):
                if st is None or st.reset_code is not None:  # a stream we let go of: connection credit
                    self.conn.acknowledge_received_data(ev.flow_controlled_length, sid)
                    continue
                st.chunks.append((ev.data, ev.flow_controlled_length))
                st.buffered += len(ev.data)
            if st is None:
                continue
            if isinstance(ev, (h2.events.RequestReceived, h2.events.ResponseReceived)):
                st.headers = ev.headers
            elif isinstance(ev, h2.events.TrailersReceived):
                st.trailers = ev.headers
            elif isinstance(ev, h2.events.StreamReset) and st.reset_code is None:
                st.reset_code = ev.error_code
            if isinstance(ev, h2.events.StreamEnded) or getattr(ev, "stream_ended", None) is not None:
                st.ended = True
        return woken

    def data_to_send(self) -> bytes:
        return self.conn.data_to_send()

    def send_request(self, headers: Headers, end_stream: bool) -> StreamState:
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, headers, end_stream=end_stream)
        st = self.streams[sid] = StreamState(sid)
        return st

    def send_headers(self, stream_id: int, headers: Headers, end_stream: bool = False) -> None:
        self.conn.send_headers(stream_id, headers, end_stream=end_stream)

    def send_data(self, stream_id: int, data: bytes | memoryview, end_stream: bool = False) -> int:
        """As much of `data` as the windows allow, in frames of the peer's size; the count taken."""
        n = min(self.conn.local_flow_control_window(stream_id), len(data))
        size = self.conn.max_outbound_frame_size
        for start in range(0, n, size):
            stop = min(start + size, n)
            self.conn.send_data(stream_id, data[start:stop], end_stream=end_stream and stop == len(data))
        return n

    def end_stream(self, stream_id: int, trailers: Headers | None = None) -> None:
        if trailers:
            self.conn.send_headers(stream_id, trailers, end_stream=True)
        else:
            self.conn.end_stream(stream_id)

    def take_chunk(self, st: StreamState) -> bytes | None:
        """The stream's next chunk, not yet acked; padding is acked here, as the cores do."""
        if not st.chunks:
            return None
        data, flow = st.chunks.popleft()
        st.buffered -= len(data)
        if flow > len(data):
            self.ack(st.id, flow - len(data))
        return data

    def ack(self, stream_id: int, nbytes: int) -> None:
        if nbytes and not self.closed:
            self.conn.acknowledge_received_data(nbytes, stream_id)

    def reset(self, stream_id: int, code: int = CANCEL) -> None:
        """Cancel the stream (unread bytes go back to the connection window); idempotent."""
        st = self.streams.get(stream_id)
        if st is not None and st.reset_code is None:
            st.reset_code = code
            self.ack(stream_id, sum(flow for _, flow in st.chunks))
            st.chunks.clear()
            st.buffered = 0
        if not self.closed:
            with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                self.conn.reset_stream(stream_id, error_code=code)

    def forget(self, stream_id: int) -> None:
        st = self.streams.pop(stream_id, None)
        if st is not None and st.chunks:
            self.ack(stream_id, sum(flow for _, flow in st.chunks))
            st.chunks.clear()

    def _close(self) -> None:
        self.closed = True
        for st in self.streams.values():
            if st.reset_code is None and not st.ended:
                st.reset_code = CANCEL
