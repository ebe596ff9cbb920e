"""curl (nghttp2, C) through the whole default chain: kiosk address → store router → EC router →
DMZ relay → issuance center. curl keeps HTTP/2's defaults (16 KiB SETTINGS_MAX_FRAME_SIZE, a large
window, rare WINDOW_UPDATEs): a body over one frame used to stall after its first 16 KiB."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import trio

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed (make setup installs it)")

SIZES = [0, 16 * 1024 - 1, 16 * 1024, 16 * 1024 + 1, 64 * 1024, 1 << 20, 16 << 20]


def _curl(net, *args: str) -> list[str]:
    pki = net.pki
    chain, key = pki.node_paths("kiosk-a1-1")
    router = net.topo.node("store-router-a1")
    return [
        "curl", "--http2", "-sS", "-m", "30", "--interface", net.topo.node("kiosk-a1-1").address,
        "--cert", str(chain), "--key", str(key), "--cacert", str(pki.network_ca_path),
        "--connect-to", f"{router.id}:{router.port}:{router.address}:{router.port}",
        *args,
    ]


def _url(net, path: str) -> str:
    router = net.topo.node("store-router-a1")
    return f"https://{router.id}:{router.port}{path}"


@pytest.mark.parametrize("size", SIZES)
async def test_curl_downloads_every_byte_through_the_chain(net, tmp_path: Path, size: int):
    out = tmp_path / "body"
    proc = await trio.run_process(
        _curl(net, "-o", str(out), "-w", "%{http_code} %{http_version}", _url(net, f"/bench/x?size={size}")),
        capture_stdout=True, capture_stderr=True, check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode() == "200 2"
    assert out.stat().st_size == size


@pytest.mark.parametrize("size", SIZES)
async def test_curl_uploads_every_byte_through_the_chain(net, tmp_path: Path, size: int):
    body = tmp_path / "upload"
    body.write_bytes(b"k" * size)
    proc = await trio.run_process(
        _curl(net, "-o", "/dev/null", "-D", "-", "--data-binary", f"@{body}", _url(net, "/bench/x?size=0")),
        capture_stdout=True, capture_stderr=True, check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    head = proc.stdout.decode().lower()
    assert head.startswith("http/2 200")
    assert f"bench-received: {size}\r\n" in head  # the center saw every byte the kiosk sent
