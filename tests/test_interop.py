"""Real third-party clients against konbini, through the whole default chain (kiosk address → store
router → EC router → DMZ relay → issuance center) and at a store router's TLS door.

- curl (nghttp2, C): HTTP/2's defaults, 16 KiB SETTINGS_MAX_FRAME_SIZE, a large window, rare
  WINDOW_UPDATEs; a body over one frame used to stall after its first 16 KiB.
- the Go client in ../shared/tools/h2mtls_load (Go's net/http: 16 MiB frames, frequent updates), closed-loop load.
- a raw client on the plain `h2` library: a 65,535-byte window refilled only once it is empty
  (the sender must fill the window exactly, partial frames included), and a huge window never
  refilled for the stream.
- `openssl s_client` and curl for the TLS door: TLS 1.3 only, a certificate of this network's CA
  that is current, ALPN h2. Another node's certificate from this node's address is refused in
  tests/test_gateway.py (test_node_presenting_another_nodes_certificate_is_refused).
- what real traffic does: 50 parallel 16 MiB uploads on one connection (longer than the 10 s
  headers_timeout), a 100 kB/s upload past the 30 s response timeout, a header list at the
  store router's advertised limit, Expect: 100-continue, an ALPN other than h2.
- implementations konbini did not write inside the chain: HAProxy as the EC router (konbini as
  its client and its server), nghttpd as the origin behind the DMZ relay (konbini as its client).

Third-party processes run with trio.run_process so the servers keep serving meanwhile.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import ssl
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
import trio
import trio.testing
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bench import crosscheck
from bench.baselines.haproxy import HAProxyProcess, config
from gateway.business.clock import Clock
from gateway.node.server import App, NodeContext, NodeServer
from gateway.protocol.http import send_json
from tests.conftest import TEST_TIME
from topology.launch.loopback import run_topology
from topology.pki import PKI
from topology.policy.compiler import compile_allowlists
from topology.spec.load import DEFAULT_TOPOLOGY, load_topology

ROOT = Path(__file__).resolve().parents[1]
KIOSK, ROUTER = "kiosk-a1-1", "store-router-a1"
KiB, MiB = 1024, 1 << 20
SIZES = [0, 16 * KiB - 1, 16 * KiB, 16 * KiB + 1, 64 * KiB, MiB, 16 * MiB]
H2_DEFAULT_WINDOW = 65_535
H2_DEFAULT_FRAME = 16_384
H2_MAX_WINDOW = 2**31 - 1

needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed (make setup installs it)")
needs_openssl = pytest.mark.skipif(
    shutil.which("openssl") is None, reason="openssl is not installed (make setup installs it)"
)


def _kiosk_files(net) -> tuple[Path, Path]:
    return net.pki.node_paths(KIOSK)


def _url(net, path: str) -> str:
    router = net.topo.node(ROUTER)
    return f"https://{router.id}:{router.port}{path}"


async def _denials_settle() -> None:
    """Let the server task that refused a peer finish counting before we look."""
    await trio.testing.wait_all_tasks_blocked()


# -- curl ---------------------------------------------------------------------------------------------


def _curl(net, *args: str, http: str = "--http2") -> list[str]:
    chain, key = _kiosk_files(net)
    router = net.topo.node(ROUTER)
    return [
        "curl",
        http,
        "-sS",
        "-m",
        "30",
        "--interface",
        net.topo.node(KIOSK).address,
        "--cert",
        str(chain),
        "--key",
        str(key),
        "--cacert",
        str(net.pki.network_ca_path),
        "--connect-to",
        f"{router.id}:{router.port}:{router.address}:{router.port}",
        *args,
    ]


@needs_curl
@pytest.mark.parametrize("size", SIZES)
async def test_curl_downloads_every_byte_through_the_chain(net, tmp_path: Path, size: int):
    out = tmp_path / "body"
    proc = await trio.run_process(
        _curl(net, "-o", str(out), "-w", "%{http_code} %{http_version}", _url(net, f"/bench/x?size={size}")),
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode() == "200 2"
    assert out.stat().st_size == size


@needs_curl
@pytest.mark.parametrize("size", SIZES)
async def test_curl_uploads_every_byte_through_the_chain(net, tmp_path: Path, size: int):
    body = tmp_path / "upload"
    body.write_bytes(b"k" * size)
    proc = await trio.run_process(
        _curl(net, "-o", "/dev/null", "-D", "-", "--data-binary", f"@{body}", _url(net, "/bench/x?size=0")),
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    head = proc.stdout.decode().lower()
    assert head.startswith("http/2 200")
    assert f"bench-received: {size}\r\n" in head  # the center saw every byte the kiosk sent


@needs_curl
async def test_curl_50_parallel_16_mib_uploads_on_one_connection_all_arrive(net, tmp_path: Path):
    # Each stream's body takes longer than headers_timeout (10 s) to cross on this machine; the
    # guard bounds one frame's arrival, never a healthy stream (they were all reset at 10.08 s).
    body = tmp_path / "upload"
    body.write_bytes(b"k" * (16 * MiB))
    streams = 50
    per_stream = ["-o", "/dev/null"] * streams
    with trio.fail_after(600):
        t0 = trio.current_time()
        proc = await trio.run_process(
            _curl(
                net,
                "-m",
                "560",
                "--parallel",
                "--parallel-max",
                str(streams),
                "--data-binary",
                f"@{body}",
                "-w",
                "%{http_code} %header{bench-received} %{num_connects}\n",
                *per_stream,
                *[_url(net, "/bench/x?size=0")] * streams,
            ),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        took = trio.current_time() - t0
    print(f"curl --parallel {streams} x 16 MiB uploads through the chain: {took:.1f} s")
    assert proc.returncode == 0, proc.stderr.decode()
    lines = proc.stdout.decode().split()
    assert lines[0::3] == ["200"] * streams and lines[1::3] == [str(16 * MiB)] * streams
    assert sum(int(n) for n in lines[2::3]) == 1  # one connection: the streams were multiplexed
    assert not any(s.denials for s in net.servers.values())  # no hop took a neighbour for a slowloris


@needs_curl
async def test_curl_upload_at_100_kb_per_second_longer_than_the_response_timeout_arrives(net, tmp_path: Path):
    # 4 MiB at 100 kB/s takes about 42 s, past the relays' 30 s response timeout, which now runs
    # from the end of the request (it was 504 upstream-timeout at 30.09 s after 3,080,191 B).
    body = tmp_path / "upload"
    body.write_bytes(b"k" * (4 * MiB))
    with trio.fail_after(120):
        proc = await trio.run_process(
            _curl(
                net,
                "-m",
                "100",
                "--limit-rate",
                "100k",
                "-o",
                "/dev/null",
                "-D",
                "-",
                "--data-binary",
                f"@{body}",
                _url(net, "/bench/x?size=0"),
            ),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert proc.returncode == 0, proc.stderr.decode()
    head = proc.stdout.decode().lower()
    assert head.startswith("http/2 200"), head
    assert f"bench-received: {4 * MiB}\r\n" in head


@needs_curl
async def test_curl_expecting_100_continue_is_answered_100_and_its_body_goes_through(net, tmp_path: Path):
    body = tmp_path / "upload"
    body.write_bytes(b"k" * (64 * KiB))
    with trio.fail_after(60):
        proc = await trio.run_process(
            _curl(
                net,
                "-o",
                "/dev/null",
                "-D",
                "-",
                "-H",
                "Expect: 100-continue",
                "--expect100-timeout",
                "20",
                "--data-binary",
                f"@{body}",
                _url(net, "/bench/x?size=0"),
            ),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert proc.returncode == 0, proc.stderr.decode()
    head = proc.stdout.decode().lower()
    assert head.startswith("http/2 100 "), head  # curl sent the body on our 100, not on its own timeout
    assert "http/2 200" in head and f"bench-received: {64 * KiB}\r\n" in head


# -- the Go client ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def h2mtls_load(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """../shared/tools/h2mtls_load built once per session with Debian's Go (bench.crosscheck, which
    `konbini bench --cross-check` uses too); nothing is downloaded."""
    if shutil.which("go") is None:
        pytest.skip(
            "LOUD SKIP: `go` is not installed: the Go interop tests did not run (make setup installs golang-go)"
        )
    try:
        return crosscheck.build(tmp_path_factory.mktemp("h2mtls_load"))
    except crosscheck.CrossCheckError as exc:
        pytest.fail(str(exc))


@pytest.mark.parametrize("size", [1 * KiB, 64 * KiB, MiB])
async def test_go_client_load_through_the_chain_has_no_failures(net, h2mtls_load: Path, size: int):
    chain, key = _kiosk_files(net)
    router, kiosk = net.topo.node(ROUTER), net.topo.node(KIOSK)
    url = f"https://{router.address}:{router.port}/bench/x?size={size}"
    with trio.fail_after(60):
        proc = await trio.run_process(
            [
                str(h2mtls_load),
                "-c",
                "8",
                "-conns",
                "2",
                "-d",
                "3s",
                "-ca",
                str(net.pki.network_ca_path),
                "-cert",
                str(chain),
                "-key",
                str(key),
                "-pairs",
                f"{url}@{kiosk.address}@{chain}@{key}",
            ],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert proc.returncode == 0, proc.stderr.decode()
    result = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    print(f"h2mtls_load size={size}: {result}")
    assert result["ok"] > 0 and result["fail"] == 0, result
    if size >= 64 * KiB:  # MBps has one decimal: too coarse for 1 KiB bodies
        assert result["MBps"] * 1e6 >= result["rps"] * size * 0.9, result  # every response carried its whole body


# -- a raw h2 client with the protocol's default window -----------------------------------------------


@dataclass
class Download:
    status: int
    received: int = 0
    largest_frame: int = 0
    stream_updates: int = 0  # WINDOW_UPDATEs this client sent for the stream
    ended: bool = False


async def _raw_h2_download(net, size: int, *, stream_window: int, refill_when_empty: bool) -> Download:
    """GET /bench/x?size=N over `ssl` + `h2` alone, from the kiosk's address with its certificate.

    The client advertises `stream_window` and 16 KiB frames. With `refill_when_empty` it sends a
    WINDOW_UPDATE (stream and connection alike) only when that window is exactly 0, so a sender
    that waits for room for a whole frame, instead of filling the window, stalls here. Without it,
    the connection window is opened once to the maximum and the stream is never updated."""
    chain, key = _kiosk_files(net)
    router, kiosk = net.topo.node(ROUTER), net.topo.node(KIOSK)
    ctx = ssl.create_default_context(cafile=str(net.pki.network_ca_path))
    ctx.load_cert_chain(chain, key)
    ctx.set_alpn_protocols(["h2"])
    tcp = await trio.open_tcp_stream(router.address, router.port, local_address=kiosk.address)
    tls = trio.SSLStream(tcp, ctx, server_hostname=router.id)
    await tls.do_handshake()
    assert tls.selected_alpn_protocol() == "h2"

    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.local_settings = h2.settings.Settings(
        client=True,
        initial_values={
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: stream_window,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: H2_DEFAULT_FRAME,
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
        },
    )
    conn.initiate_connection()
    conn_window = H2_DEFAULT_WINDOW  # the connection window is not a setting: it starts at 65,535
    if not refill_when_empty:
        conn.increment_flow_control_window(H2_MAX_WINDOW - H2_DEFAULT_WINDOW)
        conn_window = H2_MAX_WINDOW
    sid = conn.get_next_available_stream_id()
    conn.send_headers(
        sid,
        [
            (b":method", b"GET"),
            (b":scheme", b"https"),
            (b":authority", f"{router.id}:{router.port}".encode()),
            (b":path", f"/bench/x?size={size}".encode()),
        ],
        end_stream=True,
    )
    await tls.send_all(conn.data_to_send())

    got = Download(status=0)
    window = stream_window
    while not got.ended:
        data = await tls.receive_some(64 * KiB)
        if not data:
            raise ConnectionError(f"{ROUTER} closed the connection after {got.received} of {size} bytes")
        for event in conn.receive_data(data):  # h2 raises FlowControlError if the sender overruns a window
            if isinstance(event, h2.events.ResponseReceived):
                got.status = int(dict(event.headers)[b":status"])
            elif isinstance(event, h2.events.DataReceived):
                got.received += len(event.data)
                got.largest_frame = max(got.largest_frame, event.flow_controlled_length)
                window -= event.flow_controlled_length
                conn_window -= event.flow_controlled_length
                if refill_when_empty and conn_window == 0:
                    conn.increment_flow_control_window(H2_DEFAULT_WINDOW)
                    conn_window = H2_DEFAULT_WINDOW
                if refill_when_empty and window == 0 and event.stream_ended is None:
                    conn.increment_flow_control_window(stream_window, stream_id=sid)
                    window = stream_window
                    got.stream_updates += 1
            elif isinstance(event, h2.events.StreamEnded):
                got.ended = True
            elif isinstance(event, (h2.events.StreamReset, h2.events.ConnectionTerminated)):
                raise ConnectionError(f"{ROUTER} ended the download: {event}")
        await tls.send_all(conn.data_to_send())
    conn.close_connection()
    await tls.send_all(conn.data_to_send())
    await tls.aclose()
    return got


@pytest.mark.parametrize("size", [64 * KiB, MiB, 16 * MiB])
async def test_raw_h2_client_refilling_an_empty_65535_byte_window_gets_every_byte(net, size: int):
    with trio.fail_after(120):
        got = await _raw_h2_download(net, size, stream_window=H2_DEFAULT_WINDOW, refill_when_empty=True)
    assert got.status == 200 and got.received == size
    assert got.largest_frame <= H2_DEFAULT_FRAME  # the router kept to the frame size we advertised
    assert got.stream_updates == size // H2_DEFAULT_WINDOW  # it filled the window to 0 every time


async def test_raw_h2_client_with_a_huge_window_never_updated_gets_every_byte(net):
    size = 16 * MiB  # fits in a 2**31-1 window: no WINDOW_UPDATE for the stream is ever needed
    with trio.fail_after(120):
        got = await _raw_h2_download(net, size, stream_window=H2_MAX_WINDOW, refill_when_empty=False)
    assert got.status == 200 and got.received == size
    assert got.largest_frame <= H2_DEFAULT_FRAME
    assert got.stream_updates == 0


# -- the TLS door: openssl s_client, curl -------------------------------------------------------------


def _s_client(net, cert: Path | None, key: Path | None, *args: str) -> list[str]:
    """s_client from the kiosk's address; -ign_eof: it reads until the router closes."""
    router, kiosk = net.topo.node(ROUTER), net.topo.node(KIOSK)
    auth = ["-cert", str(cert), "-key", str(key)] if cert else []
    return [
        "openssl",
        "s_client",
        "-connect",
        f"{router.address}:{router.port}",
        "-bind",
        f"{kiosk.address}:0",
        "-servername",
        router.id,
        "-CAfile",
        str(net.pki.network_ca_path),
        "-verify_return_error",
        "-ign_eof",
        *auth,
        *args,
    ]


async def _run_s_client(cmd: list[str]) -> tuple[int, str]:
    with trio.fail_after(15):  # the router must close on its own: s_client never gives up
        proc = await trio.run_process(cmd, stdin=b"", capture_stdout=True, capture_stderr=True, check=False)
    await _denials_settle()
    return proc.returncode, proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")


def _leaf(
    tmp_path: Path,
    name: str,
    issuer_name: x509.Name,
    issuer_key,
    address: str,
    *,
    not_before: datetime,
    not_after: datetime,
) -> tuple[Path, Path]:
    """A client certificate naming a kiosk, signed by `issuer_key`, written as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(name), x509.IPAddress(ipaddress.ip_address(address))]),
            critical=False,
        )
        .sign(issuer_key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


@needs_openssl
async def test_tls_1_3_client_with_the_kiosks_certificate_is_accepted(net):
    # The control for the refusals below: the same s_client, the kiosk's own certificate.
    chain, key = _kiosk_files(net)
    rc, out = await _run_s_client(_s_client(net, chain, key, "-alpn", "h2", "-no_ign_eof"))
    assert rc == 0, out
    assert "TLSv1.3" in out and "ALPN protocol: h2" in out
    assert not net.servers[ROUTER].denials


# Each refused client, and the TLS alert that would tell it why (RFC 8446 §6.2: SHOULD be sent).
REFUSALS = {
    "tls-1.2": "protocol version",
    "no-certificate": "certificate required",
    "expired-certificate": "certificate expired",
    "certificate-of-another-ca": "unknown ca",
}


def _refused_client(net, tmp_path: Path, case: str) -> list[str]:
    """The s_client command line of one REFUSALS case, from the kiosk's address."""
    now, kiosk = datetime.now(UTC), net.topo.node(KIOSK)
    if case == "tls-1.2":
        return _s_client(net, *_kiosk_files(net), "-tls1_2", "-alpn", "h2")
    if case == "no-certificate":
        return _s_client(net, None, None, "-alpn", "h2")
    if case == "expired-certificate":  # this network's CA, the kiosk's name and address, a day past its end
        pki: PKI = net.pki
        cert = _leaf(
            tmp_path,
            KIOSK,
            pki.network_ca.subject,
            pki.network_ca_key,
            kiosk.address,
            not_before=now - timedelta(days=30),
            not_after=now - timedelta(days=1),
        )
        return _s_client(net, *cert, "-alpn", "h2")
    if case == "certificate-of-another-ca":  # a throwaway CA, otherwise a perfect kiosk certificate
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not the konbini network CA")])
        cert = _leaf(
            tmp_path,
            KIOSK,
            ca_name,
            ec.generate_private_key(ec.SECP256R1()),
            kiosk.address,
            not_before=now - timedelta(days=1),
            not_after=now + timedelta(days=30),
        )
        return _s_client(net, *cert, "-alpn", "h2")
    raise AssertionError(case)


@needs_openssl
@pytest.mark.parametrize("case", REFUSALS)
async def test_refused_tls_client_is_closed_and_counted(net, tmp_path: Path, case: str):
    rc, out = await _run_s_client(_refused_client(net, tmp_path, case))
    # s_client ended on its own (it ignores stdin's end): the router closed the connection.
    assert rc != 0, out
    assert "unexpected eof while reading" in out or REFUSALS[case] in out, out
    assert net.servers[ROUTER].denials == {"tls-handshake": 1}
    assert net.servers[ROUTER].connections == 0  # no HTTP/2 session was started


@needs_openssl
@pytest.mark.parametrize("case", REFUSALS)
async def test_refused_tls_client_is_told_why_in_a_tls_alert(net, tmp_path: Path, case: str):
    rc, out = await _run_s_client(_refused_client(net, tmp_path, case))
    assert REFUSALS[case] in out, out


@needs_openssl
async def test_alpn_other_than_h2_is_refused_with_a_no_application_protocol_alert(net):
    chain, key = _kiosk_files(net)
    rc, out = await _run_s_client(_s_client(net, chain, key, "-alpn", "http/1.1"))
    assert rc != 0 and "alert no application protocol" in out, out  # RFC 7301 §3.2: the handshake fails
    assert net.servers[ROUTER].denials["alpn"] == 1
    assert net.servers[ROUTER].connections == 0  # no HTTP/2 session was started


@needs_curl
@pytest.mark.parametrize(("alpn", "exits"), [([], (35,)), (["--no-alpn"], (52, 56))], ids=["alpn-http/1.1", "no-alpn"])
async def test_http_1_1_gets_no_response_and_a_clear_close(net, alpn: list[str], exits: tuple[int, ...]):
    with trio.fail_after(30):
        proc = await trio.run_process(
            _curl(net, *alpn, "-o", "/dev/null", "-w", "%{http_code}", _url(net, "/bench/x?size=10"), http="--http1.1"),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    await _denials_settle()
    # 35: the handshake failed (the no_application_protocol alert, when curl offered http/1.1);
    # without ALPN: 52, empty reply (closed without a byte of HTTP), or 56, reset while receiving.
    # Never a timeout (28).
    assert proc.returncode in exits, (proc.returncode, proc.stderr.decode())
    assert proc.stdout.decode() == "000"
    assert net.servers[ROUTER].denials["alpn"] == 1


class _Hello(App):
    async def handle(self, stream, peer) -> None:
        await send_json(stream, 200, {"hello": peer.identity})


@dataclass
class _Net:
    """The two things `_curl` reads from a running topology, for a node started by hand."""

    topo: object
    pki: PKI


@needs_curl
async def test_tls_1_2_client_is_accepted_where_the_topology_asks_for_a_1_2_floor(state: Path, tmp_path: Path):
    # the topology file's `tls_min_version: "1.2"`, as a user would set it
    floor = tmp_path / "tls12.yaml"
    floor.write_text(DEFAULT_TOPOLOGY.read_text() + '\ntls_min_version: "1.2"\n')
    topo = load_topology(floor)
    pki = PKI.ensure(state, topo)
    node = topo.node(ROUTER)
    ctx = NodeContext(topo, node, pki, "loopback", Clock(TEST_TIME))
    server = NodeServer(ctx, compile_allowlists(topo, "loopback")[ROUTER], _Hello())
    net = _Net(topo, pki)
    async with trio.open_nursery() as serving:
        await serving.start(server.serve)
        with trio.fail_after(30):
            proc = await trio.run_process(
                _curl(
                    net,
                    "--tlsv1.2",
                    "--tls-max",
                    "1.2",
                    "-v",
                    "-w",
                    "\n%{http_code} %{http_version}",
                    _url(net, "/bench/x?size=0"),
                ),
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
        serving.cancel_scope.cancel()
    assert proc.returncode == 0, proc.stderr.decode()
    assert "TLSv1.2" in proc.stderr.decode()
    assert proc.stdout.decode().endswith(f'{{"hello":"{KIOSK}"}}\n200 2')
    assert not server.denials


# -- a header list at the store router's advertised limit ------------------------------------------


async def _raw_h2_connection(net) -> tuple[trio.SSLStream, h2.connection.H2Connection]:
    """The kiosk's TLS connection to its router with a plain `h2` client, windows open wide."""
    chain, key = _kiosk_files(net)
    router, kiosk = net.topo.node(ROUTER), net.topo.node(KIOSK)
    ctx = ssl.create_default_context(cafile=str(net.pki.network_ca_path))
    ctx.load_cert_chain(chain, key)
    ctx.set_alpn_protocols(["h2"])
    tcp = await trio.open_tcp_stream(router.address, router.port, local_address=kiosk.address)
    tls = trio.SSLStream(tcp, ctx, server_hostname=router.id)
    await tls.do_handshake()
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    conn.increment_flow_control_window(H2_MAX_WINDOW - H2_DEFAULT_WINDOW)
    await tls.send_all(conn.data_to_send())
    return tls, conn


def _get(net, path: str, pad: int = 0) -> list[tuple[bytes, bytes]]:
    router = net.topo.node(ROUTER)
    headers = [
        (b":method", b"GET"),
        (b":scheme", b"https"),
        (b":authority", f"{router.id}:{router.port}".encode()),
        (b":path", path.encode()),
    ]
    if pad:  # an x-pad field that brings the list to `pad` bytes as SETTINGS_MAX_HEADER_LIST_SIZE counts them
        headers.append((b"x-pad", b"p" * (pad - sum(len(k) + len(v) + 32 for k, v in headers) - len(b"x-pad") - 32)))
    return headers


async def _answers(
    tls: trio.SSLStream, conn: h2.connection.H2Connection, streams: set[int], trailers: dict | None = None
) -> dict[int, tuple[int, int]]:
    """Read until every stream in `streams` ended: {stream: (status, body bytes)}, and each
    stream's trailers into `trailers`; a reset or GOAWAY on the way fails."""
    got: dict[int, list[int]] = {sid: [0, 0] for sid in streams}
    ended: set[int] = set()
    while ended != streams:
        data = await tls.receive_some(64 * KiB)
        assert data, f"{ROUTER} closed the connection"
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                got[event.stream_id][0] = int(dict(event.headers)[b":status"])
            elif isinstance(event, h2.events.DataReceived):
                got[event.stream_id][1] += len(event.data)
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.TrailersReceived) and trailers is not None:
                trailers[event.stream_id] = dict(event.headers)
            elif isinstance(event, h2.events.StreamEnded):
                ended.add(event.stream_id)
            elif isinstance(event, (h2.events.StreamReset, h2.events.ConnectionTerminated)):
                raise AssertionError(f"{ROUTER} ended a stream or the connection: {event}")
        await tls.send_all(conn.data_to_send())
    return {sid: (status, n) for sid, (status, n) in got.items()}


@pytest.mark.parametrize(
    ("below_limit", "status"),
    [(200, 200), (50, 431), (0, 431)],
    ids=["room-for-attestation", "inside-the-band-that-tore-down", "at-the-limit"],
)
async def test_a_header_list_near_the_advertised_limit_never_tears_down_the_kiosks_connection(
    net, below_limit: int, status: int
):
    # The router advertises 16,384 and adds its attestation (~108 B) before forwarding: a list it
    # takes but the next hop would refuse is answered 431 here, alone; a download on the same
    # connection goes on, and the next request on it is served.
    limit = net.topo.limits_for("store-router").max_header_list_size
    with trio.fail_after(60):
        tls, conn = await _raw_h2_connection(net)
        download, padded = 1, 3
        conn.send_headers(download, _get(net, f"/bench/x?size={MiB}"), end_stream=True)
        conn.send_headers(padded, _get(net, "/bench/x?size=10", pad=limit - below_limit), end_stream=True)
        await tls.send_all(conn.data_to_send())
        got = await _answers(tls, conn, {download, padded})
        assert got[download] == (200, MiB)
        assert got[padded][0] == status
        conn.send_headers(5, _get(net, "/bench/x?size=10"), end_stream=True)
        await tls.send_all(conn.data_to_send())
        assert (await _answers(tls, conn, {5}))[5] == (200, 10)
        await tls.aclose()
    refused = net.servers[ROUTER].denials["header-list-too-large"]
    assert refused == (status == 431)
    assert not any(net.servers[n].denials for n in net.servers if n != ROUTER)  # nobody downstream saw a bomb


# -- implementations konbini did not write, inside the chain ---------------------------------------

needs_haproxy = pytest.mark.skipif(
    shutil.which("haproxy") is None, reason="haproxy is not installed (make setup installs it)"
)
needs_nghttpd = pytest.mark.skipif(
    shutil.which("nghttpd") is None, reason="nghttpd is not installed (make setup installs nghttp2-server)"
)


async def _konbini_without(nursery: trio.Nursery, topo, state: Path, node_id: str):
    """The default topology with every node but `node_id` served by konbini (loopback, TEST_TIME)."""
    only = [n for n in topo.nodes if n != node_id]
    return await nursery.start(
        lambda task_status: run_topology(topo, state, clock=Clock(TEST_TIME), only=only, task_status=task_status)
    )


async def _curl_both_ways(net, tmp_path: Path, download_path, upload_path: str) -> list[str]:
    """curl from the kiosk: each of SIZES down (GET download_path(size)) and up (POST upload_path);
    the response headers of the uploads, lowercased. Every transfer must end 200 with every byte."""
    heads = []
    for size in SIZES:
        out = tmp_path / f"down-{size}"
        proc = await trio.run_process(
            _curl(
                net, "-m", "120", "-o", str(out), "-w", "%{http_code} %{http_version}", _url(net, download_path(size))
            ),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr.decode()
        assert proc.stdout.decode() == "200 2", (size, proc.stdout)
        assert out.stat().st_size == size
        body = tmp_path / f"up-{size}"
        body.write_bytes(bytes(range(256)) * (size // 256) + b"k" * (size % 256))
        echo = tmp_path / f"echo-{size}"
        proc = await trio.run_process(
            _curl(net, "-m", "120", "-o", str(echo), "-D", "-", "--data-binary", f"@{body}", _url(net, upload_path)),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr.decode()
        head = proc.stdout.decode().lower()
        assert head.startswith("http/2 200"), head
        heads.append((size, head, echo))
    return heads


@needs_curl
@needs_haproxy
async def test_haproxy_as_the_ec_router_between_konbini_relays_passes_every_size_both_ways(
    topo, state: Path, nursery: trio.Nursery, tmp_path: Path
):
    # konbini's store router is HAProxy's client and konbini's DMZ relay its server: mutual TLS and
    # h2 on both sides, HAProxy's own allow-list ACLs (bench/baselines/haproxy.py) as the EC router's.
    ec = topo.node("ec-router-a")
    net = await _konbini_without(nursery, topo, state, ec.id)
    cfg = tmp_path / "haproxy" / "haproxy.cfg"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text(config(topo, net.pki, tmp_path, only=[ec.id]))
    haproxy = HAProxyProcess(cfg, wait_for=[(ec.address, ec.port)])
    await trio.to_thread.run_sync(haproxy.start)
    try:
        with trio.fail_after(300):
            heads = await _curl_both_ways(net, tmp_path, lambda size: f"/bench/x?size={size}", "/bench/x?size=0")
    finally:
        haproxy.stop()
        net.stop()
    for size, head, _ in heads:
        assert f"bench-received: {size}\r\n" in head  # the issuance center saw every byte the kiosk sent
    assert not any(s.denials for s in net.servers.values())


@needs_curl
@needs_nghttpd
async def test_nghttpd_as_the_origin_behind_konbinis_dmz_relay_passes_every_size_both_ways(
    topo, state: Path, nursery: trio.Nursery, tmp_path: Path
):
    # nghttpd (nghttp2's server, C) in the issuance center's place: it asks for a client
    # certificate, serves files, echoes uploads and ends every response with a trailer, so konbini's
    # relays are proven as the client of a server they did not write.
    center = topo.node("issuance-center")
    net = await _konbini_without(nursery, topo, state, center.id)
    docs = tmp_path / "htdocs"
    (docs / "bench").mkdir(parents=True)
    for size in SIZES:
        (docs / "bench" / f"size-{size}").write_bytes(b"n" * size)
    chain, key = net.pki.node_paths(center.id)
    nghttpd = await trio.lowlevel.open_process(
        [
            "nghttpd",
            "-a",
            center.address,
            "--verify-client",
            "--echo-upload",
            "--trailer",
            "x-origin: nghttpd",
            "-d",
            str(docs),
            str(center.port),
            str(key),
            str(chain),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with trio.fail_after(300):
            await _until_listening(center.address, center.port)
            heads = await _curl_both_ways(net, tmp_path, lambda size: f"/bench/size-{size}", "/bench/echo")
            # curl does not show trailers: a plain `h2` client reads them (nghttpd ends every response with one)
            tls, conn = await _raw_h2_connection(net)
            conn.send_headers(1, _get(net, f"/bench/size-{MiB}"), end_stream=True)
            await tls.send_all(conn.data_to_send())
            trailers: dict = {}
            assert (await _answers(tls, conn, {1}, trailers))[1] == (200, MiB)
            await tls.aclose()
    finally:
        nghttpd.terminate()
        await nghttpd.wait()
        net.stop()
    for size, head, echo in heads:
        assert echo.read_bytes() == (tmp_path / f"up-{size}").read_bytes()  # every byte there and back
        assert "server: nghttpd" in head
    assert trailers[1][b"x-origin"] == b"nghttpd"  # the trailer crossed every hop
    assert not any(s.denials for s in net.servers.values())


async def _until_listening(address: str, port: int) -> None:
    """Poll until a TCP connect to address:port succeeds (a process started outside trio)."""
    while True:
        try:
            await (await trio.open_tcp_stream(address, port)).aclose()
            return
        except OSError:
            await trio.sleep(0.05)  # polling a condition, bounded by the caller's fail_after
