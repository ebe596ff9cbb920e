"""The private parts of trio that konbini reads, as it reads them: pyproject.toml pins trio to the
versions these were checked on, and this fails when an upgrade moves or changes one.

`gateway.protocol.tlsrecords.TLSRecords` takes over an established SSLStream's SSLObject, its two
memory BIOs and the session tickets trio holds back (`_ssl_object`, `_incoming`, `_outgoing`,
`_delayed_outgoing`) and writes to the kernel socket under a SocketStream (`.socket._sock`);
`h2trio.TrioH2._receive` reads `_ssl_object` too, and `gateway.node.server._send_alert` sends what
`_outgoing` holds after a failed handshake."""

from __future__ import annotations

import socket
import ssl
import tomllib
from importlib.metadata import version
from pathlib import Path

import trio
import trio.testing
from packaging.requirements import Requirement

from tests.test_tlsrecords import _pair

ROOT = Path(__file__).resolve().parent.parent


def test_the_installed_trio_is_within_the_pinned_range() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    trio_req = next(Requirement(d) for d in deps if Requirement(d).name == "trio")
    assert trio_req.specifier, "trio must be pinned to the versions whose internals konbini reads"
    assert trio_req.specifier.contains(version("trio")), (trio_req, version("trio"))


async def test_an_established_ssl_streams_private_fields_are_there_and_work_as_read(state, topo) -> None:
    client, server = await _pair(state, topo)
    for stream in (client, server):
        obj = stream._ssl_object
        assert isinstance(obj, ssl.SSLObject) and obj.version() == "TLSv1.3"
        assert isinstance(stream._incoming, ssl.MemoryBIO) and isinstance(stream._outgoing, ssl.MemoryBIO)
        assert not stream._outgoing.pending  # the handshake's bytes went out
    # a TLS 1.3 server's session tickets wait for its first send, as bytes
    tickets = server._delayed_outgoing
    assert isinstance(tickets, bytes) and tickets
    assert client._delayed_outgoing is None
    # driving the SSLObject and BIOs by hand: what one side encrypts, the other decrypts
    server._ssl_object.write(b"by hand")
    client._incoming.write(tickets + server._outgoing.read())
    assert client._ssl_object.read(100) == b"by hand"


async def test_a_socket_streams_kernel_socket_is_at_socket_dot_sock() -> None:
    a, b = trio.socket.socketpair()
    with a, b:
        stream = trio.SocketStream(a)
        raw = stream.socket._sock
        assert isinstance(raw, socket.socket) and raw.fileno() == a.fileno()
        raw.send(b"raw")
        assert await b.recv(10) == b"raw"
