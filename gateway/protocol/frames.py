"""HTTP/2's wire vocabulary (RFC 9113 §4-§7): frame types, flags, error and setting codes, the
frame header, and the settings konbini asks of its peers.

The codes are declared once here as IntEnums, equal to hyperframe's frame types and h2's
`ErrorCodes` and `SettingCodes` (tests/test_h2_path.py asserts it), so the product does not import
h2 at run time; the module-level names are the same numbers as plain ints.
"""

from __future__ import annotations

import struct
from enum import IntEnum

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class FrameType(IntEnum):
    DATA = 0x0
    HEADERS = 0x1
    PRIORITY = 0x2
    RST_STREAM = 0x3
    SETTINGS = 0x4
    PUSH_PROMISE = 0x5
    PING = 0x6
    GOAWAY = 0x7
    WINDOW_UPDATE = 0x8
    CONTINUATION = 0x9


class ErrorCode(IntEnum):
    """RFC 9113 §7, as h2.errors.ErrorCodes."""

    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    SETTINGS_TIMEOUT = 0x4
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    CONNECT_ERROR = 0xA
    ENHANCE_YOUR_CALM = 0xB
    INADEQUATE_SECURITY = 0xC
    HTTP_1_1_REQUIRED = 0xD


class SettingCode(IntEnum):
    """RFC 9113 §6.5.2 (and RFC 8441's ENABLE_CONNECT_PROTOCOL), as h2.settings.SettingCodes."""

    HEADER_TABLE_SIZE = 0x1
    ENABLE_PUSH = 0x2
    MAX_CONCURRENT_STREAMS = 0x3
    INITIAL_WINDOW_SIZE = 0x4
    MAX_FRAME_SIZE = 0x5
    MAX_HEADER_LIST_SIZE = 0x6
    ENABLE_CONNECT_PROTOCOL = 0x8


# The same numbers as plain ints, for the cores' hot paths: comparing an int with an IntEnum
# member takes twice as long as with an int.
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS = (int(t) for t in list(FrameType)[:5])
PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = (int(t) for t in list(FrameType)[5:])
NO_ERROR = int(ErrorCode.NO_ERROR)
PROTOCOL_ERROR = int(ErrorCode.PROTOCOL_ERROR)
INTERNAL_ERROR = int(ErrorCode.INTERNAL_ERROR)
FLOW_CONTROL_ERROR = int(ErrorCode.FLOW_CONTROL_ERROR)
STREAM_CLOSED = int(ErrorCode.STREAM_CLOSED)
FRAME_SIZE_ERROR = int(ErrorCode.FRAME_SIZE_ERROR)
REFUSED_STREAM = int(ErrorCode.REFUSED_STREAM)
CANCEL = int(ErrorCode.CANCEL)
COMPRESSION_ERROR = int(ErrorCode.COMPRESSION_ERROR)
ENHANCE_YOUR_CALM = int(ErrorCode.ENHANCE_YOUR_CALM)
# flags (RFC 9113 §6): END_STREAM and ACK share a bit, on different frame types
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20

# Between our own hops we raise the frame size and the connection window to cut per-frame
# overhead (DESIGN §3); the stream window stays near HTTP/2's default, since a relay holds up to
# one window per stream and hop (docs/performance.md has the figures).
MAX_FRAME_SIZE = 64 * 1024
STREAM_WINDOW = 64 * 1024
CONNECTION_WINDOW = 16 * 1024 * 1024
MAX_CONCURRENT_STREAMS = 1000
MAX_HEADER_LIST_SIZE = 16 * 1024  # an oversized header block closes the connection
MAX_WINDOW = 2**31 - 1
MAX_HEADER_BLOCK = 2 * MAX_HEADER_LIST_SIZE + 4096  # compressed, CONTINUATIONs included
MAX_CONTINUATIONS = 64  # frames in one header block (h2's CONTINUATION_BACKLOG)
DEFAULT_FRAME_SIZE = 16384  # the protocol's, until the peer's SETTINGS say otherwise
DEFAULT_WINDOW = 65535

FRAME_HEAD = struct.Struct(">HBBBL")  # a frame header: 24-bit length as (16, 8), type, flags, stream id
U32 = struct.Struct(">L")
SETTING = struct.Struct(">HL")


def frame(kind: int, flags: int, stream_id: int, payload: bytes | memoryview = b"") -> bytes:
    n = len(payload)
    return FRAME_HEAD.pack(n >> 8, n & 0xFF, kind, flags, stream_id) + bytes(payload)
