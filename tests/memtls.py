"""A TLS handshake between two ssl.SSLObjects over MemoryBIOs: no sockets, no event loop."""

from __future__ import annotations

import ssl


def handshake(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, server_name: str, session: ssl.SSLSession | None = None
) -> tuple[ssl.SSLObject, ssl.SSLObject, list[ssl.MemoryBIO]]:
    """(server, client, pipes) once both sides finished; an SSLError from either side propagates.
    pipes: server in, server out, client in, client out."""
    pipes = [ssl.MemoryBIO() for _ in range(4)]
    server = server_ctx.wrap_bio(pipes[0], pipes[1], server_side=True)
    client = client_ctx.wrap_bio(pipes[2], pipes[3], server_hostname=server_name, session=session)
    for _ in range(10):  # a TLS 1.3 handshake is done in two round trips; each side's turn moves bytes
        done = 0
        for side, outgoing, incoming in ((client, pipes[3], pipes[0]), (server, pipes[1], pipes[2])):
            try:
                side.do_handshake()
                done += 1
            except ssl.SSLWantReadError:
                pass
            finally:
                incoming.write(outgoing.read())
        if done == 2:
            return server, client, pipes
    raise AssertionError("the handshake did not finish")
