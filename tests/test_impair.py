"""Line impairments with real rules, real packets and the real daemon, in both modes.

Netns tests build three small namespaces of their own (`konbini-imp-*`): a client `a` and two
servers, `b` behind the impaired line and `c` behind a line left alone. Loopback tests run this
file as a script inside `unshare -n`, so the rules they put on `lo` are private to them and the
machine's own `lo` is never touched. Latency is timed at the application (a TCP connect and one
request: two round trips), never with ping, which timestamps replies before they are held.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.konbinirun import konbini, running_up, start_up, stop_up
from topology.launch import impair, impaird, netns
from topology.netns.impair import (
    LINE_KIND_DEFAULTS,
    QUEUE_LIMIT,
    ImpairError,
    Shape,
    free_queue,
    impairments,
    parse_rate,
    plan_impairments,
)
from topology.netns.plan import build_plan
from topology.policy.nft import compile_impair_ruleset, compile_queue_rules, impair_names
from topology.spec.load import load_topology
from topology.spec.model import AllowRule, Impairment, Line, Node, Topology

REPO = Path(__file__).resolve().parent.parent
ROOT = os.geteuid() == 0
if not ROOT:  # loudly: these are the only tests of the kernel side of line impairments
    print(
        "\ntests/test_impair.py: SKIPPED, needs root (nftables, iptables-nft NFQUEUE, tc, namespaces)", file=sys.stderr
    )
needs_root = pytest.mark.skipif(
    not ROOT, reason="NEEDS ROOT: line impairments are kernel rules (nft, NFQUEUE, tc, netns)"
)

PORT = 8443
# Runs inside a namespace: `serve ADDR` answers "N\n" with N bytes; `request ADDR N COUNT` prints
# the seconds of each connect + request + full response (two round trips and the transfer).
PROBE = r"""
import json, socket, sys, threading, time
mode, addr = sys.argv[1], sys.argv[2]
if mode == "serve":
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((addr, %d)); s.listen(64)
    print("ready", flush=True)
    def one(c):
        with c:
            f = c.makefile("rb")
            for line in f:
                c.sendall(b"x" * int(line))
    while True:
        c, _ = s.accept(); threading.Thread(target=one, args=(c,), daemon=True).start()
elif mode == "request":
    size, count, out = int(sys.argv[3]), int(sys.argv[4]), []
    for _ in range(count):
        t = time.perf_counter()
        c = socket.create_connection((addr, %d), timeout=30, source_address=(sys.argv[5], 0) if len(sys.argv) > 5 else None)
        c.sendall(b"%%d\n" %% size); got = 0
        while got < size:
            got += len(c.recv(1 << 16))
        out.append(time.perf_counter() - t); c.close()
    print(json.dumps(out))
elif mode == "udp-serve":
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((addr, %d)); s.settimeout(3.0); n = 0
    print("ready", flush=True)
    try:
        while True:
            s.recv(2048); n += 1
    except socket.timeout:
        print(n, flush=True)
elif mode == "udp-send":
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((sys.argv[4], 0))
    for _ in range(int(sys.argv[3])):
        s.sendto(b"p" * 64, (addr, %d)); time.sleep(0.001)
""" % (PORT, PORT, PORT, PORT)


def small_topology(name: str, ab: Impairment = Impairment(), ac: Impairment = Impairment()) -> Topology:
    """a (client) --line-b-- b (server), a --line-c-- c (server); each node on its own site."""
    allow = (AllowRule(sources=("a",), requests=("GET /*",)),)
    nodes = {
        "a": Node(id="a", kind="kiosk", site="s-a", address="127.77.0.1", netns_address="198.18.77.1", upstream="b"),
        "b": Node(
            id="b",
            kind="store-router",
            site="s-b",
            address="127.77.0.2",
            netns_address="198.18.77.2",
            port=PORT,
            allow=allow,
        ),
        "c": Node(
            id="c",
            kind="store-router",
            site="s-c",
            address="127.77.0.3",
            netns_address="198.18.77.3",
            port=PORT,
            allow=allow,
        ),
    }
    lines = (
        Line(id="line-b", a="a", b="b", kind="closed-line", impair=ab),
        Line(id="line-c", a="a", b="c", kind="lan", impair=ac),
    )
    return Topology(name=name, nodes=nodes, lines=lines, source="<test_impair>")


def _exec(namespace: str | None, *args: str) -> list[str]:
    cmd = [sys.executable, "-c", PROBE, *args]
    return ["ip", "netns", "exec", namespace, *cmd] if namespace else cmd


def _serve(namespace: str | None, addr: str, mode: str = "serve") -> subprocess.Popen:
    proc = subprocess.Popen(_exec(namespace, mode, addr), stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def _request(namespace: str | None, addr: str, size: int = 100, count: int = 3, src: str | None = None) -> list[float]:
    """`src`: the client's own address (loopback mode: every node has one on lo, as kiosks bind theirs)."""
    args = ["request", addr, str(size), str(count)] + ([src] if src else [])
    done = subprocess.run(_exec(namespace, *args), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


class Lab:
    """Three namespaces konbini-imp-<tag>-s-{a,b,c}, the two servers, and the impairments."""

    def __init__(self, tag: str, state: Path, ab: Impairment = Impairment(), ac: Impairment = Impairment()) -> None:
        self.topo = small_topology(tag, ab, ac)
        self.plan = build_plan(self.topo, f"imp-{tag}")
        self.state = state
        self.servers: list[subprocess.Popen] = []
        netns.create_network(self.plan, state)
        try:
            self.lines = impair.Impairments(self.topo, "netns", self.plan, state)
            self.notes = self.lines.start()
            for node in ("b", "c"):
                self.servers.append(_serve(self.ns(node), self.plan.address(node)))
        except BaseException:
            self.close()
            raise

    def ns(self, node: str) -> str:
        return self.plan.namespace(self.topo.node(node).site)

    def request(self, node: str, **kw) -> list[float]:
        return _request(self.ns("a"), self.plan.address(node), **kw)

    def close(self) -> None:
        for p in self.servers:
            p.kill()
            p.wait()
        netns.teardown(self.plan.prefix, self.state)


@pytest.fixture
def lab(request, tmp_path):
    made: list[Lab] = []

    def make(tag: str, **kw) -> Lab:
        made.append(Lab(tag, tmp_path, **kw))
        return made[-1]

    yield make
    for each in made:
        each.close()


# -- the plan, no root needed ---------------------------------------------------------------------


def test_units_read_as_tc_writes_them_and_bad_ones_name_the_field():
    shape = Shape.of(Impairment(delay="20ms", jitter="500us", loss="0.5%", rate="10mbit"))
    assert (shape.delay_s, shape.jitter_s, shape.loss, shape.rate_bps) == (0.02, 0.0005, 0.005, 10e6)
    assert parse_rate("1kbps") == 8000
    with pytest.raises(ImpairError, match="loss"):
        Shape.of(Impairment(loss="5"))
    with pytest.raises(ImpairError, match="jitter needs a delay"):
        Shape.of(Impairment(jitter="1ms"))


def test_realistic_topology_uses_the_per_kind_defaults_and_impairs_each_pair_on_its_receiving_side():
    topo = load_topology(REPO / "topology" / "realistic.yaml")
    for line in topo.lines:
        assert line.impair == LINE_KIND_DEFAULTS[line.kind], line.id
    lines = {li.line: li for li in plan_impairments(topo, "loopback", impairments(topo))}
    closed = lines["closed-a1"]
    assert closed.mechanism == "nfqueue+numgen" and closed.hops[0].saddr == topo.node("store-router-a1").address
    table, chain = impair_names("r1")
    nft = compile_impair_ruleset(list(lines.values()), None, table, 2000)
    assert f'"lo" . {topo.node("store-router-a1").address} . {topo.node("ec-router-a").address}' in nft
    assert topo.node("kiosk-a1-1").address not in nft  # a line without impairment costs nothing
    rules = compile_queue_rules(list(lines.values()), None, chain, 2000)
    assert rules.count("-j NFQUEUE --queue-num 2000 ") == 1


def test_a_start_plans_only_the_impaired_lines_and_the_same_as_the_whole_plan_says():
    """national.yaml has 330,971 lines and 58,504 impairments: a start planned every line (12 s of
    the launcher's CPU before any node process started) and applies only the impaired ones."""
    topo = load_topology(REPO / "topology" / "realistic.yaml")
    overrides = {"closed-a1": Impairment(), topo.lines[0].id: Impairment(loss="1%")}  # live `link set`s
    every = plan_impairments(topo, "loopback", impairments(topo, overrides))
    impaired = plan_impairments(topo, "loopback", impairments(topo, overrides), impaired_only=True)
    assert impaired == [li for li in every if not li.shape.empty]
    assert 0 < len(impaired) < len(every) and "closed-a1" not in {li.line for li in impaired}
    assert Shape.of(Impairment(delay="5ms")) is Shape.of(Impairment(delay="5ms"))  # parsed once


def test_a_run_takes_one_queue_whatever_its_lines_and_the_national_file_fits_its_16_bits():
    """Issue 31: one queue number per line direction passed 65,535 on the national file and the
    daemon died packing it (`htons`); a run's line directions now share one queue, told apart by address."""
    topo = load_topology(REPO / "topology" / "national.yaml")
    lines = plan_impairments(topo, "loopback", impairments(topo))
    queued = [h for li in lines if li.queued for h in li.hops]
    assert len(queued) > 100_000 and {h.queue for h in queued} == {2000}
    entries = [q for li in lines for q in li.daemon_queues()]
    for num in {q["num"] for q in entries}:
        impaird._message(impaird.NFQNL_MSG_CONFIG, num, b"")  # raised OverflowError at queue 65,536
    assert len({impaird.hop_key(q["netns"], q["saddr"], q["daddr"]) for q in entries}) == len(entries)  # each its own
    table, chain = impair_names("n1")
    assert compile_queue_rules(lines, None, chain, 2000).count("NFQUEUE") == 1


def test_runs_on_one_lo_have_their_own_names_and_queue_numbers():
    assert impair_names("ab12cd34") == ("konbini_impair_ab12cd34", "KONBINI-IMP-ab12cd34")
    assert len(impair_names("ab12cd34")[1]) <= 28  # iptables' limit
    assert free_queue(set()) == 2000 and free_queue({2000, 2001, 2003}) == 2002
    with pytest.raises(ImpairError, match="every NFQUEUE number"):
        free_queue(set(range(2000, QUEUE_LIMIT + 1)))


# -- netns mode ----------------------------------------------------------------------------------


@needs_root
def test_a_20ms_line_raises_a_requests_latency_by_its_round_trips_and_the_other_line_stays_fast(lab):
    net = lab("d1", ab=Impairment(delay="20ms"))
    slow, fast = min(net.request("b")), min(net.request("c"))
    # connect (SYN, SYN-ACK) + request/response: two round trips of 2 x 20 ms
    assert slow >= 2 * 2 * 0.020, (slow, net.notes)
    assert slow < 2 * 2 * 0.020 + 0.080
    assert fast < 0.020
    status = net.lines.daemon()
    assert status["daemon_alive"] and {q["line"] for q in status["queues"]} == {"line-b"}
    assert all(q["packets"] > 0 for q in status["queues"])


@needs_root
def test_link_set_changes_a_running_line_and_reset_restores_the_file(lab):
    net = lab("d2")
    assert min(net.request("c")) < 0.020
    entry = net.lines.change("line-c", Impairment(delay="30ms", jitter="5ms"))
    assert "line-c set" in entry and "30 ms ± 5" in entry
    assert min(net.request("c")) >= 2 * 2 * (0.030 - 0.005)
    net.lines.change("line-c", None, reset=True)
    assert min(net.request("c")) < 0.020
    assert "reset" in (net.lines.dir / "changes.log").read_text()


@needs_root
def test_a_1mbit_line_bounds_a_1mib_transfer_from_below(lab):
    net = lab("r1", ab=Impairment(rate="1mbit"))
    size = 1 << 20
    (took,) = net.request("b", size=size, count=1)
    assert took >= 0.95 * size * 8 / 1e6, took
    assert took < 3 * size * 8 / 1e6
    assert "tbf" in subprocess.run(["tc", "-n", net.ns("b"), "qdisc", "show"], capture_output=True, text=True).stdout


@needs_root
def test_a_killed_daemon_is_restarted_and_the_line_stays_impaired(lab):
    net = lab("k1", ab=Impairment(delay="20ms"))
    first = net.lines.daemon()["daemon_pid"]
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        d = net.lines.daemon()
        if d["restarts"] and d["daemon_alive"] and d["daemon_pid"] != first and d["status_pid"] == d["daemon_pid"]:
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"daemon not restarted: {net.lines.daemon()}")
    assert not net.lines.daemon()["down"]
    assert min(net.request("b")) >= 2 * 2 * 0.020
    assert "restarting" in (net.lines.dir / "impaird.log").read_text()


@needs_root
def test_teardown_leaves_no_daemon_and_no_namespace(lab, tmp_path):
    net = lab("t1", ab=Impairment(delay="5ms", loss="1%"))
    sup = net.lines.daemon()
    net.close()
    assert not impair._pid_alive(sup["daemon_pid"])
    assert not any(ns.startswith("konbini-imp-t1-") for ns in netns.list_namespaces())
    assert not (net.lines.dir / "state.json").exists()


@needs_root
def test_sigkill_of_konbini_up_netns_takes_the_daemon_along_and_down_leaves_nothing(tmp_path):
    tag, state = "imp-k2", tmp_path / "s"
    up = subprocess.Popen(
        [sys.executable, "-m", "topology.cli", "up", "--netns", "--tag", tag, "--state", str(state)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
    )
    try:
        for line in up.stdout:
            if "ready" in line:
                break
        sup = impair._read_json(impair.run_dir("netns", f"konbini-{tag}-") / "status.json.supervisor")
        assert impair._pid_alive(sup.get("daemon_pid")), sup
        up.kill()
        up.wait()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and (impair._pid_alive(sup["pid"]) or impair._pid_alive(sup["daemon_pid"])):
            time.sleep(0.05)
        assert not impair._pid_alive(sup["pid"]) and not impair._pid_alive(sup["daemon_pid"])
    finally:
        subprocess.run(
            [sys.executable, "-m", "topology.cli", "down", "--tag", tag, "--state", str(state)], cwd=REPO, check=False
        )
    assert not any(ns.startswith(f"konbini-{tag}-") for ns in netns.list_namespaces())
    assert not (impair.run_dir("netns", f"konbini-{tag}-") / "state.json").exists()


@needs_root
def test_a_national_part_in_netns_impairs_the_files_lines_and_link_set_changes_one(tmp_path):
    """Issue 31: `up --netns --sites` on the national file applies its per-kind impairments and says
    so; `link show` and `link set`, given the national file, act on the part that runs."""
    tag, state, national = f"lin{os.getpid() % 10000}", str(tmp_path / "s"), str(REPO / "topology" / "national.yaml")
    target = ["--netns", "--tag", tag, "--topology", national, "--state", state]
    with running_up(
        national, "--netns", "--sites", "store-a0000[1-2]", "--tag", tag, "--state", state, tag=tag, state=state
    ) as seen:
        assert "lines impaired" in "".join(seen), "".join(seen)
        show = konbini("link", "show", *target, "--json")
        assert show.returncode == 0, show.stderr
        rows = [r for r in json.loads(show.stdout)["lines"] if r["impair"] != "-"]
        assert rows and all(r["kernel"] == "in force" for r in rows), rows
        closed = next(r["line"] for r in rows if r["kind"] == "closed-line")
        done = konbini("link", "set", closed, "--delay", "30ms", *target)
        assert done.returncode == 0 and f"line {closed} set" in done.stdout, done.stdout + done.stderr
        rows = [
            r for r in json.loads(konbini("link", "show", *target, "--json").stdout)["lines"] if r["line"] == closed
        ]
        assert [(r["impair"], r["from"], r["kernel"]) for r in rows] == [("30 ms", "link set", "in force")] * 2, rows


# -- loopback mode, each inside its own `unshare -n` ---------------------------------------------


def _in_private_net(scenario: str, tmp_path: Path, timeout: float = 90) -> dict:
    if not shutil.which("unshare"):
        pytest.fail("unshare (util-linux) is needed to keep loopback-mode rules off the machine's lo")
    cmd = [
        "unshare",
        "-n",
        "sh",
        "-c",
        f"ip link set lo up && exec {sys.executable} -m tests.test_impair {scenario} {tmp_path}",
    ]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@needs_root
def test_loopback_delay_on_one_address_pair_only(tmp_path):
    out = _in_private_net("loopback-delay", tmp_path)
    assert out["slow"] >= 2 * 2 * 0.020 and out["fast"] < 0.010, out


@needs_root
def test_loopback_5_percent_loss_is_observed_on_the_impaired_pair_only(tmp_path):
    out = _in_private_net("loopback-loss", tmp_path)
    sent = out["sent"]
    lost_b, lost_c = sent - out["got_b"], sent - out["got_c"]
    assert 0.02 * sent <= lost_b <= 0.09 * sent, out  # 5 % of 600: 30 ± 5.3 (binomial), > 3 sigma either way
    assert lost_c == 0, out
    assert out["nft_dropped"] == lost_b, out


@needs_root
def test_loopback_rate_by_the_daemons_clock_bounds_a_transfer(tmp_path):
    out = _in_private_net("loopback-rate", tmp_path)
    assert out["took"] >= 0.95 * out["size"] * 8 / out["rate"], out
    assert out["took"] < 3 * out["size"] * 8 / out["rate"], out


@needs_root
def test_two_loopback_topologies_keep_their_own_impairments_and_link_show_reports_the_kernel(tmp_path):
    """Issue 28: default.yaml and a copy on 127.28.x.x, each `konbini up` with its own state, in one
    network namespace. Each has its rules; stopping the second and a failed `issue --up` on the
    first's state leave the first's in force (its counters move); rules removed by hand show as MISSING."""
    out = _in_private_net("loopback-two-runs", tmp_path, timeout=300)
    assert out["both_up"] == [True, True], out
    assert out["in_force"]["first"] and out["in_force"]["second"], out  # every impaired direction, per the kernel
    assert out["queues"][0] != out["queues"][1] and out["tables"][0] != out["tables"][1], out
    assert out["moved"]["first"] > 0 and out["moved"]["second"] > 0, out
    assert out["issue_up"]["rc"] != 0 and "taken" in out["issue_up"]["err"], out
    assert out["after_issue_up"]["supervisor_alive"] and out["after_issue_up"]["in_force"], out
    assert not out["after_second_stopped"]["second_table"], out
    assert out["after_second_stopped"]["first_table"] and out["after_second_stopped"]["in_force"], out
    assert out["after_second_stopped"]["moved"] > 0, out  # not frozen: the first's daemon still holds its packets
    assert out["removed_by_hand"] and all(k.startswith("MISSING") for k in out["removed_by_hand"]), out
    assert out["after"] == {"table": False, "mangle": False, "queues": False, "qdisc": False}, out


@needs_root
def test_a_loopback_run_whose_queue_number_is_taken_under_it_moves_to_the_next(tmp_path):
    """Two runs starting together may pick one number; the daemon that loses the bind says so and
    the run takes the next free number (here another process binds 2000 after the run looked)."""
    out = _in_private_net("loopback-queue-race", tmp_path)
    assert out["queue"] == 2001 and out["slow"] >= 2 * 2 * 0.020, out
    assert out["kernel"] == ["in force", "in force"], out


@needs_root
def test_loopback_teardown_leaves_nothing_also_after_sigkill_of_konbini_up(tmp_path):
    out = _in_private_net("loopback-sigkill", tmp_path, timeout=180)
    assert out["during"]["mangle"] and out["during"]["queues"], out  # default.yaml: 2 ms dedicated lines, no loss
    assert out["after"] == {"table": False, "mangle": False, "queues": False, "qdisc": False, "daemon": False}, out


# -- the scenarios, run by the tests above as `python -m tests.test_impair SCENARIO DIR` -----------


def _leftovers() -> dict:
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    queues = Path("/proc/net/netfilter/nfnetlink_queue").read_text().strip()
    qdisc = subprocess.run(["tc", "qdisc", "show", "dev", "lo"], capture_output=True, text=True).stdout
    return {
        "table": "konbini_impair" in tables,
        "mangle": "ip mangle" in tables,
        "queues": bool(queues),
        "qdisc": any(k in qdisc for k in ("tbf", "htb", "netem")),
    }


def _link_show(topo_file: Path, state: Path) -> list[dict]:
    done = konbini("link", "show", "--loopback", "--topology", str(topo_file), "--state", str(state), "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)["lines"]


def _moved(topo_file: Path, state: Path) -> int:
    """Open and close one connection relay -> center over dedicated-a (2 ms, queued): by how many
    packets the daemon's count for that line grew (polled until it grows, 3 s at most)."""
    count = lambda: sum(r["packets"] or 0 for r in _link_show(topo_file, state) if r["line"] == "dedicated-a")  # noqa: E731
    before = count()
    topo = load_topology(topo_file)
    center = topo.node("issuance-center")
    with socket.create_connection(
        (center.address, center.port), timeout=5, source_address=(topo.node("dmz-relay-a").address, 0)
    ):
        pass
    deadline = time.monotonic() + 3
    while (now := count()) == before and time.monotonic() < deadline:
        time.sleep(0.1)
    return now - before


def _two_runs(tmp: Path) -> dict:
    first, second = tmp / "first.yaml", tmp / "second.yaml"
    text = (REPO / "topology" / "default.yaml").read_text()
    first.write_text(text)
    second.write_text(text.replace("address: 127.18.", "address: 127.28.").replace("name: default", "name: second"))
    s1, s2 = tmp / "s1", tmp / "s2"
    out: dict = {}
    up1, _ = start_up(str(first), "--state", str(s1))
    try:
        up2, _ = start_up(str(second), "--state", str(s2))
        try:
            out["both_up"] = [up1.poll() is None, up2.poll() is None]
            runs = [impair._read_json(impair.run_dir("loopback", state_dir=s) / "state.json") for s in (s1, s2)]
            out["queues"], out["tables"] = [r.get("queue") for r in runs], [r.get("table") for r in runs]
            out["in_force"] = {
                name: all(r.get("kernel") == "in force" for r in _link_show(f, s) if r["impair"] != "-")
                for name, f, s in (("first", first, s1), ("second", second, s2))
            }
            out["moved"] = {"first": _moved(first, s1), "second": _moved(second, s2)}
            # a second launch on the first's state directory fails (its addresses are taken), leaving the first alone
            done = konbini("issue", "--up", "--topology", str(first), "--state", str(s1))
            out["issue_up"] = {"rc": done.returncode, "err": (done.stdout + done.stderr)[-400:]}
            sup = impair._read_json(impair.run_dir("loopback", state_dir=s1) / "status.json.supervisor")
            out["after_issue_up"] = {
                "supervisor_alive": impair._pid_alive(sup.get("pid")),
                "in_force": all(r.get("kernel") == "in force" for r in _link_show(first, s1) if r["impair"] != "-"),
            }
        finally:
            stop_up(up2)
        tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
        out["after_second_stopped"] = {
            "first_table": str(runs[0].get("table")) in tables,
            "second_table": str(runs[1].get("table")) in tables,
            "in_force": all(r.get("kernel") == "in force" for r in _link_show(first, s1) if r["impair"] != "-"),
            "moved": _moved(first, s1),
        }
        subprocess.run(["nft", "delete", "table", "inet", str(runs[0].get("table"))], capture_output=True)
        out["removed_by_hand"] = [r.get("kernel", "") for r in _link_show(first, s1) if r["impair"] != "-"]
    finally:
        stop_up(up1)
    out["after"] = _leftovers()
    return out


def _scenario(name: str, state: Path) -> dict:
    if name == "loopback-two-runs":
        return _two_runs(state)
    if name == "loopback-queue-race":
        squatter = impaird.QueueSocket(None)
        squatter.bind(2000)
        impair.taken_queues = lambda namespace=None: set()  # as if it looked before the squatter bound
        topo = small_topology("lo", ab=Impairment(delay="20ms"))
        lines = impair.Impairments(topo, "loopback", state_dir=state)
        lines.start()
        try:
            a, b = topo.node("a").address, topo.node("b").address
            server = _serve(None, b)
            try:
                slow = min(_request(None, b, src=a))
            finally:
                server.kill()
            return {
                "queue": lines.queue,
                "slow": slow,
                "kernel": [r["kernel"] for r in lines.show() if r["line"] == "line-b"],
            }
        finally:
            lines.stop()
    if name == "loopback-sigkill":
        topo_file = state / "topo.yaml"
        topo_file.write_text((REPO / "topology" / "default.yaml").read_text())
        up = subprocess.Popen(
            [sys.executable, "-m", "topology.cli", "up", str(topo_file), "--state", str(state / "s")],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for line in up.stdout:
            if "ready" in line:
                break
        during = _leftovers()
        sup = impair._read_json(impair.run_dir("loopback", state_dir=state / "s") / "status.json.supervisor")
        up.kill()
        up.wait()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and (impair._pid_alive(sup.get("pid")) or _leftovers()["table"]):
            time.sleep(0.05)
        after = _leftovers() | {"daemon": impair._pid_alive(sup.get("daemon_pid")) or impair._pid_alive(sup.get("pid"))}
        return {"during": during, "after": after}
    imp = {
        "loopback-delay": Impairment(delay="20ms"),
        "loopback-loss": Impairment(loss="5%"),
        "loopback-rate": Impairment(rate="4mbit"),
    }[name]
    topo = small_topology("lo", ab=imp)
    lines = impair.Impairments(topo, "loopback", state_dir=state)
    lines.start()
    try:
        a, b, c = (topo.node(n).address for n in "abc")
        if name == "loopback-loss":
            rb, rc = _serve(None, b, "udp-serve"), _serve(None, c, "udp-serve")
            sent = 600
            for addr in (b, c):
                subprocess.run(_exec(None, "udp-send", addr, str(sent), a), check=True)
            got_b, got_c = int(rb.stdout.readline()), int(rc.stdout.readline())
            dropped = sum(v for (line, _), v in lines.loss_counters().items() if line == "line-b")
            return {"sent": sent, "got_b": got_b, "got_c": got_c, "nft_dropped": dropped}
        servers = [_serve(None, b), _serve(None, c)]
        try:
            if name == "loopback-delay":
                return {"slow": min(_request(None, b, src=a)), "fast": min(_request(None, c, src=a))}
            size = 1 << 20
            (took,) = _request(None, b, size=size, count=1, src=a)
            return {"took": took, "size": size, "rate": 4e6, "daemon": lines.daemon()["queues"]}
        finally:
            for p in servers:
                p.kill()
    finally:
        lines.stop()


if __name__ == "__main__":
    print(json.dumps(_scenario(sys.argv[1], Path(sys.argv[2]))))
