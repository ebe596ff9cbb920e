"""A node process that runs out of file descriptors backs off and goes on (trio.serve_listeners):
it does not die, its nodes keep serving the connections they have, and the flooded node accepts
again once the flood is gone. The nodes run in a child process with a lowered RLIMIT_NOFILE."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import trio

from gateway.business.clock import Clock
from gateway.node.server import NodeContext
from gateway.protocol.h2trio import TrioH2
from gateway.protocol.http import request_headers
from gateway.protocol.streams import header
from tests.conftest import TEST_TIME
from topology.pki import PKI
from topology.spec.load import DEFAULT_TOPOLOGY
from topology.spec.model import Topology

ROOT = Path(__file__).resolve().parent.parent
LIMIT = 128  # the node process's RLIMIT_NOFILE: its listeners, ledger and a few relay chains fit
FLOOD = LIMIT + 64  # more connections than it has descriptors; well inside the listen backlog (1024)
NODES = "store-router-a1,store-router-a2,ec-router-a,dmz-relay-a,issuance-center"
NODEHOST = (
    "import resource, sys\n"
    f"resource.setrlimit(resource.RLIMIT_NOFILE, ({LIMIT}, {LIMIT}))\n"
    "from topology.launch.nodehost import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)
BLOB = 300_000  # larger than a stream window, so flow control runs end to end


class NodeProcess:
    """The nodehost child. `backed_off` is set once it logs an accept() that found no descriptor
    free (trio.serve_listeners), or once its stderr closes (it died): whichever comes first."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self.stderr = bytearray()
        self.backed_off = trio.Event()

    async def wait_ready(self) -> None:
        out = bytearray()
        while b"ready\n" not in out:
            chunk = await self.proc.stdout.receive_some(4096)
            assert chunk, f"nodehost exited before it was ready:\n{self.tail()}"
            out += chunk

    async def read_stderr(self) -> None:
        while chunk := await self.proc.stderr.receive_some(65536):
            self.stderr += chunk
            if b"accept returned EMFILE" in self.stderr:
                self.backed_off.set()
        self.backed_off.set()

    def tail(self) -> str:
        return self.stderr[-3000:].decode(errors="replace")


async def _get_blob(conn: TrioH2, router: str) -> tuple[bytes | None, int]:
    stream = await conn.open_stream(request_headers("GET", f"/bench/blob?size={BLOB}", router), end_stream=True)
    status = header(await stream.receive_headers(), b":status")
    got = 0
    while (chunk := await stream.receive_chunk()) is not None:
        got += len(chunk)
    conn.release(stream)
    return status, got


async def _kiosk(topo: Topology, pki: PKI, kiosk: str, nursery: trio.Nursery) -> TrioH2:
    ctx = NodeContext(topo, topo.node(kiosk), pki, "loopback", Clock(TEST_TIME))
    conn = await ctx.connect(topo.node(ctx.node.upstream or ""))
    nursery.start_soon(conn.run)
    return conn


async def test_a_node_out_of_descriptors_keeps_serving_and_accepts_again_after_the_flood(topo, state):
    pki = PKI.ensure(state, topo)
    argv = [
        sys.executable,
        "-c",
        NODEHOST,
        "--topology",
        str(DEFAULT_TOPOLOGY),
        "--state",
        str(state),
        "--mode",
        "loopback",
        "--clock",
        TEST_TIME.isoformat(),
        "--nodes",
        NODES,
    ]
    proc = await trio.lowlevel.open_process(
        argv, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    node = NodeProcess(proc)
    flooded, other = topo.node("store-router-a1"), topo.node("store-router-a2")
    flood: list[trio.SocketStream] = []
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(node.read_stderr)
            with trio.fail_after(30):
                await node.wait_ready()
                a1 = await _kiosk(topo, pki, "kiosk-a1-1", nursery)  # open before the flood
                a2 = await _kiosk(topo, pki, "kiosk-a2-1", nursery)
                assert await _get_blob(a1, flooded.id) == (b"200", BLOB)
                assert await _get_blob(a2, other.id) == (b"200", BLOB)

                # Connections from an allowed address that never start TLS: each holds a descriptor
                # in the node process until the handshake times out, so accept() soon fails.
                source = topo.node("kiosk-a1-2").address
                for _ in range(FLOOD):
                    try:
                        flood.append(await trio.open_tcp_stream(flooded.address, flooded.port, local_address=source))
                    except OSError:
                        break  # refused: the node is gone (its stderr says why, below)
                await node.backed_off.wait()
                assert b"accept returned EMFILE" in node.stderr and proc.poll() is None, (
                    f"the node process died out of descriptors:\n{node.tail()}"
                )

                # Out of descriptors: both nodes still serve the connections they already have.
                assert await _get_blob(a2, other.id) == (b"200", BLOB)
                assert await _get_blob(a1, flooded.id) == (b"200", BLOB)

                for s in flood:
                    await trio.aclose_forcefully(s)
                flood.clear()
                # The flooded node accepts (and relays, opening new upstream connections) again.
                again = await _kiosk(topo, pki, "kiosk-a1-2", nursery)
                assert await _get_blob(again, flooded.id) == (b"200", BLOB)
                assert proc.poll() is None, node.tail()
                for conn in (a1, a2, again):
                    conn.close()
                await proc.stdin.aclose()  # nodehost stops at stdin EOF
                assert await proc.wait() == 0, node.tail()
    finally:
        for s in flood:
            await trio.aclose_forcefully(s)
        if proc.poll() is None:
            proc.kill()
            await proc.wait()
