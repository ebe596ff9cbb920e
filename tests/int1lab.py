"""The crash lab's processes (tests/crashlab.py) for the INT-1 kill test (tests/test_int1_kill.py):

    python -m tests.int1lab node [--break VARIANT] NODEHOST-ARGS...   a nodehost, maybe broken
    python -m tests.int1lab kiosks --doc-size BYTES CRASHLAB-ARGS...  the lab's kiosks, big documents

Big documents keep most of an issuance in its document stream, where a SIGKILL cuts it. A broken
variant is applied here, in the child, before the nodes start: a monkeypatch cannot reach across
a process boundary.
"""

from __future__ import annotations

import sys

from gateway.protocol import splice
from gateway.protocol.splice import Splice

Carrier = getattr(splice, "Carrier", None)  # pooled relays' shared upstream connection, where relays pool


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
    Paired relays end a connection's pairs in `Splice.close`; pooled ones (where they exist) a
    dead carrier's in `Carrier.close`."""
    real = Splice.close

    def close(self) -> None:
        _end_as_whole(list(self.by_down.values()), lambda pair: self.down)
        real(self)

    Splice.close = close
    if Carrier is not None:
        real_carrier = Carrier.close

        def carrier_close(self):
            _end_as_whole(list(self.pairs.values()), lambda pair: pair.splice.down)
            return real_carrier(self)

        Carrier.close = carrier_close


BROKEN = {"relay-ending-cut-documents": relay_ending_cut_documents}


def main(argv: list[str]) -> int:
    role, rest = argv[0], argv[1:]
    if role == "node":
        if rest[:1] == ["--break"]:
            BROKEN[rest[1]]()
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
