"""The impairment daemon: holds each queued packet for its line's delay ± jitter, then lets it go.

Theory of operation. On the *receiving* side of a line, the run's nft table marks the packets of
its queued line directions (a set of interface . source . destination) and one iptables-nft rule
(mangle PREROUTING, `-j NFQUEUE --queue-num N --queue-bypass`) hands them to the run's queue N:
one queue per run and namespace, whatever the number of lines. This process speaks the NFQUEUE
netlink protocol itself (`AF_NETLINK`/`NETLINK_NETFILTER`, no C library): it binds the queues,
asks for 128 bytes of each packet (its IPv4 addresses say which line direction it is on, its
length what it costs on a rated line), sets `NFQA_CFG_F_GSO` so 64 KiB segments are queued whole,
and answers with verdicts, many in one send (a batch verdict would release other lines' packets
from the shared queue).

Two rules:
- A packet's release time is `arrival + delay + U(-jitter, +jitter)`, after its serialisation
  on the line when the line has a rate (a clock per direction: `tx_free`), and never before
  the packet ahead of it (`reorder: false`, the default): jitter without reordering, as on a
  real carrier line whose jitter is queueing in FIFO routers. `reorder: true` draws per packet
  and lets packets overtake, as netem does.
- Packets are only ever accepted, except when a rate-limited direction's backlog exceeds
  `limit_s` of serialisation (tail drop, as a router's queue does).

Queues with no process bound pass packets unimpaired (`--queue-bypass`): a dead daemon must not
look like a dead network; the supervisor (topology.launch.impair) restarts it and says so.
Held packets die with the process (the kernel drops them); TCP retransmits them.

Run as `python -m topology.launch.impaird CONFIG STATUS`. CONFIG (JSON, reread when it changes):
{"queues": [{"num", "netns" (null: this namespace), "saddr", "daddr", "line", "dir", "delay_s",
"jitter_s", "rate_bps", "limit_s", "reorder"}], "on_exit": [[argv...], ...]}: one entry per line
direction, `num` the queue its packets arrive on. STATUS (JSON, rewritten five times
a second): counters per line direction that carried packets, and the process's CPU time. `--supervise CONFIG STATUS` runs the
supervisor instead: it keeps one daemon alive and, when told to stop, runs `on_exit`. Standard library only, on purpose: it
starts in ~30 ms and a restart costs little.
"""

from __future__ import annotations

import ctypes
import heapq
import json
import os
import random
import resource
import selectors
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field

from topology.netns.enter import enter_namespace

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_VERDICT, NFQNL_MSG_CONFIG, NFQNL_MSG_VERDICT_BATCH = 0, 1, 2, 3
NFQA_PACKET_HDR, NFQA_VERDICT_HDR, NFQA_PAYLOAD, NFQA_CAP_LEN = 1, 2, 10, 13
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN, NFQA_CFG_MASK, NFQA_CFG_FLAGS = 1, 2, 3, 4, 5
NFQNL_CFG_CMD_BIND, NFQNL_CFG_CMD_UNBIND = 1, 2
NFQNL_COPY_PACKET = 2
NFQA_CFG_F_GSO = 4
NLM_F_REQUEST, NLM_F_ACK = 1, 4
NLMSG_ERROR = 2
NF_DROP, NF_ACCEPT = 0, 1
SOL_NETLINK, NETLINK_NO_ENOBUFS = 270, 5
COPY_RANGE = 128
QUEUE_MAXLEN = 16384
RCVBUF = 16 << 20
SEND_CHUNK = 32 << 10  # verdicts sent at once: well under a netlink datagram's limit
TICK = 0.2  # seconds between config checks and status writes (changes apply within a second)

_NLMSG = struct.Struct("=IHHII")
_NFGEN = struct.Struct("=BBH")  # family, version, res_id (big endian, packed by hand)
_NLA = struct.Struct("=HH")


def _attr(kind: int, payload: bytes) -> bytes:
    pad = (-len(payload)) % 4
    return _NLA.pack(_NLA.size + len(payload), kind) + payload + b"\0" * pad


def _message(msg: int, queue: int, attrs: bytes, flags: int = NLM_F_REQUEST, seq: int = 0) -> bytes:
    body = _NFGEN.pack(socket.AF_INET, 0, socket.htons(queue)) + attrs
    return _NLMSG.pack(_NLMSG.size + len(body), (NFNL_SUBSYS_QUEUE << 8) | msg, flags, seq, 0) + body


def _attrs(data: memoryview, offset: int, end: int) -> dict[int, memoryview]:
    out = {}
    while offset + 4 <= end:
        length, kind = _NLA.unpack_from(data, offset)
        if length < 4:
            break
        out[kind & 0x3FFF] = data[offset + 4 : offset + length]
        offset += (length + 3) & ~3
    return out


@dataclass
class Direction:
    """One bound queue: one direction of one line, and what happened to its packets."""

    num: int
    netns: str | None
    saddr: str
    daddr: str
    line: str
    dir: str
    delay_s: float = 0.0
    jitter_s: float = 0.0
    rate_bps: float = 0.0
    limit_s: float = 0.1
    reorder: bool = False
    held: list = field(default_factory=list)  # heap of (release, seq, packet id)
    last_release: float = 0.0
    tx_free: float = 0.0
    packets: int = 0
    bytes: int = 0
    released: int = 0
    dropped: int = 0
    lag_max: float = 0.0
    lag_sum: float = 0.0

    def configure(self, spec: dict) -> None:
        self.delay_s = float(spec.get("delay_s") or 0.0)
        self.jitter_s = float(spec.get("jitter_s") or 0.0)
        self.rate_bps = float(spec.get("rate_bps") or 0.0)
        self.limit_s = float(spec.get("limit_s") or 0.1)
        self.reorder = bool(spec.get("reorder"))
        self.line, self.dir = spec.get("line", self.line), spec.get("dir", self.dir)

    def schedule(self, now: float, length: int, seq: int, packet_id: int) -> bool:
        """Queue one packet; False: tail drop (the rate clock's backlog is over `limit_s`)."""
        self.packets += 1
        self.bytes += length
        start = now
        if self.rate_bps > 0:
            start = max(now, self.tx_free)
            # the queue holds limit_s of the rate, but at least 256 KiB: lo carries 64 KiB GSO segments
            if (start - now) * self.rate_bps / 8 > max(self.limit_s * self.rate_bps / 8, 256 << 10):
                self.dropped += 1
                return False
            self.tx_free = start + length * 8 / self.rate_bps
            start = self.tx_free
        release = start + self.delay_s
        if self.jitter_s:
            release = max(start, release + random.uniform(-self.jitter_s, self.jitter_s))
        if not self.reorder:
            release = max(release, self.last_release)
        self.last_release = release
        heapq.heappush(self.held, (release, seq, packet_id))
        return True

    def status(self) -> dict:
        return {
            "queue": self.num,
            "netns": self.netns,
            "saddr": self.saddr,
            "daddr": self.daddr,
            "line": self.line,
            "dir": self.dir,
            "delay_ms": self.delay_s * 1e3,
            "jitter_ms": self.jitter_s * 1e3,
            "rate_bps": self.rate_bps,
            "reorder": self.reorder,
            "packets": self.packets,
            "bytes": self.bytes,
            "released": self.released,
            "held_now": len(self.held),
            "dropped": self.dropped,
            "lag_max_ms": round(self.lag_max * 1e3, 3),
            "lag_mean_ms": round(self.lag_sum / self.released * 1e3, 3) if self.released else 0.0,
        }


class QueueSocket:
    """One NFQUEUE netlink socket, created inside one network namespace (it stays bound to it)."""

    def __init__(self, netns: str | None) -> None:
        if netns:
            enter_namespace(netns)  # the socket belongs to the namespace it was made in
        self.netns = netns
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, 33, RCVBUF)  # SO_RCVBUFFORCE (root)
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        self.sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
        self.sock.bind((0, 0))
        self.seq = 0

    def _request(self, queue: int, attrs: bytes) -> None:
        """A config message with an ack; raises OSError on a refusal (e.g. the queue is someone else's)."""
        self.seq += 1
        self.sock.setblocking(True)
        self.sock.send(_message(NFQNL_MSG_CONFIG, queue, attrs, NLM_F_REQUEST | NLM_F_ACK, self.seq))
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = self.sock.recv(65536)
            offset = 0
            while offset + _NLMSG.size <= len(data):
                length, kind, _, seq, _ = _NLMSG.unpack_from(data, offset)
                if kind == NLMSG_ERROR and seq == self.seq:
                    (err,) = struct.unpack_from("=i", data, offset + _NLMSG.size)
                    self.sock.setblocking(False)
                    if err:
                        raise OSError(-err, f"NFQUEUE {queue} config: {os.strerror(-err)}")
                    return
                offset += (length + 3) & ~3
        raise OSError(f"NFQUEUE {queue} config: no answer from the kernel")

    def bind(self, queue: int) -> None:
        self._request(queue, _attr(NFQA_CFG_CMD, struct.pack("=BxH", NFQNL_CFG_CMD_BIND, socket.htons(socket.AF_INET))))
        self._request(
            queue,
            _attr(NFQA_CFG_PARAMS, struct.pack("!IB", COPY_RANGE, NFQNL_COPY_PACKET))
            + _attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", QUEUE_MAXLEN))
            + _attr(NFQA_CFG_FLAGS, struct.pack("!I", NFQA_CFG_F_GSO))
            + _attr(NFQA_CFG_MASK, struct.pack("!I", NFQA_CFG_F_GSO)),
        )

    def unbind(self, queue: int) -> None:
        self._request(
            queue, _attr(NFQA_CFG_CMD, struct.pack("=BxH", NFQNL_CFG_CMD_UNBIND, socket.htons(socket.AF_INET)))
        )

    def verdict(self, queue: int, packet_id: int, verdict: int = NF_ACCEPT) -> None:
        self.sock.send(verdict_message(queue, packet_id, verdict))

    def send_verdicts(self, messages: list[bytes]) -> None:
        """Many verdict messages in few sends (netlink reads every message of a datagram)."""
        chunk: list[bytes] = []
        size = 0
        for m in messages:
            chunk.append(m)
            size += len(m)
            if size >= SEND_CHUNK:
                self.sock.send(b"".join(chunk))
                chunk, size = [], 0
        if chunk:
            self.sock.send(b"".join(chunk))

    def packets(self):
        """(queue, packet id, length, source, destination) of every packet waiting on the socket
        (addresses as 4 bytes); never blocks."""
        self.sock.setblocking(False)
        while True:
            try:
                data = memoryview(self.sock.recv(65536))
            except (BlockingIOError, InterruptedError):
                return
            offset = 0
            while offset + _NLMSG.size <= len(data):
                length, kind, _, _, _ = _NLMSG.unpack_from(data, offset)
                if length < _NLMSG.size:
                    break
                if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
                    queue = socket.ntohs(_NFGEN.unpack_from(data, offset + _NLMSG.size)[2])
                    attrs = _attrs(data, offset + _NLMSG.size + _NFGEN.size, offset + length)
                    hdr = attrs.get(NFQA_PACKET_HDR)
                    if hdr is not None:
                        (packet_id,) = struct.unpack_from("!I", hdr)
                        payload = attrs.get(NFQA_PAYLOAD, b"")
                        cap = attrs.get(NFQA_CAP_LEN)
                        size = struct.unpack_from("!I", cap)[0] if cap is not None else len(payload)
                        yield queue, packet_id, size, bytes(payload[12:16]), bytes(payload[16:20])
                offset += (length + 3) & ~3


def verdict_message(queue: int, packet_id: int, verdict: int = NF_ACCEPT) -> bytes:
    return _message(NFQNL_MSG_VERDICT, queue, _attr(NFQA_VERDICT_HDR, struct.pack("!II", verdict, packet_id)))


def hop_key(netns: str | None, saddr: str, daddr: str) -> tuple[str | None, bytes, bytes]:
    """How a queued packet finds its line direction: namespace, source and destination address."""
    return netns, socket.inet_aton(saddr), socket.inet_aton(daddr)


class Daemon:
    def __init__(self, config_path: str, status_path: str) -> None:
        self.config_path, self.status_path = config_path, status_path
        self.sel = selectors.DefaultSelector()
        self.sockets: dict[str | None, QueueSocket] = {}
        self.dirs: dict[tuple[str | None, bytes, bytes], Direction] = {}
        self.bound: set[tuple[str | None, int]] = set()
        self.mtime = 0
        self.seq = 0
        self.started = time.time()
        self.reloads = 0
        self.errors: list[str] = []

    def log(self, text: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} impaird[{os.getpid()}] {text}", file=sys.stderr, flush=True)

    def reload(self) -> None:
        try:
            mtime = os.stat(self.config_path).st_mtime_ns
        except FileNotFoundError:
            return
        if mtime == self.mtime:
            return
        self.mtime = mtime
        with open(self.config_path) as f:
            config = json.load(f)
        wanted = {hop_key(q.get("netns"), q["saddr"], q["daddr"]): q for q in config.get("queues", [])}
        queues = {(q.get("netns"), int(q["num"])) for q in wanted.values()}
        for key in [
            k
            for k in self.dirs
            if k not in wanted or (k[0], int(wanted[k]["num"])) != (self.dirs[k].netns, self.dirs[k].num)
        ]:
            self._release(self.dirs.pop(key), float("inf"))
        for netns, num in sorted(self.bound - queues, key=str):
            self.sockets[netns].unbind(num)
            self.bound.discard((netns, num))
            self.log(f"queue {num} unbound")
        for netns, num in sorted(queues - self.bound, key=str):
            if netns not in self.sockets:
                qs = QueueSocket(netns)
                self.sockets[netns] = qs
                self.sel.register(qs.sock, selectors.EVENT_READ, qs)
            try:
                self.sockets[netns].bind(num)
                self.bound.add((netns, num))
            except OSError as exc:  # e.g. another process holds the queue: report, keep the others
                self.errors.append(f"queue {num}: {exc}")
                self.log(f"cannot bind queue {num} ({netns or 'this namespace'}): {exc}")
        for key, spec in wanted.items():
            netns, num = spec.get("netns"), int(spec["num"])
            if (netns, num) not in self.bound:
                continue
            d = self.dirs.get(key)
            if d is None:
                d = self.dirs[key] = Direction(
                    num, netns, spec["saddr"], spec["daddr"], spec.get("line", "?"), spec.get("dir", "?")
                )
            d.configure(spec)
        self.reloads += 1
        shapes: dict[str, int] = {}
        for d in self.dirs.values():
            shape = f"{d.delay_s * 1e3:g}±{d.jitter_s * 1e3:g} ms" + (
                f" {d.rate_bps / 1e6:g} Mbit/s" if d.rate_bps else ""
            )
            shapes[shape] = shapes.get(shape, 0) + 1
        self.log(
            f"config {self.reloads}: {len(self.dirs)} line directions on {len(self.bound)} queues: "
            + ", ".join(f"{n} × {shape}" for shape, n in shapes.items())
        )

    def _due(self, d: Direction, now: float, out: list[bytes]) -> None:
        """The accept verdicts of every packet of `d` due by `now`, appended to `out`."""
        while d.held and d.held[0][0] <= now:
            release, _, packet_id = heapq.heappop(d.held)
            lag = max(0.0, time.monotonic() - release) if now != float("inf") else 0.0
            d.lag_max = max(d.lag_max, lag)
            d.lag_sum += lag
            d.released += 1
            out.append(verdict_message(d.num, packet_id))

    def _release(self, d: Direction, now: float) -> None:
        out: list[bytes] = []
        self._due(d, now, out)
        self.sockets[d.netns].send_verdicts(out)

    def write_status(self) -> None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        status = {
            "pid": os.getpid(),
            "started": self.started,
            "updated": time.time(),
            "reloads": self.reloads,
            "config_mtime_ns": self.mtime,
            "errors": self.errors[-10:],
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
            "directions": len(self.dirs),
            # the directions that carried packets: the national file has 110,000, five writes a second
            "queues": [d.status() for d in self.dirs.values() if d.packets],
        }
        tmp = f"{self.status_path}.tmp"
        with open(tmp, "w") as f:
            json.dump(status, f)
        os.replace(tmp, self.status_path)

    def run(self) -> None:
        stop = {"now": False}
        signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__("now", True))
        signal.signal(signal.SIGINT, lambda *_: stop.__setitem__("now", True))
        self.reload()
        self.write_status()
        tick = time.monotonic() + TICK
        by_hop = self.dirs
        holding: set[tuple[str | None, bytes, bytes]] = set()  # the directions with packets held: the loop's work
        try:
            while not stop["now"]:
                now = time.monotonic()
                wake = tick
                for key in holding:
                    d = by_hop[key]
                    if d.held and d.held[0][0] < wake:
                        wake = d.held[0][0]
                for sel_key, _ in self.sel.select(max(0.0, wake - now)):
                    qs = sel_key.data
                    now = time.monotonic()
                    passed: list[bytes] = []
                    for queue, packet_id, size, src, dst in qs.packets():
                        key = (qs.netns, src, dst)
                        d = by_hop.get(key)
                        if d is None or d.num != queue:  # not (or no longer) an impaired direction
                            passed.append(verdict_message(queue, packet_id))
                            continue
                        self.seq += 1
                        if d.schedule(now, size, self.seq, packet_id):
                            holding.add(key)
                        else:
                            passed.append(verdict_message(queue, packet_id, NF_DROP))
                    qs.send_verdicts(passed)
                now = time.monotonic()
                due: dict[str | None, list[bytes]] = {}
                for key in list(holding):
                    d = by_hop.get(key)
                    if d is None:
                        holding.discard(key)
                        continue
                    if d.held and d.held[0][0] <= now:
                        self._due(d, now, due.setdefault(d.netns, []))
                    if not d.held:
                        holding.discard(key)
                for netns, messages in due.items():
                    self.sockets[netns].send_verdicts(messages)
                if now >= tick:
                    tick = now + TICK
                    self.reload()
                    self.write_status()
        finally:
            for d in self.dirs.values():
                try:
                    self._release(d, float("inf"))  # let held packets go rather than drop them
                except OSError:
                    pass
            self.write_status()
            self.log("stopped")


def run_cleanup(config_path: str) -> None:
    """Run the config's `on_exit` commands (loopback mode: the rules on a shared `lo`); idempotent."""
    try:
        with open(config_path) as f:
            commands = json.load(f).get("on_exit", [])
    except (OSError, ValueError):
        return
    for argv in commands:
        subprocess.run(argv, capture_output=True, check=False)


_libc = ctypes.CDLL(None, use_errno=True)


def die_with_parent() -> None:
    """preexec_fn: SIGTERM when the parent dies (a SIGKILLed launcher takes its daemon along)."""
    _libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def supervise(config_path: str, status_path: str) -> int:
    """Keep one daemon alive: restart it when it dies (after 0.2 s); more than MAX_RESTARTS within
    30 s and the lines are reported down (they pass unimpaired: the queues bypass). On SIGTERM:
    stop the daemon, run the cleanup commands, exit. Writes STATUS.supervisor (JSON)."""
    stop = {"now": False}
    child: dict[str, subprocess.Popen | None] = {"proc": None}
    state = {"pid": os.getpid(), "daemon_pid": None, "restarts": 0, "last_exit": None, "down": False, "note": ""}

    def on_signal(signum, frame):
        stop["now"] = True
        if child["proc"] is not None and child["proc"].poll() is None:
            child["proc"].terminate()

    def write() -> None:
        tmp = f"{status_path}.supervisor.tmp"
        with open(tmp, "w") as f:
            json.dump(state, f)
        os.replace(tmp, f"{status_path}.supervisor")

    def log(text: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} impaird-supervisor[{os.getpid()}] {text}", file=sys.stderr, flush=True)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    recent: list[float] = []
    while not stop["now"]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "topology.launch.impaird", config_path, status_path], preexec_fn=die_with_parent
        )
        child["proc"] = proc
        state["daemon_pid"] = proc.pid
        write()
        rc = proc.wait()
        if stop["now"]:
            break
        now = time.monotonic()
        recent = [t for t in recent if now - t < 30] + [now]
        state["restarts"] += 1
        state["last_exit"] = rc
        if len(recent) > MAX_RESTARTS:
            state["down"] = True
            state["note"] = f"daemon died {len(recent)} times in 30 s (last exit {rc}); lines pass unimpaired"
            log(state["note"])
            write()
            while not stop["now"]:
                signal.pause()
            break
        log(f"daemon exited ({rc}); restarting")
        time.sleep(0.2)
    if child["proc"] is not None:
        try:
            child["proc"].wait(2)
        except subprocess.TimeoutExpired:
            child["proc"].kill()
            child["proc"].wait()
    run_cleanup(config_path)
    log("stopped")
    return 0


MAX_RESTARTS = 5


def main(argv: list[str]) -> int:
    if argv[:1] == ["--supervise"] and len(argv) == 3:
        return supervise(argv[1], argv[2])
    if len(argv) != 2:
        print("usage: python -m topology.launch.impaird [--supervise] CONFIG STATUS", file=sys.stderr)
        return 2
    daemon = Daemon(argv[0], argv[1])
    daemon.log(f"started: config {argv[0]}, status {argv[1]}")
    daemon.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
