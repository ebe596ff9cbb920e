"""Which redundant server to ask first: the set-aside book on its own, without a socket
(gateway/transport/outliers.py; the center's use of it is in tests/test_failover_bench.py)."""

from __future__ import annotations

from gateway.transport.outliers import Outliers


def test_servers_in_service_come_first_in_file_order_and_set_aside_ones_last():
    book = Outliers(["muni-1", "muni-2", "muni-3"])
    assert book.order() == [0, 1, 2]
    assert book.failed(0, now=10.0) is True
    assert book.order() == [1, 2, 0] and book.aside() == ["muni-1"]
    assert book.failed(2, now=11.0) is True
    assert book.order() == [1, 0, 2]  # set aside: the longest set aside is asked first among them


def test_a_server_is_set_aside_once_and_probed_once():
    book = Outliers(["muni-1", "muni-2"])
    assert book.failed(0, now=1.0) is True
    assert book.failed(0, now=2.0) is False  # already set aside: no second prober
    assert book.set_aside_at == {0: 1.0}


def test_with_every_server_set_aside_every_one_is_still_asked():
    book = Outliers(["muni-1", "muni-2"])
    book.failed(1, now=1.0)
    book.failed(0, now=2.0)
    assert book.order() == [1, 0]


def test_an_answer_puts_a_server_back_in_its_place():
    book = Outliers(["muni-1", "muni-2"])
    book.failed(0, now=1.0)
    book.answered(0)
    assert book.order() == [0, 1] and not book.is_set_aside(0) and book.returns == 1
    book.answered(1)  # in service already: nothing to count
    assert book.returns == 1
