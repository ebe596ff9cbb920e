"""Outside tools as evidence for `konbini policy check --netns`: not konbini's own probes but
Debian's testssl.sh, OpenSSL's s_client and nmap, run inside the namespaces against the running
nodes, their verdicts shaped as the annex checks are (`topology.check.annex.AnnexCheck`).

- SEC-SN-2, one node of each server kind, from an address its policy admits (the source of a
  line to it, or else the monitoring namespace on its metrics port, which has the same TLS
  context): testssl.sh `-p -s` sees TLS 1.3 and nothing older, and no weak cipher category;
  s_client without a client certificate sees the server ask for one (CertificateRequest) and
  refuse the handshake (alert certificate_required). testssl.sh 3.0.8 cannot see TLS 1.3 client
  authentication itself (it looks for a TLS 1.2 master key), hence s_client for that item.
- SEC-ST-4: nmap `-sT` from each in-store Wi-Fi namespace against its store's kiosks, router and
  controller: no port open or closed (closed would mean a reset came back: reachable).
- SEC-SN-3: nmap from each store's namespace against the issuance center, OCSP and the
  municipalities: nothing reachable; the store's EC router on its port, open, is the control that
  shows nmap sees an open port from there.

A tool that is not installed, fails or overruns its bound gives a failed item saying so, never
a silent pass. Only 198.18.0.0/15 addresses of this topology are targeted.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from topology.check.annex import AnnexCheck
from topology.netns.plan import MONITORING_SITE, NetPlan
from topology.pki import PKI
from topology.policy.nft import allowed_flows
from topology.spec.model import Topology

TESTSSL_TIMEOUT = 120  # seconds per target (one takes ~15 s alone, more while others run)
TESTSSL_PARALLEL = 2  # testssl.sh is CPU-bound bash and openssl forks: more than the cores gains nothing
NMAP_TIMEOUT = 60
SCLIENT_TIMEOUT = 15
NMAP_PORTS = "1-1024,8443,9440,9464"  # the well-known ports and every konbini port (service, admin, metrics)
UNROUTED = "198.19.255.254"  # in 198.18/15, no node's, no namespace has a route to it
OLD_PROTOCOLS = ("SSLv2", "SSLv3", "TLS1", "TLS1_1", "TLS1_2")
WEAK_CIPHERS = (
    "cipherlist_NULL",
    "cipherlist_aNULL",
    "cipherlist_EXPORT",
    "cipherlist_LOW",
    "cipherlist_3DES_IDEA",
    "cipherlist_AVERAGE",
)
REACHABLE = ("open", "closed", "unfiltered", "open|filtered")  # "closed": a RST came back, so the host is reachable

# testssl.sh's feature probes (`openssl s_client -tls1_3` and the like) dial localhost:4433 when
# given no -connect; a namespace's ruleset drops that SYN silently and the kernel retries it for
# minutes. Pointed at an unrouted address instead, they fail at once, as testssl expects.
#
# testssl.sh decides whether it can connect at all from `s_client … </dev/null`'s exit status
# (its fallback looks for a master key, which TLS 1.3 does not print). Against a TLS 1.3 server
# that requires a client certificate that status is a race, measured with `openssl s_server
# -Verify 1 -tls1_3` on an idle machine (0 of 40 exited 0) and seen against konbini under load
# in CI ("Your OpenSSL cannot connect", both attempts): s_client exits 0 if it reads the end of
# its stdin before the server's certificate_required alert, 1 if the alert comes first. A probe
# that ends on that alert has completed every step of the handshake up to the client-certificate
# check (ServerHello, the server's certificate, CertificateRequest): the server is reachable and
# negotiated that protocol and cipher, so the wrapper reports it as connected (exit 0), as
# testssl.sh 3.2 reads TLS 1.3 client authentication. Every other outcome passes through
# unchanged: a refused protocol or cipher ends on another alert before any of that.
OPENSSL_WRAPPER = f"""#!/bin/sh
if [ "$1" = s_client ]; then
  case " $* " in *" -connect "*) ;; *) exec openssl "$@" -connect {UNROUTED}:4433 ;; esac
  err=$(mktemp)
  openssl "$@" 2>"$err"; rc=$?
  cat "$err" >&2
  if [ $rc -ne 0 ] && grep -q "alert certificate required" "$err"; then rc=0; fi
  rm -f "$err"; exit $rc
fi
exec openssl "$@"
"""


@dataclass(frozen=True)
class TlsTarget:
    kind: str
    node: str
    address: str
    port: int
    surface: str  # "line" | "metrics"
    source: str  # node id or "monitoring"
    source_ip: str
    namespace: str


# -- verdicts from the tools' own output (pure) ---------------------------------------------------


def read_testssl(findings: list[dict]) -> dict:
    """testssl.sh's JSON (`--jsonfile`): TLS 1.3 offered, every older protocol and weak cipher
    category not offered. A finding missing from the file counts against (the scan did not finish)."""
    by_id = {f.get("id"): str(f.get("finding", "")) for f in findings}
    scanned = "TLS1_3" in by_id
    offered_old = [p for p in OLD_PROTOCOLS if not by_id.get(p, "").startswith("not offered")]
    weak = [c for c in WEAK_CIPHERS if by_id.get(c) != "not offered"]
    tls13 = by_id.get("TLS1_3", "").startswith("offered")
    if not scanned:
        summary = f"no protocol findings: {by_id.get('optimal_proto') or by_id.get('scanTime') or 'scan cut short'}"
    else:
        summary = (
            f"TLS1_3 {by_id['TLS1_3']!r}; older offered: {', '.join(offered_old) or 'none'}; "
            f"weak cipher categories offered: {', '.join(weak) or 'none'}"
        )
    return {
        "scanned": scanned,
        "tls13": tls13,
        "older_offered": offered_old,
        "weak_offered": weak,
        "ok": tls13 and not offered_old and not weak,
        "summary": summary,
    }


def read_sclient(text: str, http: bool = False) -> dict:
    """`openssl s_client -msg -ign_eof` without a client certificate, a request sent: the server must
    ask for one (CertificateRequest) and refuse. On an h2 port refusal is the TLS alert
    certificate_required (an accepting h2 server would also hang up on an HTTP/1.1 line, so a
    closed connection proves nothing there); on an HTTP/1.1 port (`http`) the alert, or the
    connection closed or reset with no HTTP response."""
    asked = "CertificateRequest" in text
    alert = "certificate_required" in text or "alert certificate required" in text or "alert number 116" in text
    closed = alert or "unexpected eof" in text or "errno=104" in text
    answered = "HTTP/1." in text
    refused = alert or (http and closed and not answered)
    return {
        "certificate_request": asked,
        "alert": alert,
        "answered": answered,
        "refused": refused,
        "ok": asked and refused,
    }


def read_nmap(xml_text: str) -> dict:
    """nmap's XML (`-oX`): per address, the ports nmap could reach (open or closed) and how many it could not."""
    hosts: dict[str, dict] = {}
    for host in ET.fromstring(xml_text).iter("host"):
        addr = next((a.get("addr") for a in host.iter("address") if a.get("addrtype") == "ipv4"), "?")
        h = hosts.setdefault(addr, {"reachable": [], "filtered": 0})
        for port in host.iter("port"):
            state = port.find("state")
            if state is not None and state.get("state") in REACHABLE:
                h["reachable"].append(f"{port.get('portid')}/{state.get('state')}")
            else:
                h["filtered"] += 1
        for extra in host.iter("extraports"):
            if extra.get("state") in REACHABLE:
                h["reachable"].append(f"{extra.get('count')} ports {extra.get('state')}")
            else:
                h["filtered"] += int(extra.get("count", 0))
    return hosts


# -- running them inside the namespaces ---------------------------------------------------------


def _namespace(plan: NetPlan, site: str) -> str:
    return (
        plan.monitoring.namespace if site == MONITORING_SITE and plan.monitoring is not None else plan.namespace(site)
    )


def _kernel_source(namespace: str, address: str) -> str | None:
    """The source address this namespace's kernel picks towards `address` (tools cannot bind one)."""
    done = subprocess.run(
        ["ip", "-n", namespace, "route", "get", address], capture_output=True, text=True, timeout=10, check=False
    )
    words = done.stdout.split()
    return words[words.index("src") + 1] if "src" in words else None


def tls_targets(topo: Topology, plan: NetPlan) -> list[TlsTarget]:
    """One node of each server kind, with a source its policy admits whose address the kernel
    picks by itself there: a line's far end (the service port), else the monitoring namespace."""
    flows = allowed_flows(topo, plan)
    out = []
    for kind in dict.fromkeys(n.kind for n in topo.nodes.values() if n.is_server):
        candidates = [
            f for f in flows if f.surface == "line" and f.src_site != f.dst_site and topo.node(f.dst).kind == kind
        ]
        candidates += [f for f in flows if f.surface == "metrics" and topo.node(f.dst).kind == kind]
        for f in candidates:
            ns = _namespace(plan, f.src_site)
            if _kernel_source(ns, f.dst_ip) == f.src_ip:
                out.append(TlsTarget(kind, f.dst, f.dst_ip, f.port, f.surface, f.src, f.src_ip, ns))
                break
    return out


def _not_run(requirement: str, check: str, expected: str, why: str, tool: str) -> dict:
    return asdict(AnnexCheck(requirement, check, expected, f"NOT RUN: {why}", False, tool=tool))


def _testssl(t: TlsTarget, work: Path, binary: str, attempts: int = 2) -> dict:
    """testssl.sh against one target; a scan that could not connect at all ("Scan interrupted",
    seen when the machine is loaded and a handshake overruns its timeout) is tried once more."""
    check = f"{t.node} ({t.kind}) {t.address}:{t.port} from {t.source} ({t.source_ip}, {t.namespace})"
    expected = "TLS 1.3 only (SSLv2..TLS 1.2 not offered), no NULL/aNULL/EXPORT/LOW/3DES/AVERAGE cipher offered"
    tool = "testssl.sh -p -s (Debian)"
    t0 = time.perf_counter()
    for attempt in range(1, attempts + 1):
        out = work / f"testssl-{t.node}-{attempt}.json"
        cmd = [
            "ip",
            "netns",
            "exec",
            t.namespace,
            binary,
            "--openssl",
            str(work / "openssl"),
            "--quiet",
            "--warnings",
            "batch",
            "--nodns",
            "none",
            "--color",
            "0",
            "-p",
            "-s",
            "--connect-timeout",
            "10",
            "--openssl-timeout",
            "10",
            "--jsonfile",
            str(out),
            f"https://{t.address}:{t.port}",
        ]
        try:
            subprocess.run(cmd, capture_output=True, text=True, timeout=TESTSSL_TIMEOUT, check=False)
        except subprocess.TimeoutExpired:
            return _not_run("SEC-SN-2", check, expected, f"testssl.sh ran over {TESTSSL_TIMEOUT} s", tool)
        try:
            findings = json.loads(out.read_text())
        except (OSError, ValueError) as exc:
            return _not_run("SEC-SN-2", check, expected, f"testssl.sh wrote no JSON ({exc})", tool)
        v = read_testssl(findings)
        if v["scanned"]:
            break
    return asdict(
        AnnexCheck(
            "SEC-SN-2",
            check,
            expected,
            v["summary"],
            v["ok"],
            tool=tool,
            numbers={
                "seconds": round(time.perf_counter() - t0, 1),
                "surface": t.surface,
                "attempts": attempt,
                "json": out.name,
            },
        )
    )


def _sclient(t: TlsTarget, ca: str) -> dict:
    check = f"{t.node} ({t.kind}) {t.address}:{t.port} without a client certificate, from {t.source} ({t.namespace})"
    expected = "the server asks for a client certificate and refuses the handshake without one"
    tool = "openssl s_client -msg"
    alpn = "h2" if t.surface == "line" else "http/1.1"
    cmd = [
        "ip",
        "netns",
        "exec",
        t.namespace,
        "openssl",
        "s_client",
        "-connect",
        f"{t.address}:{t.port}",
        "-tls1_3",
        "-msg",
        "-ign_eof",
        "-alpn",
        alpn,
        "-CAfile",
        ca,
        "-servername",
        t.node,
    ]
    try:
        done = subprocess.run(
            cmd,
            input=f"GET / HTTP/1.1\r\nHost: {t.node}\r\n\r\n",
            capture_output=True,
            text=True,
            timeout=SCLIENT_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return _not_run("SEC-SN-2", check, expected, f"s_client ran over {SCLIENT_TIMEOUT} s", tool)
    v = read_sclient(done.stdout + done.stderr, http=alpn == "http/1.1")
    how = "alert certificate_required" if v["alert"] else "connection closed, no HTTP response"
    observed = (
        f"CertificateRequest {'sent' if v['certificate_request'] else 'NOT sent'}; "
        f"{'refused: ' + how if v['refused'] else 'NOT refused' + (' (HTTP response)' if v['answered'] else '')}"
    )
    return asdict(AnnexCheck("SEC-SN-2", check, expected, observed, v["ok"], tool=tool))


def _nmap(
    requirement: str,
    namespace: str,
    source: str,
    targets: dict[str, str],
    control: tuple[str, str, int] | None,
    work: Path,
) -> dict:
    """nmap from `namespace` against `targets` (address -> node): none of them reachable; `control`
    (node, address, port) must be open, or the scan proves nothing."""
    names = ", ".join(targets.values())
    check = f"nmap from {source} ({namespace}) against {names}" + (
        f"; control {control[0]}:{control[2]}" if control else ""
    )
    expected = f"no port of {NMAP_PORTS} open or closed on any of them" + ("; the control open" if control else "")
    tool = "nmap -sT -Pn"
    out = work / f"nmap-{namespace}.xml"
    addrs = [*targets, *([control[1]] if control else [])]
    ports = NMAP_PORTS if not control else f"{NMAP_PORTS},{control[2]}"
    cmd = [
        "ip",
        "netns",
        "exec",
        namespace,
        "nmap",
        "-n",
        "-Pn",
        "-sT",
        "-p",
        ports,
        "--max-retries",
        "1",
        "--host-timeout",
        "40s",
        "-oX",
        str(out),
        *addrs,
    ]
    try:
        subprocess.run(cmd, capture_output=True, text=True, timeout=NMAP_TIMEOUT, check=False)
        hosts = read_nmap(out.read_text())
    except subprocess.TimeoutExpired:
        return _not_run(requirement, check, expected, f"nmap ran over {NMAP_TIMEOUT} s", tool)
    except (OSError, ET.ParseError) as exc:
        return _not_run(requirement, check, expected, f"nmap wrote no XML ({exc})", tool)
    reached = {targets[a]: h["reachable"] for a, h in hosts.items() if a in targets and h["reachable"]}
    missing = [targets[a] for a in targets if a not in hosts]
    control_open = control is None or f"{control[2]}/open" in hosts.get(control[1], {}).get("reachable", [])
    observed = (
        f"reachable: {reached or 'nothing'}; filtered ports: {sum(h['filtered'] for a, h in hosts.items() if a in targets)}"
        + (f"; not scanned: {missing}" if missing else "")
        + (f"; control {'open' if control_open else 'NOT open'}" if control else "")
    )
    return asdict(
        AnnexCheck(requirement, check, expected, observed, not reached and not missing and control_open, tool=tool)
    )


def _store_targets(topo: Topology, plan: NetPlan, site: str) -> dict[str, str]:
    return {
        plan.address(n): n
        for n in plan.sites[site].nodes
        if topo.node(n).kind in ("kiosk", "store-router", "store-controller")
    }


def nmap_checks(topo: Topology, plan: NetPlan, work: Path) -> list[tuple]:
    """(requirement, namespace, source, targets, control) for every nmap run."""
    runs = []
    for wifi in topo.of_kind("wifi"):  # the Wi-Fi of a store stands on its own site, linked to the store's
        store = next((i.peer_site for i in plan.sites[wifi.site].interfaces), None)
        if store is not None:
            runs.append(("SEC-ST-4", plan.namespace(wifi.site), wifi.id, _store_targets(topo, plan, store), None))
    center = {
        plan.address(n.id): n.id for n in topo.nodes.values() if n.kind in ("issuance-center", "ocsp", "municipality")
    }
    for router in topo.of_kind("store-router"):
        ns = plan.namespace(router.site)
        up = next((f for f in allowed_flows(topo, plan) if f.src == router.id and f.src_site != f.dst_site), None)
        if up is None or _kernel_source(ns, up.dst_ip) != up.src_ip:
            continue  # no line out whose source the kernel would pick: no control, so no scan from here
        runs.append(("SEC-SN-3", ns, router.id, center, (up.dst, up.dst_ip, up.port)))
    return runs


def run_outside_tools(topo: Topology, plan: NetPlan, state_dir: Path) -> list[dict]:
    """Every outside-tool item, as annex checks are shaped (one list, in a stable order)."""
    t0 = time.perf_counter()
    # the tools' own files stay, for an auditor to read: testssl.sh will not overwrite one anyway
    work = Path(tempfile.mkdtemp(prefix=time.strftime("outside-%Y%m%dT%H%M%S-"), dir=state_dir))
    (work / "openssl").write_text(OPENSSL_WRAPPER)
    (work / "openssl").chmod(0o755)
    targets = tls_targets(topo, plan)
    testssl = shutil.which("testssl") or shutil.which("testssl.sh")
    out: list[dict] = []
    with ThreadPoolExecutor(TESTSSL_PARALLEL) as pool:
        nmap_runs = nmap_checks(topo, plan, work)
        if shutil.which("nmap"):
            nmaps = [pool.submit(_nmap, *run, work) for run in nmap_runs]
        else:
            nmaps = []
            out += [
                _not_run(
                    r[0],
                    f"nmap from {r[2]} ({r[1]})",
                    "nothing reachable",
                    "nmap not installed (apt-get install nmap)",
                    "nmap -sT -Pn",
                )
                for r in nmap_runs
            ]
        if testssl:
            tls = [pool.submit(_testssl, t, work, testssl) for t in targets]
        else:
            tls = []
            out += [
                _not_run(
                    "SEC-SN-2",
                    f"{t.node} ({t.kind}) {t.address}:{t.port}",
                    "TLS 1.3 only, no weak cipher",
                    "testssl.sh not installed (apt-get install testssl.sh)",
                    "testssl.sh -p -s (Debian)",
                )
                for t in targets
            ]
        if shutil.which("openssl"):
            ca = str(PKI.ensure(state_dir, topo).network_ca_path)
            tls += [pool.submit(_sclient, t, ca) for t in targets]
        else:
            out += [
                _not_run(
                    "SEC-SN-2",
                    f"{t.node} without a client certificate",
                    "refused",
                    "openssl not installed",
                    "openssl s_client -msg",
                )
                for t in targets
            ]
        out += [f.result() for f in tls + nmaps]
    kinds = {n.kind for n in topo.nodes.values() if n.is_server}
    missing = sorted(kinds - {t.kind for t in targets})
    if missing:  # a kind with no admissible source the tools could use is a gap, reported as one
        out.append(
            _not_run(
                "SEC-SN-2",
                f"server kinds {', '.join(missing)}",
                "one node of each server kind scanned",
                "no admitted source whose address the kernel picks",
                "testssl.sh -p -s (Debian)",
            )
        )
    for c in out:
        c["numbers"] = {**c.get("numbers", {}), "outside_tools_s": round(time.perf_counter() - t0, 1)}
    return out
