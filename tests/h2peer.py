"""h2 itself as the other end of a lean core in the sans-IO tests (tests/test_h2lean*.py): an
implementation we did not write, with the frame size and window it asks for, recording what
arrives per stream and acking every DATA frame as it comes."""

from __future__ import annotations

import random

import h2.config
import h2.connection
import h2.events
import h2.settings


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
