"""The crash lab's processes (tests/crashlab.py) for the INT-1 kill test (tests/test_int1_kill.py):

    python -m tests.int1lab node [--break VARIANT] [--pace BYTES_PER_S] NODEHOST-ARGS...
                                                    a nodehost, maybe broken, its municipalities paced
    python -m tests.int1lab kiosks --doc-size BYTES CRASHLAB-ARGS...  the lab's kiosks, big documents

Big documents keep most of an issuance in its document stream, where a SIGKILL cuts it. Paced
municipalities keep each document there for a known time, and say "streaming" on stdout once one
has streamed for a sixteenth of a second: the test kills at that moment, so every kill cuts a
document under way whatever the machine's load (on loopback a 1 MiB document crosses in
milliseconds, and a kill at a count of documents printed can fall between documents every time). A broken variant and the
pace are applied here, in the child, before the nodes start: a monkeypatch cannot reach across a
process boundary.
"""

from __future__ import annotations

import sys

import trio

from gateway.nodes.municipality import MunicipalityServer
from gateway.protocol.splice import Carrier, Splice


def _end_as_whole(pairs, down_of) -> None:
    """End each answered, unfinished response downstream as if it were complete."""
    for pair in pairs:
        if pair.answered and not pair.response_done:
            try:
                down_of(pair).end_stream(pair.down.id)
            except Exception:  # noqa: BLE001 (a stream the peer already closed: the real close resets it)
                continue
            pair.response_done = True


def relay_ending_cut_documents() -> None:
    """Broken variant: a relay whose next hop died ends the responses already under way as if
    they were complete (END_STREAM), instead of resetting them: the kiosk gets a cut document.
    A relay learns it where it first sees it: a pair's upstream stream found reset
    (`Splice._service`; a connection's end resets every stream on it), or the connection's end
    itself (`Splice.close` for paired relays, `Carrier.close` for pooled ones). All three are
    broken."""
    real_service, real_close = Splice._service, Splice.close

    def service(self, pair) -> None:
        if pair.up.reset_code is not None and pair.down.reset_code is None:
            _end_as_whole([pair], lambda pair: self.down)
        real_service(self, pair)

    def close(self) -> None:
        _end_as_whole(list(self.by_down.values()), lambda pair: self.down)
        real_close(self)

    Splice._service, Splice.close = service, close
    real_carrier = Carrier.close

    def carrier_close(self):
        _end_as_whole(list(self.pairs.values()), lambda pair: pair.splice.down)
        return real_carrier(self)

    Carrier.close = carrier_close


BROKEN = {"relay-ending-cut-documents": relay_ending_cut_documents}
STREAMING = "streaming"  # a paced document has streamed for 1/16 s (stdout)


class _Paced:
    """A municipality's response stream whose DATA goes out at `rate` bytes a second."""

    def __init__(self, stream, rate: float) -> None:
        self._stream, self._rate, self._sent = stream, rate, 0

    def __getattr__(self, name):
        return getattr(self._stream, name)

    async def send_data(self, data: bytes, *args, **kwargs) -> None:
        await trio.sleep(len(data) / self._rate)
        await self._stream.send_data(data, *args, **kwargs)
        before, self._sent = self._sent, self._sent + len(data)
        if before < self._rate / 16 <= self._sent:
            sys.stdout.write(STREAMING + "\n")
            sys.stdout.flush()


def pace_documents(rate: float) -> None:
    """Municipalities stream their documents at `rate` bytes a second."""
    real = MunicipalityServer.handle

    async def handle(self, stream, peer) -> None:
        await real(self, _Paced(stream, rate), peer)

    MunicipalityServer.handle = handle


def main(argv: list[str]) -> int:
    role, rest = argv[0], argv[1:]
    if role == "node":
        if rest[:1] == ["--break"]:
            BROKEN[rest[1]]()
            rest = rest[2:]
        if rest[:1] == ["--pace"]:
            pace_documents(float(rest[1]))
            rest = rest[2:]
        from topology.launch.nodehost import main as nodehost

        return nodehost(rest)
    assert role == "kiosks" and rest[0] == "--doc-size", argv
    size = int(rest[1])
    from gateway.protocol.messages import IssueRequest
    from tests import crashlab

    real = crashlab.KioskProc._request

    def request(self, rng) -> IssueRequest:
        r = real(self, rng)
        return IssueRequest(r.municipality, r.cert_type, r.copies, size=size)

    crashlab.KioskProc._request = request
    return crashlab.main(["kiosks", *rest[2:]])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
