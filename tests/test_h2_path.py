"""One HTTP/2 path: the cores in gateway/protocol/h2lean.py are the only ones the product runs, with
no switch back, no h2 at run time, and the protocol's numbers declared once (equal to h2's)."""

from __future__ import annotations

import ast
from pathlib import Path

import h2.errors
import h2.settings
import hyperframe.frame
import pytest
import trio

from gateway.protocol.errors import ConnectionClosed, LinkDown, LinkError, StreamReset, link_errors
from gateway.protocol.frames import ErrorCode, FrameType, SettingCode
from gateway.protocol.h2lean import LeanClientCore, LeanServerCore
from gateway.protocol.interfaces import Core

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = [p for d in ("gateway", "topology", "kiosk_emu", "bench") for p in sorted((ROOT / d).rglob("*.py"))]


def _trees() -> list[tuple[Path, ast.AST]]:
    return [(p, ast.parse(p.read_text(), str(p))) for p in PRODUCT]


def test_the_codes_are_h2s_and_hyperframes() -> None:
    assert {c.name: c.value for c in ErrorCode} == {c.name: c.value for c in h2.errors.ErrorCodes}
    assert {c.name: c.value for c in SettingCode} == {c.name: c.value for c in h2.settings.SettingCodes}
    frames = {cls.__name__.removesuffix("Frame").upper(): cls.type for cls in hyperframe.frame.FRAMES.values()}
    frames["RST_STREAM"], frames["PUSH_PROMISE"], frames["WINDOW_UPDATE"] = (
        frames.pop("RSTSTREAM"),
        frames.pop("PUSHPROMISE"),
        frames.pop("WINDOWUPDATE"),
    )
    frames.pop("ALTSVC", None)  # RFC 7838, not a frame konbini knows (an unknown frame is ignored)
    frames.pop("EXTENSION", None)
    assert {t.name: t.value for t in FrameType} == frames


def test_no_environment_variable_selects_how_a_connection_runs() -> None:
    for path, tree in _trees():
        if "gateway/protocol" not in path.as_posix() and not path.name == "h2asyncio.py":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv"):
                pytest.fail(f"{path.relative_to(ROOT)}:{node.lineno} reads the environment")


def test_the_product_does_not_import_h2() -> None:
    for path, tree in _trees():
        for node in ast.walk(tree):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            for name in names:
                assert name.split(".")[0] not in ("h2", "hyperframe"), f"{path.relative_to(ROOT)}:{node.lineno}"


def test_nothing_outside_the_core_reaches_into_it() -> None:
    """`core._close` (and any other private member of a core) is called by the core alone."""
    for path, tree in _trees():
        if path.name == "h2lean.py":
            continue
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and isinstance(node.value, ast.Attribute)
                and node.value.attr == "core"
            ):
                pytest.fail(f"{path.relative_to(ROOT)}:{node.lineno} uses core.{node.attr}")


def test_both_cores_are_a_core() -> None:
    cores: list[Core] = [LeanClientCore(), LeanServerCore()]  # mypy checks this line; pytest that it runs
    assert all(not core.closed for core in cores)


def test_a_transports_failure_is_one_link_error_with_the_original_as_its_cause() -> None:
    for raised in (ConnectionRefusedError(111, "refused"), trio.BrokenResourceError("tls"), trio.ClosedResourceError()):
        with pytest.raises(LinkDown) as caught, link_errors():
            raise raised
        assert caught.value.__cause__ is raised
        assert isinstance(caught.value, LinkError) and isinstance(caught.value, OSError)  # old handlers still catch it
    with pytest.raises(TimeoutError), link_errors():  # the caller's deadline, not the link's
        raise TimeoutError
    assert issubclass(ConnectionClosed, LinkError) and issubclass(StreamReset, LinkError)


async def test_dialing_a_closed_port_raises_link_down_in_both_runtimes() -> None:
    import asyncio
    import socket
    import ssl

    from gateway.node.server import connect_h2
    from kiosk_emu.load.h2asyncio import connect_h2 as connect_h2_asyncio

    with socket.socket() as s:  # a port nobody listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        with pytest.raises(LinkDown) as caught:
            await connect_h2("127.0.0.1", port, "nobody", ssl.create_default_context())
        assert isinstance(caught.value.__cause__, OSError)
        with pytest.raises(LinkDown):
            await trio.to_thread.run_sync(
                lambda: asyncio.run(connect_h2_asyncio("127.0.0.1", port, "nobody", ssl.create_default_context()))
            )
