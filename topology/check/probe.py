"""The in-namespace half of `konbini policy check --netns`: send crafted frames, watch for replies.

Run as `ip netns exec konbini-SITE python -m topology.check.probe`. Protocol on the pipes:
stdin line 1: the job (JSON, below); stdout "ready" once the capture socket is open; stdin "go";
then the frames are sent, replies are watched for `timeout` seconds, and one JSON line with the
result is printed; then the next job, until stdin is closed. The frames are built by scapy in
the parent (`topology.check.policy`), so this child imports nothing heavy and twenty of them
start in a blink.

Frames for a veth leave through AF_PACKET sockets, below this namespace's own nftables output
hook: what is tested is whether the *receiving* namespace lets them in (a compromised sender
obeys no rules). Frames between two nodes of this namespace go out as raw IP (the kernel drops
packet-socket frames on lo as martians), so they pass this namespace's output and input chains,
which are the only policy between them; an output-chain drop (EPERM) is "no answer". Replies are looked for both where the probe was sent from and where its destination
lives, so a spoofed SYN accepted by its target shows up even though the SYN-ACK goes elsewhere.

job = {"site": str, "timeout": float,
       "send":  [{"id": int, "iface": str, "frame": hex}],
       "watch": [{"id": int, "src": ip, "dst": ip, "proto": "tcp"|"udp"|"icmp", "port": int, "sport": int, "ack": int}]}
result = {"site", "answered": {id: "syn-ack"|"rst"|"udp"|"icmp-unreachable"|"echo-reply"},
          "interfaces": [names], "default_route": bool, "route_out": str|null, "errors": [str]}
"""

from __future__ import annotations

import json
import select
import socket
import struct
import sys
import time

ETH_P_ALL = 0x0003


def _key(src: bytes, dst: bytes, proto: int, a: int, b: int) -> tuple:
    return (src, dst, proto, a, b)


def _acks(watch: list[dict]) -> dict[int, int]:
    """probe id -> the acknowledgement number a genuine SYN-ACK/RST to *this* run's SYN carries."""
    return {w["id"]: w["ack"] for w in watch if w["proto"] == "tcp" and "ack" in w}


def _index(watch: list[dict]) -> dict[tuple, int]:
    """Reply fingerprints -> probe id: what a reply to each watched probe looks like on the wire."""
    index = {}
    for w in watch:
        src, dst = socket.inet_aton(w["src"]), socket.inet_aton(w["dst"])
        if w["proto"] == "tcp":
            index[_key(dst, src, 6, w["port"], w["sport"])] = w["id"]
        elif w["proto"] == "udp":
            index[_key(dst, src, 17, w["port"], w["sport"])] = w["id"]
            index[_key(src, dst, 1, 3, w["port"])] = w["id"]  # ICMP unreachable quoting the probe
        elif w["proto"] == "icmp":
            index[_key(dst, src, 1, 0, w["sport"])] = w["id"]  # echo reply, id = sport
    return index


def _classify(frame: bytes, index: dict[tuple, int], acks: dict[int, int]) -> tuple[int, str] | None:
    if len(frame) < 34 or frame[12:14] != b"\x08\x00":
        return None
    ip = frame[14:]
    ihl = (ip[0] & 0x0F) * 4
    proto, src, dst, l4 = ip[9], ip[12:16], ip[16:20], ip[ihl:]
    if proto == 6 and len(l4) >= 14:
        sport, dport = struct.unpack("!HH", l4[:4])
        found = index.get(_key(src, dst, 6, sport, dport))
        if found is not None and (found not in acks or struct.unpack("!I", l4[8:12])[0] == acks[found]):
            flags = l4[13]
            return found, "syn-ack" if flags & 0x12 == 0x12 else ("rst" if flags & 0x04 else "tcp")
    elif proto == 17 and len(l4) >= 4:
        sport, dport = struct.unpack("!HH", l4[:4])
        found = index.get(_key(src, dst, 17, sport, dport))
        if found is not None:
            return found, "udp"
    elif proto == 1 and len(l4) >= 8:
        if l4[0] == 0:
            found = index.get(_key(src, dst, 1, 0, struct.unpack("!H", l4[4:6])[0]))
            if found is not None:
                return found, "echo-reply"
        elif l4[0] == 3 and len(l4) >= 8 + 20 + 4:
            inner = l4[8:]
            ihl2 = (inner[0] & 0x0F) * 4
            if len(inner) >= ihl2 + 4:
                dport = struct.unpack("!H", inner[ihl2 + 2 : ihl2 + 4])[0]
                found = index.get(_key(inner[12:16], inner[16:20], 1, 3, dport))
                if found is not None:
                    return found, "icmp-unreachable"
    return None


def _surroundings() -> tuple[list[str], bool, str | None]:
    """This namespace's interfaces, whether it has a default route, and whether 192.0.2.1 is routable."""
    names = sorted(name for _, name in socket.if_nameindex())
    default = False
    with open("/proc/net/route") as f:
        for line in f.readlines()[1:]:
            parts = line.split()
            if len(parts) > 7 and parts[1] == "00000000" and parts[7] == "00000000":
                default = True
    out = None
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(("192.0.2.1", 9))  # TEST-NET-1: any route to it is a route out of the closed network
        out = s.getsockname()[0]
    except OSError:
        pass
    finally:
        s.close()
    return names, default, out


def run(job: dict, wait_go) -> dict:
    errors: list[str] = []
    index = _index(job.get("watch", []))
    acks = _acks(job.get("watch", []))
    capture = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    capture.setblocking(False)
    # every frame sent is captured too (outgoing), lo frames twice: the default buffer overflows
    # before the first reply is read, and a dropped SYN-ACK would read as "blocked"
    try:
        capture.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)  # SO_RCVBUFFORCE (root)
    except OSError:
        capture.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 20)
    senders: dict[str, socket.socket] = {}
    for item in job.get("send", []):
        if item["iface"] == "lo" and "lo" not in senders:
            senders["lo"] = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        elif item["iface"] not in senders:
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
            try:
                s.bind((item["iface"], 0))
            except OSError as exc:
                errors.append(f"{item['iface']}: {exc.strerror}")
            senders[item["iface"]] = s
    wait_go()
    for item in job.get("send", []):
        frame = bytes.fromhex(item["frame"])
        try:
            if item["iface"] == "lo":
                senders["lo"].sendto(frame[14:], (socket.inet_ntoa(frame[30:34]), 0))
            else:
                senders[item["iface"]].send(frame)
        except PermissionError:
            pass  # lo: this namespace's output chain dropped it
        except OSError as exc:
            errors.append(f"probe {item['id']} on {item['iface']}: {exc.strerror}")
    answered: dict[int, str] = {}
    deadline = time.monotonic() + float(job.get("timeout", 0.3))
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([capture], [], [], left)[0]:
            continue
        while True:
            try:
                frame = capture.recv(65535)
            except BlockingIOError:
                break
            hit = _classify(frame, index, acks)
            if hit is not None:
                answered.setdefault(hit[0], hit[1])
    _, drops = struct.unpack("II", capture.getsockopt(263, 6, 8))  # SOL_PACKET, PACKET_STATISTICS
    if drops:
        errors.append(f"capture dropped {drops} frames; replies may have been missed")
    capture.close()
    for s in senders.values():
        s.close()
    names, default, out = _surroundings()
    return {
        "site": job.get("site"),
        "answered": answered,
        "interfaces": names,
        "default_route": default,
        "route_out": out,
        "errors": errors,
    }


def main() -> int:
    def wait_go() -> None:
        print("ready", flush=True)
        sys.stdin.readline()

    while line := sys.stdin.readline():  # job after job until stdin closes (`policy mutate --netns` reuses one)
        print(json.dumps(run(json.loads(line), wait_go)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
