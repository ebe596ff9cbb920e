"""TLS 1.3 records after the handshake, without trio's SSLStream machinery around each call.

trio's SSLStream drives the SSLObject through `_retry`, a general state machine that also has to
survive renegotiation and any number of tasks sending and receiving at once: locks, conflict
detectors and a checkpoint on every call, a fifth of a relay's CPU on small requests (py-spy,
issuance and relay-small). A konbini connection has exactly one reader task and one writer task
(`TrioH2`), and TLS 1.3 has no renegotiation, so once trio has done the handshake (and checked
the certificate and the hostname) the same SSLObject and memory BIOs are driven here directly:
a read decrypts what the BIO holds or receives more from the socket; a write encrypts and sends
what the BIO then holds, including anything a read left there (a KeyUpdate answer).

Anything other than TLS 1.3 keeps trio's SSLStream (`lean_tls`). Closing goes through the
SSLStream (close_notify, then the socket). The SSLStream's private fields read here are pinned
by pyproject.toml's trio range and checked by tests/test_trio_internals.py.
"""

from __future__ import annotations

import socket
import ssl

import trio

RECEIVE_SIZE = 256 * 1024
# Bytes given to (or taken from) the TLS object's memory BIOs at a time. OpenSSL's memory BIO
# keeps the capacity of its largest fill for the connection's life: fed whole 256 KiB reads and
# writes, each of a relay's connections could keep about half a MiB there (with the shared
# receive buffer below: docs/performance.md, relay memory).
FEED = 64 * 1024
RECORD = 16 * 1024  # TLS's largest plaintext record: what one SSLObject.read can return
# Where every connection's socket reads land before they are copied out at their size: a
# SSLObject.read or a recv asked for 256 KiB allocates 256 KiB and shrinks it to what came, and
# those shrunk blocks left a relay's heap fragmented (docs/performance.md, relay memory).
_RECEIVE_BUFFER = bytearray(RECEIVE_SIZE)
_RECEIVE_VIEW = memoryview(_RECEIVE_BUFFER)


class TLSRecords(trio.abc.Stream):
    """An established TLS 1.3 session of `tls` (a trio.SSLStream that finished its handshake),
    for one reader task and one writer task."""

    def __init__(self, tls: trio.SSLStream[trio.abc.Stream]) -> None:
        self.tls = tls
        self.transport_stream = tls.transport_stream
        self._ssl = tls._ssl_object  # noqa: SLF001 (trio keeps them private; no public way in)
        self._incoming = tls._incoming  # noqa: SLF001
        self._outgoing = tls._outgoing  # noqa: SLF001
        # trio holds back a TLS 1.3 server's session tickets until its first send (an OpenSSL
        # workaround); they go out ahead of our first record, or the peer reads garbage
        self._held = tls._delayed_outgoing or b""  # noqa: SLF001
        tls._delayed_outgoing = None  # noqa: SLF001
        self._eof = False
        self._closed = False  # close_notify read
        self._raw_left: memoryview | bytes = b""  # socket bytes not yet given to the TLS object
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
        parts = [self._held, self._unsent] if self._held or self._unsent else []
        self._held = self._unsent = b""
        view = memoryview(data)
        try:
            for start in range(0, len(view), FEED):  # the BIO never holds more than a slice's records
                self._ssl.write(view[start : start + FEED])
                parts.append(self._outgoing.read())
        except ssl.SSLError as exc:
            raise trio.BrokenResourceError(f"TLS: {exc}") from exc
        if not data and self._outgoing.pending:  # a read left something to send (a KeyUpdate answer)
            parts.append(self._outgoing.read())
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def send_now(self, data: bytes | bytearray | memoryview) -> bool:
        """Encrypt `data` and give the kernel what it takes without waiting; True when it took
        everything (else `send_all`, from the writer task, sends the rest first). Only while no
        `send_all` is under way."""
        out = self._ciphertext(data)
        if not out:
            return True
        assert self._raw is not None, "send_now needs a socket (can_send_now)"
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
        """Plaintext: every whole record of the last socket read, up to `max_bytes` (b"" at the
        end: close_notify, or the socket's EOF without one)."""
        size = max_bytes or RECEIVE_SIZE
        parts: list[bytes] = []
        got = 0
        while True:
            while got < size and not self._closed:
                try:
                    chunk = self._ssl.read(min(size - got, RECORD))  # one record's plaintext at most
                except ssl.SSLWantReadError:
                    break
                except ssl.SSLZeroReturnError:  # close_notify (or b"" below: CPython's way of saying it)
                    self._closed = True
                    break
                except ssl.SSLError as exc:
                    raise trio.BrokenResourceError(f"TLS: {exc}") from exc
                if not chunk:
                    self._closed = True
                    break
                parts.append(chunk)
                got += len(chunk)
            if got >= size or self._closed:
                break
            if self._raw_left:  # the rest of the last socket read, a slice at a time
                self._incoming.write(self._raw_left[:FEED])
                self._raw_left = self._raw_left[FEED:]
                continue
            if parts or self._eof:
                break
            data = await self._receive_raw()
            if not data:
                self._eof = True
                break
            self._raw_left = memoryview(data)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def _receive_raw(self) -> bytes:
        """The socket's next bytes, read into one buffer shared by every connection and copied
        out at their size (trio's recv allocates the whole 256 KiB and shrinks it to what came)."""
        raw = self._raw
        if raw is None:
            return bytes(await self.transport_stream.receive_some(RECEIVE_SIZE))
        await trio.lowlevel.checkpoint_if_cancelled()
        waited = False
        while True:
            try:
                n = raw.recv_into(_RECEIVE_BUFFER)
                break
            except BlockingIOError:
                waited = True
                await trio.lowlevel.wait_readable(raw)
            except OSError as exc:
                raise trio.BrokenResourceError(f"recv: {exc}") from exc
        data = _RECEIVE_VIEW[:n].tobytes()
        if not waited:
            await trio.lowlevel.cancel_shielded_checkpoint()  # as trio's own socket calls: others run too
        return data

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
    if isinstance(stream, trio.SSLStream):
        obj = getattr(stream, "_ssl_object", None)
        if obj is not None and obj.version() == "TLSv1.3" and not stream._outgoing.pending:  # noqa: SLF001
            return TLSRecords(stream)
    return stream
