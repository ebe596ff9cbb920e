"""The monitoring scrape's client (topology/check/scrape.py) reads an answer to the end of its
HTTP/1.1 message, as h11 frames it: a chunked body arrives decoded, and a node that keeps the
connection open after a complete answer is no hang."""

from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path

import pytest

from topology.check.scrape import scrape
from topology.pki import PKI
from topology.policy.monitoring import METRICS_PORT

NODE = "store-router-a1"
ADDRESS = "127.77.0.1"  # a loopback address no topology uses
METRICS = b"konbini_scrapes_total 3.0\n"
ANSWERS = {
    "content-length": b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n\r\n%s"
    % (len(METRICS), METRICS),
    "chunked": b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(METRICS), METRICS),
}


class KeepAliveNode:
    """A metrics port that answers one scrape with `answer` and holds the connection open until
    the test ends (as a keep-alive server does)."""

    def __init__(self, pki: PKI, answer: bytes) -> None:
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ctx.load_cert_chain(*(str(p) for p in pki.node_paths(NODE)))
        self.ctx.set_alpn_protocols(["http/1.1"])
        self.answer = answer
        self.done = threading.Event()
        self.listener = socket.create_server((ADDRESS, METRICS_PORT))
        self.thread = threading.Thread(target=self.serve, daemon=True)

    def serve(self) -> None:
        tcp, _ = self.listener.accept()
        with self.ctx.wrap_socket(tcp, server_side=True) as tls:
            head = b""
            while b"\r\n\r\n" not in head:
                head += tls.recv(4096)
            tls.sendall(self.answer)
            self.done.wait(30)  # open until the scrape returned (or the test gave up)

    def __enter__(self) -> KeepAliveNode:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()
        self.listener.close()


@pytest.mark.parametrize("framing", sorted(ANSWERS))
def test_a_scrape_reads_the_whole_message_and_not_to_the_connections_close(state: Path, topo, framing: str):
    pki = PKI.ensure(state, topo)
    with KeepAliveNode(pki, ANSWERS[framing]):
        assert scrape(pki, NODE, ADDRESS, ADDRESS, timeout=3.0) == METRICS.decode()
