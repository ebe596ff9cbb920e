"""App-level policy evidence: what a server does with connections the allow-lists refuse.

Three checks, each from the address of a real topology node so only the app can refuse it:
- `plaintext`: plain TCP (no TLS) from an allowed source, an HTTP/1.1 request: closed, no answer;
- `no-cert`: TLS without a client certificate from an allowed source: the handshake or the first
  read fails (mutual TLS, SEC-SN-2);
- `kiosk-direct`: a kiosk, with its own valid certificate, straight to the issuance center: refused
  (SEC-SN-3; in loopback mode by the peer-address check, in netns mode already by the kernel).
Runs in-process (loopback) or as `ip netns exec konbini-SITE python -m topology.check.app …`.
"""

from __future__ import annotations

import argparse
import json
import ssl
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import trio

from gateway.node.server import NodeContext
from gateway.protocol.errors import TRANSPORT_ERRORS
from topology.pki import PKI
from topology.spec.load import load_topology
from topology.spec.model import Mode, Topology

CHECK_TIMEOUT = 7.0  # longer than the server's 5 s handshake timeout


@dataclass
class AppCheck:
    check: str
    src: str
    dst: str
    refused: bool
    detail: str
    requirements: tuple[str, ...]
    denial: str  # the reason the server counts when it refuses (gateway/node/server.py `denials`)


# check -> (source node, destination node, requirements, expected denial reason)
CHECKS = {
    "plaintext": ("dmz-relay", "issuance-center", ("SEC-SN-2", "SEC-EC-2"), "tls-handshake"),
    "no-cert": ("dmz-relay", "issuance-center", ("SEC-SN-2", "SEC-EC-2"), "tls-handshake"),
    "kiosk-direct": ("kiosk", "issuance-center", ("SEC-SN-3", "SEC-EC-2"), "peer-address"),
}


def pick(topo: Topology, check: str) -> tuple[str, str]:
    """(source id, destination id) of a check in this topology: the first nodes of the right kinds,
    the source being one the destination allows for `plaintext` and `no-cert`."""
    src_kind, dst_kind, _, _ = CHECKS[check]
    dst = topo.of_kind(dst_kind)[0]
    allowed = {s for rule in dst.allow for s in rule.sources}
    for node in topo.of_kind(src_kind):
        if check == "kiosk-direct" or node.id in allowed:
            return node.id, dst.id
    raise ValueError(f"no {src_kind} for the {check} check in this topology")


async def _read_until_closed(stream, limit: int = 4096) -> bytes:
    data = b""
    while len(data) < limit:
        chunk = await stream.receive_some(limit)
        if not chunk:
            break
        data += chunk
    return data


async def run_check(topo: Topology, pki: PKI, mode: Mode, check: str) -> AppCheck:
    src_id, dst_id = pick(topo, check)
    src, dst = topo.node(src_id), topo.node(dst_id)
    ctx = NodeContext(topo, src, pki, mode)
    _, _, reqs, denial = CHECKS[check]
    result = AppCheck(check, src_id, dst_id, False, "", reqs, denial)
    try:
        with trio.fail_after(CHECK_TIMEOUT):
            if check == "kiosk-direct":
                conn = await ctx.connect(dst)
                # TLS 1.3: the client's handshake ends before the server has judged its certificate
                data = b""
                with trio.move_on_after(1.0):
                    data = await conn.transport.receive_some(4096)
                await trio.aclose_forcefully(conn.transport)
                result.refused = not data
                result.detail = "closed after the handshake" if not data else "the center spoke h2 to a kiosk"
                return result
            tcp = await trio.open_tcp_stream(ctx.address_of(dst), dst.port or 0, local_address=ctx.address)
            if check == "plaintext":
                await tcp.send_all(b"GET / HTTP/1.1\r\nHost: konbini\r\n\r\n")
                data = await _read_until_closed(tcp)
                result.refused = not data.startswith(b"HTTP/")
                result.detail = "closed without an answer" if not data else f"answered {data[:20]!r}…"
                await trio.aclose_forcefully(tcp)
                return result
            tls_ctx = ssl.create_default_context(cafile=str(pki.network_ca_path))
            tls_ctx.set_alpn_protocols(["h2"])
            tls = trio.SSLStream(tcp, tls_ctx, server_hostname=dst_id)
            await tls.do_handshake()
            await tls.send_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            data = await _read_until_closed(tls)
            result.refused = not data
            result.detail = (
                "closed after the handshake" if not data else "the server spoke h2 to a client without a certificate"
            )
            await trio.aclose_forcefully(tls)
    except trio.TooSlowError:
        result.refused, result.detail = True, "no answer at all (dropped)"
    except TRANSPORT_ERRORS as exc:
        result.refused, result.detail = (
            True,
            f"refused: {type(exc).__name__} {getattr(exc, 'strerror', None) or exc}"[:160],
        )
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m topology.check.app")
    p.add_argument("--topology", required=True)
    p.add_argument("--state", required=True)
    p.add_argument("--mode", type=Mode, choices=list(Mode), default=Mode.NETNS)
    p.add_argument("check", choices=sorted(CHECKS))
    args = p.parse_args(argv)
    topo = load_topology(args.topology)
    pki = PKI.ensure(Path(args.state), topo)
    result = trio.run(run_check, topo, pki, args.mode, args.check)
    print(json.dumps(asdict(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
