"""TLS 1.3 records after the handshake, without trio's SSLStream machinery around each call.

trio's SSLStream drives the SSLObject through `_retry`, a general state machine that also has to
survive renegotiation and any number of tasks sending and receiving at once: locks, conflict
detectors and a checkpoint on every call, a fifth of a relay's CPU on small requests (py-spy,
issuance and relay-small). A konbini connection has exactly one reader task and one writer task
(`TrioH2`), and TLS 1.3 has no renegotiation, so once trio has done the handshake (and checked
the certificate and the hostname) the same SSLObject and memory BIOs are driven here directly:
a read decrypts what the BIO holds or receives more from the socket; a write encrypts and sends
what the BIO then holds, including anything a read left there (a KeyUpdate answer).

Anything other than TLS 1.3 keeps trio's SSLStream (`lean_tls`); KONBINI_TLS_STREAM=trio keeps it
always, for a before/after. Closing goes through the SSLStream (close_notify, then the socket).
"""

from __future__ import annotations

import os
import socket
import ssl

import trio

LEAN = os.environ.get("KONBINI_TLS_STREAM", "lean") != "trio"
RECEIVE_SIZE = 256 * 1024


class TLSRecords(trio.abc.Stream):
    """An established TLS 1.3 session of `tls` (a trio.SSLStream that finished its handshake),
    for one reader task and one writer task."""

    def __init__(self, tls: trio.SSLStream) -> None:
        self.tls = tls
        self.transport_stream = tls.transport_stream
        self._ssl_object = tls._ssl_object  # noqa: SLF001 (trio keeps them private; no public way in)
        self._incoming = tls._incoming  # noqa: SLF001
        self._outgoing = tls._outgoing  # noqa: SLF001
        # trio holds back a TLS 1.3 server's session tickets until its first send (an OpenSSL
        # workaround); they go out ahead of our first record, or the peer reads garbage
        self._held = tls._delayed_outgoing or b""  # noqa: SLF001
        tls._delayed_outgoing = None  # noqa: SLF001
        self._eof = False
        # the kernel socket under the TLS, for writes that do not wait (`send_now`); None over
        # anything else (a memory stream in tests)
        tcp = getattr(self.transport_stream, "tcp", self.transport_stream)  # under h2trio.LingeringSocket
        sock = getattr(getattr(tcp, "socket", None), "_sock", None)
        self._raw = sock if isinstance(sock, socket.socket) else None
        self._unsent = b""  # ciphertext a `send_now` left: it goes first on the next send

    @property
    def can_send_now(self) -> bool:
        return self._raw is not None

    @property
    def unsent(self) -> int:
        return len(self._unsent)

    def _ciphertext(self, data: bytes | bytearray | memoryview) -> bytes:
        """Everything due on the wire, in order: what was held or left unsent, then `data` encrypted."""
        if data:
            try:
                self._ssl_object.write(data)
            except ssl.SSLError as exc:
                raise trio.BrokenResourceError(f"TLS: {exc}") from exc
        out = self._outgoing.read()
        if self._held or self._unsent:
            out, self._held, self._unsent = self._held + self._unsent + out, b"", b""
        return out

    def send_now(self, data: bytes | bytearray | memoryview) -> bool:
        """Encrypt `data` and give the kernel what it takes without waiting; True when it took
        everything (else `send_all`, from the writer task, sends the rest first). Only while no
        `send_all` is under way."""
        out = self._ciphertext(data)
        if not out:
            return True
        try:
            sent = self._raw.send(out)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            raise trio.BrokenResourceError(f"send: {exc}") from exc
        if sent < len(out):
            self._unsent = out[sent:]
            return False
        return True

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Plaintext (b"" at the end: close_notify, or the socket's EOF without one)."""
        size = max_bytes or RECEIVE_SIZE
        while True:
            try:
                return self._ssl_object.read(size)  # what the BIO already holds, whole records only
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLZeroReturnError:  # close_notify
                return b""
            except ssl.SSLError as exc:
                raise trio.BrokenResourceError(f"TLS: {exc}") from exc
            if self._eof:
                return b""
            data = await self.transport_stream.receive_some(RECEIVE_SIZE)
            if not data:
                self._eof = True
                return b""
            self._incoming.write(data)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        out = self._ciphertext(data)
        if out:
            await self.transport_stream.send_all(out)
        else:
            await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport_stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.tls.aclose()


def lean_tls(stream: trio.abc.Stream) -> trio.abc.Stream:
    """`stream` as TLSRecords when it is an established TLS 1.3 SSLStream; else as it is."""
    if LEAN and isinstance(stream, trio.SSLStream):
        obj = getattr(stream, "_ssl_object", None)
        if obj is not None and obj.version() == "TLSv1.3" and not stream._outgoing.pending:  # noqa: SLF001
            return TLSRecords(stream)
    return stream
