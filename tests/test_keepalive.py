"""A hung next hop found by an HTTP/2 PING with a deadline, without a socket: the keepalive book
(gateway/transport/keepalive.py) and the cores' PING (its ACK comes back). The relay's use of it,
a DMZ relay SIGSTOPped under load, is in tests/test_failover_bench.py."""

from __future__ import annotations

import math

import pytest

from gateway.protocol.frames import ACK, PING, frame
from gateway.protocol.h2lean import LeanClientCore, LeanServerCore
from gateway.transport.keepalive import Keepalive, Verdict


def test_an_idle_connection_is_never_pinged():
    ka = Keepalive(interval=1.0, timeout=2.0)
    assert ka.check(now=100.0, last_received=0.0, busy=False) is None
    assert ka.next_check(last_received=0.0, busy=False) == math.inf


def test_a_busy_silent_upstream_is_pinged_then_declared_hung_without_an_answer():
    ka = Keepalive(interval=1.0, timeout=2.0)
    assert ka.check(now=10.5, last_received=10.0, busy=True) is None  # heard from lately
    assert ka.next_check(last_received=10.0, busy=True) == 11.0
    assert ka.check(now=11.0, last_received=10.0, busy=True) is Verdict.PING
    assert ka.check(now=12.0, last_received=10.0, busy=True) is None  # one PING at a time
    assert ka.next_check(last_received=10.0, busy=True) == 13.0
    assert ka.check(now=13.0, last_received=10.0, busy=True) is Verdict.HUNG


@pytest.mark.parametrize("answered_at", [11.0, 12.9])
def test_anything_received_after_the_ping_shows_the_peer_alive(answered_at: float):
    ka = Keepalive(interval=1.0, timeout=2.0)
    assert ka.check(now=11.0, last_received=10.0, busy=True) is Verdict.PING
    assert ka.check(now=answered_at + 0.5, last_received=answered_at, busy=True) is None
    assert ka.pinged_at is None
    # silent again for an interval: the next PING, and again its deadline
    assert ka.check(now=answered_at + 1.0, last_received=answered_at, busy=True) is Verdict.PING
    assert ka.check(now=answered_at + 3.0, last_received=answered_at, busy=True) is Verdict.HUNG


def test_requests_ending_while_a_ping_is_out_forget_it():
    ka = Keepalive(interval=1.0, timeout=2.0)
    assert ka.check(now=11.0, last_received=10.0, busy=True) is Verdict.PING
    assert ka.check(now=12.0, last_received=10.0, busy=False) is None
    assert ka.check(now=13.5, last_received=13.2, busy=True) is None  # a new request, a fresh start


def test_a_ping_goes_out_and_the_server_core_acks_it():
    c, s = LeanClientCore(), LeanServerCore()
    s.receive_data(c.data_to_send())
    c.receive_data(s.data_to_send())
    s.receive_data(c.data_to_send())  # the SETTINGS ack
    s.data_to_send()
    c.ping(b"konbini!")
    sent = c.data_to_send()
    assert sent == frame(PING, 0, 0, b"konbini!")
    s.receive_data(sent)
    ack = s.data_to_send()
    assert ack == frame(PING, ACK, 0, b"konbini!")
    c.receive_data(ack)
    assert not c.closed and not c.data_to_send()  # an ACK is not answered
    c.close()
    c.data_to_send()
    c.ping()
    assert c.data_to_send() == b""  # a closed connection sends no PING
