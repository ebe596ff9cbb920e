"""Where a request's time goes, split so that the parts add up to what the kiosk measured.

Every hop adds `server-timing: <node>;dur=<own ms>[;queue=<ms>][;up=<ms>]` to the response
headers on their way back (gateway.protocol.http.timing): `queue` is the time from the node
reading the request's HEADERS to its handler starting (event-loop backlog), `up` a relay's wait
for the next hop's answer. The innermost server comes first, then each relay outwards; entries
after the innermost server's and without `up` are waits it reports itself (OCSP, municipality),
already inside its `dur`.

Given the kiosk's time to the response headers (TTFB), the split walks the chain from the
kiosk inwards: the time on the line to a hop is what the outer side waited minus what the hop
accounts for (queue + own + its own wait upstream). A line's time is therefore measured, not
configured: the network, both sides' TLS record work and any socket backlog before a read.
After the headers comes the body's transfer. Nothing is dropped or double counted, so the parts
sum to the total exactly (a line can come out slightly negative from clock granularity).
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.protocol.streams import Headers


@dataclass(frozen=True)
class HopTiming:
    node: str
    own_ms: float
    queue_ms: float = 0.0
    up_ms: float | None = None  # relays only


def timings(headers: Headers | None) -> list[HopTiming]:
    """The server-timing entries of a header block, in order."""
    out = []
    for k, v in headers or ():
        if k != b"server-timing":
            continue
        name, *params = v.decode("latin-1").split(";")
        values: dict[str, float] = {}
        for p in params:
            key, _, val = p.partition("=")
            try:
                values[key.strip()] = float(val)
            except ValueError:
                continue
        if "dur" in values:
            out.append(HopTiming(name.strip(), values["dur"], values.get("queue", 0.0), values.get("up")))
    return out


def add_server_timing(headers: Headers | None, into: dict[str, float]) -> None:
    """Add each hop's own time (`dur`) of a header block to `into` (node -> ms)."""
    for t in timings(headers):
        into[t.node] = into.get(t.node, 0.0) + t.own_ms


def split(
    ttfb_ms: float, total_ms: float, headers: Headers | None, kinds: dict[str, str], into: dict[str, float]
) -> None:
    """Add one request's parts to `into` (part -> ms): lines, each hop's queue and own time, the
    innermost server's own waits, and the body after the headers; they sum to total_ms."""
    entries = timings(headers)
    relays = [t for t in entries if t.up_ms is not None]
    inner = [t for t in entries if t.up_ms is None]

    def add(part: str, ms: float) -> None:
        into[part] = into.get(part, 0.0) + ms

    waited, outer = ttfb_ms, "kiosk"
    for hop in reversed(relays):  # from the kiosk's own router inwards
        kind = kinds.get(hop.node, hop.node)
        add(f"line {outer}→{kind}", waited - (hop.queue_ms + hop.own_ms + (hop.up_ms or 0.0)))
        add(f"{kind} queue", hop.queue_ms)
        add(f"{kind} own", hop.own_ms)
        waited, outer = hop.up_ms or 0.0, kind
    if inner:
        origin, waits = inner[0], inner[1:]
        kind = kinds.get(origin.node, origin.node)
        add(f"line {outer}→{kind}", waited - (origin.queue_ms + origin.own_ms))
        add(f"{kind} queue", origin.queue_ms)
        add(f"{kind} own", origin.own_ms - sum(w.own_ms for w in waits))
        for w in waits:
            add(f"{kind} waits on {kinds.get(w.node, w.node)}", w.own_ms)
    else:
        add(f"line {outer}→?", waited)  # no server said anything: all of it is unexplained
    add("body", total_ms - ttfb_ms)


def with_relay_waits(
    split_ms: dict[str, float], origin_kind: str, waits: list[tuple[str, float]], tag: str
) -> dict[str, float]:
    """A split whose relays said nothing (HAProxy adds no server-timing), refined with each relay's
    own log of its wait on its upstream: `waits` is (relay kind, mean ms per request flow), from
    the kiosk's router inwards. The one part `line kiosk→<origin>` becomes, per relay, the line in
    front of it plus its own work (its log cannot tell those apart), and the line to the origin.
    The rest is kept, so the parts still add up to the same total."""
    whole = f"line kiosk→{origin_kind}"
    if whole not in split_ms or not waits:
        return dict(split_ms)
    origin = sum(v for k, v in split_ms.items() if k.startswith(f"{origin_kind} "))
    ttfb = split_ms[whole] + origin
    out = {k: v for k, v in split_ms.items() if k != whole}
    outer, waited = "kiosk", ttfb
    for kind, up in waits:
        out[f"line {outer}→{kind} + {kind} ({tag})"] = round(waited - up, 3)
        outer, waited = kind, up
    out[f"line {outer}→{origin_kind}"] = round(waited - origin, 3)
    return out
