"""Dialling a hop: TCP from our own address, mutual TLS naming the node we expect, HTTP/2.

Every client in konbini dials this way: the nodes and the relays' upstreams (Trio, `connect_h2`
here) and the load generator's kiosks (asyncio, `kiosk_emu.load.h2asyncio`). What both must do
the same is here once: offer the newest session ticket for the server (`offer`), and after the
handshake insist on h2 and remember the connection for the next ticket (`agreed`). The peer's
identity is checked by TLS itself: the client context verifies the server's certificate against
the network CA and `server_hostname`, the node id we expect (`gateway.transport.tls`).
"""

from __future__ import annotations

import socket
import ssl

import trio

from gateway.protocol.errors import LinkDown, link_errors
from gateway.protocol.h2trio import TrioH2
from gateway.transport.resumption import HasSession, sessions_of
from topology.netns.enter import in_namespace

HANDSHAKE_TIMEOUT = 5.0  # TCP + TLS as a client; as a server, the node's `Limits.handshake_timeout`
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)  # Linux; as trio.open_tcp_stream


def offer(ctx: ssl.SSLContext, expect_id: str) -> ssl.SSLSession | None:
    """The session to offer `expect_id` (resumed if the server still takes its ticket; else a
    full handshake)."""
    return sessions_of(ctx).offer(expect_id)


def agreed(ctx: ssl.SSLContext, expect_id: str, tls: HasSession, alpn: str | None) -> None:
    """After the handshake: the server agreed to h2 (else LinkDown, a ConnectionError), and this
    connection's ticket is the one to offer it next time."""
    if alpn != "h2":
        raise LinkDown(f"{expect_id} did not agree to h2")
    sessions_of(ctx).remember(expect_id, tls)


async def connect_h2(
    address: str,
    port: int,
    expect_id: str,
    ctx: ssl.SSLContext,
    *,
    local_address: str | None = None,
    netns: str | None = None,
) -> TrioH2:
    """A mutual-TLS HTTP/2 connection to node `expect_id` at `address:port`, not yet running.
    `local_address`: ours, which the allow-lists check; `netns`: the namespace to make the
    socket in (`NodeContext.netns`). A refusal or failure of TCP or TLS raises LinkDown."""
    with link_errors():
        if netns is None:
            tcp = await trio.open_tcp_stream(address, port, local_address=local_address)
        else:
            tcp = await _open_tcp_in(netns, address, port, local_address)
        tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        tls = trio.SSLStream(tcp, ctx, server_hostname=expect_id)
        if (session := offer(ctx, expect_id)) is not None:
            tls.session = session
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                await tls.do_handshake()
            agreed(ctx, expect_id, tls, tls.selected_alpn_protocol())
        except BaseException:
            await trio.aclose_forcefully(tls)
            raise
    return TrioH2(tls, client_side=True, peer=expect_id)


async def _open_tcp_in(netns: str, address: str, port: int, local_address: str | None) -> trio.SocketStream:
    """`trio.open_tcp_stream` to one literal address, the socket made in namespace `netns`."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with in_namespace(netns):
        sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        if local_address is not None:
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            await sock.bind((local_address, 0))
        await sock.connect((address, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)
