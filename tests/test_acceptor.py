"""One task accepts for every listening socket of a node process (gateway/node/acceptor.py): each
connection reaches the handler of the socket it came in on, and a process running a whole
topology has that one accepting task, not one a listener."""

from __future__ import annotations

import socket

import trio

from gateway.business.clock import Clock
from gateway.node.acceptor import Acceptor
from gateway.node.server import listening_socket
from tests.conftest import TEST_TIME
from topology.launch.loopback import run_topology
from topology.launch.spread import _weight


async def test_each_connection_reaches_the_handler_of_the_socket_it_came_in_on():
    acceptor = Acceptor()
    sockets = [listening_socket("127.0.0.1", 0) for _ in range(3)]
    ports = [s.getsockname()[1] for s in sockets]
    got: list[tuple[int, bytes]] = []
    arrived = trio.Event()

    def handler(port: int):
        async def handle(stream: trio.SocketStream) -> None:
            got.append((port, await stream.receive_some(16)))
            await stream.aclose()
            if len(got) == 4:
                arrived.set()

        return handle

    for sock, port in zip(sockets, ports, strict=True):
        acceptor.add(sock, handler(port))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(acceptor.run, nursery)
        for port, hello in ((ports[2], b"c"), (ports[0], b"a"), (ports[2], b"cc"), (ports[1], b"b")):
            client = await trio.open_tcp_stream("127.0.0.1", port)
            await client.send_all(hello)
            await client.aclose()
        with trio.fail_after(10):
            await arrived.wait()
        nursery.cancel_scope.cancel()
    assert sorted(got) == sorted([(ports[2], b"c"), (ports[0], b"a"), (ports[2], b"cc"), (ports[1], b"b")])
    assert all(s.fileno() == -1 for s in sockets)  # closed with the accepting task
    assert len(acceptor) == 0


def _tasks(task: trio.lowlevel.Task) -> list[trio.lowlevel.Task]:
    return [task] + [t for n in task.child_nurseries for child in n.child_tasks for t in _tasks(child)]


async def test_a_running_topology_has_one_accepting_task_not_one_a_listener(topo, state):
    async with trio.open_nursery() as nursery:
        running = await nursery.start(
            lambda task_status: run_topology(topo, state, clock=Clock(TEST_TIME), task_status=task_status)
        )
        tasks = _tasks(trio.lowlevel.current_root_task())
        listeners = _weight(
            topo, list(running.servers) + [n for n in running.admin_servers if n not in running.servers]
        )
        assert [t.name for t in tasks].count("gateway.node.acceptor.Acceptor.run") == 1
        assert len(tasks) < listeners / 2, [t.name for t in tasks]  # a handful, whatever the topology's size
        # and every listener answers: one kiosk's maintenance port, one store router's service port
        for node in (topo.node("kiosk-a1-1"), topo.node("store-router-a1")):
            port = node.admin_port if node.kind == "kiosk" else node.port
            with socket.create_connection((node.address, port), timeout=10):
                pass
        nursery.cancel_scope.cancel()
