"""Run some server nodes of a topology in this process (netns mode: one per namespace, or several
namespaces' nodes in one process for a large part).

Started by `topology.launch.netns.start_nodehosts` as
`ip netns exec konbini-SITE python -m topology.launch.nodehost --topology F --state DIR --mode netns --nodes a,b`.
Prints "ready" on stdout once every listener is bound; stops when stdin reaches EOF (the
launcher closed the pipe or died) or on SIGTERM. SIGUSR1 writes the process's TLS handshake tally
(gateway/node/handshakes.py) for a bench; no other control channel.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import trio

from gateway.business.clock import Clock
from gateway.node import handshakes
from gateway.node.server import NodeStartError
from topology.launch.loopback import run_topology
from topology.pki import PKIError
from topology.spec.load import TopologyError, load_topology
from topology.spec.model import Mode


async def _serve(args, topo=None, pki=None, namespaces=None) -> None:
    topo = topo if topo is not None else load_topology(args.topology)
    only = list(dict.fromkeys(n for n in args.nodes.split(",") if n))  # in the launcher's order
    unknown = [n for n in only if n not in topo.nodes]
    if unknown:
        raise NodeStartError(f"unknown node {unknown[0]!r}")
    clock = Clock.parse(args.clock, args.clock_speed)
    handshakes.dump_on_signal(handshakes.tally_path(Path(args.state), os.getpid()))  # a bench's per-phase count
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: run_topology(
                topo,
                Path(args.state),
                mode=args.mode,
                clock=clock,
                only=only,
                bind=args.bind,
                pki=pki,
                namespaces=namespaces,
                reuse_port=args.reuse_port,
                task_status=task_status,
            )
        )
        os.write(1, b"ready\n")  # fd 1 (the launcher's pipe), not sys.stdout (replaced under pytest)
        stdin = trio.lowlevel.FdStream(os.dup(0))  # fd 0 (the launcher's pipe), not sys.stdin (likewise)
        while await stdin.receive_some(4096):
            pass
        nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None, topo=None, pki=None, namespaces=None) -> int:
    """`topo`: an already loaded topology (a forked nodehost inherits it) instead of --topology's
    file; `pki`: its PKI, already ensured;
    `namespaces`: site -> namespace, where this process serves the nodes of several."""
    p = argparse.ArgumentParser(prog="python -m topology.launch.nodehost")
    p.add_argument("--topology", required=True)
    p.add_argument("--state", required=True)
    p.add_argument(
        "--mode",
        type=Mode,
        default=Mode.NETNS,
        choices=list(Mode),
        help="cluster: a Kubernetes pod (bind all, dial Service names, read-only PKI under STATE/pki)",
    )
    p.add_argument("--bind", help="cluster mode: listen on this address instead of all (tests on one loopback)")
    p.add_argument("--nodes", required=True, help="comma-separated server node ids")
    p.add_argument("--clock")
    p.add_argument(
        "--reuse-port",
        action="store_true",
        help="one of several worker processes serving these nodes on the same addresses (SO_REUSEPORT)",
    )
    p.add_argument("--clock-speed", type=float, default=1.0)
    args = p.parse_args(argv)
    try:
        trio.run(_serve, args, topo, pki, namespaces)
    except (NodeStartError, TopologyError, PKIError) as exc:
        print(f"nodehost: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
