"""What a request's header fields must be (RFC 9113 §8.2-8.3), checked by the server core as
it takes a request: names and values, pseudo-headers, connection-specific fields,
:authority against Host, content-length. A broken rule raises `Violation` (PROTOCOL_ERROR)."""

from __future__ import annotations

import re

from gateway.protocol.errors import Violation
from gateway.protocol.frames import PROTOCOL_ERROR
from gateway.protocol.streams import Headers

# RFC 9113 §8.2.1: a name is visible ASCII without uppercase or ':' (bar a pseudo-header's
# first); a value has no NUL, CR or LF and no whitespace at either end.
_NAME = re.compile(rb":?[!-9;-@\[-~]+\Z")
_BAD_VALUE = re.compile(rb"[\x00\r\n]|\A[ \t]|[ \t]\Z")
_CONNECTION_FIELDS = frozenset({b"connection", b"proxy-connection", b"keep-alive", b"transfer-encoding", b"upgrade"})
_REQUEST_PSEUDO = frozenset({b":method", b":scheme", b":authority", b":path", b":protocol"})


def check_field(name: bytes, value: bytes) -> None:
    if not _NAME.match(name):
        raise Violation(PROTOCOL_ERROR, f"bad header name {name[:40]!r}")
    if value and _BAD_VALUE.search(value):
        raise Violation(PROTOCOL_ERROR, f"bad value for {name[:40]!r}")
    if name in _CONNECTION_FIELDS:
        raise Violation(PROTOCOL_ERROR, f"connection-specific field {name!r}")
    if name == b"te" and value.lower() != b"trailers":
        raise Violation(PROTOCOL_ERROR, "te other than trailers")


def request_fields(headers: Headers) -> int:
    """Check a request's header list as RFC 9113 §8.2-8.3 has it; its content-length, or -1."""
    pseudo: set[bytes] = set()
    regular = False
    method = authority = host = None
    length = -1
    for name, value in headers:
        check_field(name, value)
        if name[0] == 0x3A:  # ':'
            if regular or name in pseudo or name not in _REQUEST_PSEUDO:
                raise Violation(PROTOCOL_ERROR, f"pseudo-header {name!r} repeated, late or unknown")
            pseudo.add(name)
            if name == b":method":
                method = value
            elif name == b":authority":
                authority = value
            elif name == b":path" and not value:
                raise Violation(PROTOCOL_ERROR, "empty :path")
        else:
            regular = True
            if name == b"host":
                if host is not None:
                    raise Violation(PROTOCOL_ERROR, "two Host fields")
                host = value
            elif name == b"content-length":
                if not value.isdigit() or (length >= 0 and int(value) != length):
                    raise Violation(PROTOCOL_ERROR, "bad content-length")
                length = int(value)
    if method is None:
        raise Violation(PROTOCOL_ERROR, "no :method")
    if method == b"CONNECT" and b":protocol" not in pseudo:
        if b":scheme" in pseudo or b":path" in pseudo:
            raise Violation(PROTOCOL_ERROR, "CONNECT with :scheme or :path")
    elif b":scheme" not in pseudo or b":path" not in pseudo:
        raise Violation(PROTOCOL_ERROR, "no :scheme or :path")
    elif b":protocol" in pseudo and method != b"CONNECT":
        raise Violation(PROTOCOL_ERROR, ":protocol outside CONNECT")
    if authority is None and host is None:
        raise Violation(PROTOCOL_ERROR, "neither :authority nor Host")
    if authority is not None and host is not None and authority != host:
        raise Violation(PROTOCOL_ERROR, ":authority and Host differ")
    return length
