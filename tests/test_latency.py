"""The latency split: every part of a request's time, from the hops' server-timing and the
kiosk's own clock, adding up to what the kiosk measured."""

from kiosk_emu.latency import split, timings

KINDS = {
    "store-router-a1": "store-router",
    "ec-router-a": "ec-router",
    "issuance-center": "issuance-center",
    "ocsp": "ocsp",
}
# innermost first, as the hops append on the way back: the center (with its own OCSP wait), then the relays
HEADERS = [
    (b":status", b"200"),
    (b"server-timing", b"issuance-center;dur=10.000;queue=1.000"),
    (b"server-timing", b"ocsp;dur=4.000"),
    (b"server-timing", b"ec-router-a;dur=0.500;queue=0.200;up=30.000"),
    (b"server-timing", b"store-router-a1;dur=0.400;queue=0.100;up=41.000"),
]


def test_server_timing_entries_are_read_with_their_parameters():
    t = timings(HEADERS)
    assert [x.node for x in t] == ["issuance-center", "ocsp", "ec-router-a", "store-router-a1"]
    assert t[3].own_ms == 0.4 and t[3].queue_ms == 0.1 and t[3].up_ms == 41.0 and t[0].up_ms is None


def test_lines_are_what_the_outer_side_waited_minus_what_the_inner_side_accounts_for():
    parts: dict[str, float] = {}
    split(50.0, 60.0, HEADERS, KINDS, parts)
    assert parts["line kiosk→store-router"] == 50.0 - (0.1 + 0.4 + 41.0)
    assert parts["line store-router→ec-router"] == 41.0 - (0.2 + 0.5 + 30.0)
    assert parts["line ec-router→issuance-center"] == 30.0 - (1.0 + 10.0)
    assert parts["issuance-center own"] == 10.0 - 4.0 and parts["issuance-center waits on ocsp"] == 4.0
    assert parts["body"] == 10.0
    assert abs(sum(parts.values()) - 60.0) < 1e-9  # nothing dropped, nothing counted twice


def test_a_response_without_server_timing_is_all_unexplained_line():
    parts: dict[str, float] = {}
    split(5.0, 7.0, [(b":status", b"200")], {}, parts)
    assert parts == {"line kiosk→?": 5.0, "body": 2.0}
