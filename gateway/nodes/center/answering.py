"""What every part of the issuance center answers with: its node's context and a refusal."""

from __future__ import annotations

import base64
from collections import Counter
from collections.abc import Iterable

import trio

from gateway.business.refusal import Refusal
from gateway.node.server import App, NodeContext
from gateway.protocol.driver import Stream
from gateway.protocol.errors import LinkError
from gateway.protocol.http import refuse, timing

UPSTREAM_TIMEOUT = 10.0  # OCSP and municipality must answer within this, or the request is cancelled whole
# Any of these while an upstream (OCSP, a municipality) is asked or read cancels the request whole.
UPSTREAM_FAILURES = (trio.TooSlowError, ConnectionError, LinkError)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class Answering(App):
    """The center's state every part reads, and the one way a request is refused."""

    ctx: NodeContext
    refusals: Counter[Refusal]

    async def _refuse(
        self,
        stream: Stream,
        status: int,
        reason: Refusal,
        t0: float,
        fields: dict[str, str] | None = None,
        timings: Iterable[tuple[bytes, bytes]] = (),
    ) -> None:
        self.refusals[reason] += 1
        self.metrics.refusals.labels(reason).inc()
        await refuse(
            stream, status, reason, reason.says(**(fields or {})), [timing(self.ctx.node.id, t0, stream), *timings]
        )
