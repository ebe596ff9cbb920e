"""One namespace's nftables ruleset, compiled from the topology's allow-lists (netns mode).

Same data as the app-level check (`policy.reachability`), so the kernel and the servers cannot
disagree. Deny by default on input, forward and output; allow exactly the allow-listed
(source address -> destination address, tcp port) pairs as new connections, then their
established/related packets. Before any of that, anti-spoofing: a packet arriving on a veth
must come from the one node at the far end of that line. Every accept names the allow entry
it comes from ("nodes.ocsp.allow[0]"), so a rule traces back to one line of the topology file.
"""

from __future__ import annotations

from topology.netns.impair import Hop, LineImpairment
from topology.netns.plan import NetPlan, build_plan
from topology.policy.compiler import reachability
from topology.spec.model import Topology

TABLE = "konbini"


def _comment(text: str) -> str:
    """nft caps comments at 128 bytes."""
    return f'comment "{text[:120]}"'


def _allow_rules(topo: Topology, plan: NetPlan, site: str, side: str) -> list[str]:
    """accept rules for new connections whose destination (side "dst") or source ("src") is on `site`."""
    rules = []
    for reach in reachability(topo):
        if not reach.allowed:
            continue
        here = reach.dst if side == "dst" else reach.src
        if topo.nodes[here].site != site:
            continue
        src, dst = plan.address(reach.src), plan.address(reach.dst)
        rules.append(
            f'ip saddr {src} ip daddr {dst} tcp dport {reach.port} ct state new counter accept '
            + _comment(f"{reach.rule}: {reach.src} -> {reach.dst}")
        )
    return rules


def compile_ruleset(topo: Topology, site: str, plan: NetPlan | None = None) -> str:
    """The `nft -f` text for the namespace of `site`."""
    plan = plan or build_plan(topo)
    if site not in plan.sites:
        raise ValueError(f"unknown site {site!r}; sites: {', '.join(sorted(plan.sites))}")
    info = plan.sites[site]
    local = ", ".join(plan.local_addresses(site))
    out = [
        f"# konbini {topo.name}: site {site} (namespace {info.namespace}); nodes {', '.join(info.nodes)}",
        f"# compiled from the allow-lists of {topo.source}; default drop, every accept names its allow entry",
        f"table inet {TABLE}",
        f"delete table inet {TABLE}",
        f"table inet {TABLE} {{",
        "\tset local {",
        "\t\ttype ipv4_addr",
        f"\t\telements = {{ {local} }}",
        "\t}",
        "",
        "\tchain antispoof {",
        "\t\ttype filter hook prerouting priority raw; policy accept;",
        '\t\tiifname "lo" ip saddr != @local counter drop comment "anti-spoofing: lo carries only local sources"',
    ]
    for iface in info.interfaces:
        peer = plan.address(iface.peer)
        out.append(
            f'\t\tiifname "{iface.name}" ip saddr != {peer} counter drop '
            + _comment(f"anti-spoofing: line {iface.line} reaches only {iface.peer}")
        )
    names = ", ".join(f'"{n}"' for n in ["lo", *(i.name for i in info.interfaces)])
    out += [
        f'\t\tiifname != {{ {names} }} counter drop comment "not an interface of this topology"',
        "\t}",
        "",
        "\tchain input {",
        "\t\ttype filter hook input priority filter; policy drop;",
        "\t\tct state established,related accept",
        *(f"\t\t{r}" for r in _allow_rules(topo, plan, site, "dst")),
        '\t\tcounter comment "default drop"',
        "\t}",
        "",
        "\tchain forward {",
        "\t\ttype filter hook forward priority filter; policy drop;",
        '\t\tcounter comment "no namespace forwards: every hop is an application relay (SEC-EC-3)"',
        "\t}",
        "",
        "\tchain output {",
        "\t\ttype filter hook output priority filter; policy drop;",
        "\t\tct state established,related accept",
        *(f"\t\t{r}" for r in _allow_rules(topo, plan, site, "src")),
        '\t\tcounter comment "default drop"',
        "\t}",
        "}",
    ]
    return "\n".join(out) + "\n"


# -- line impairments (topology.netns.impair): loss and queue rules on the receiving side -----------

IMPAIR_TABLE = "konbini_impair"  # its own table: replacing it never touches the policy above
IMPAIR_CHAIN = "KONBINI-IMP"  # iptables-nft chain in table mangle (nft has no `queue` here; xt NFQUEUE does)
LOSS_PRIORITY = -160  # after anti-spoofing (raw, -300), just before the hold (mangle, -150)
LOSS_SCALE = 1_000_000  # numgen draws per million: 0.001 % is the finest loss


def _hop_match(hop: Hop) -> str:
    return f'iifname "{hop.iif}" ip saddr {hop.saddr} ip daddr {hop.daddr}'


def compile_impair_ruleset(lines: list[LineImpairment], namespace: str | None, table: str = IMPAIR_TABLE) -> str | None:
    """The `nft -f` text of one namespace's loss rules (None: the namespace has none, delete the table)."""
    rules = [
        f"\t\t{_hop_match(h)} numgen random mod {LOSS_SCALE} < {round(li.shape.loss * LOSS_SCALE)} counter drop "
        + _comment(f"line {li.line} {h.direction}: loss {li.shape.loss * 100:g}%")
        for li in lines if li.shape.loss and not li.netem
        for h in li.hops if h.namespace == namespace
    ]
    if not rules:
        return None
    return "\n".join([
        f"table inet {table}",
        f"delete table inet {table}",
        f"table inet {table} {{",
        "\tchain loss {",
        f"\t\ttype filter hook prerouting priority {LOSS_PRIORITY}; policy accept;",
        *rules,
        "\t}",
        "}",
    ]) + "\n"


def compile_queue_rules(lines: list[LineImpairment], namespace: str | None, chain: str = IMPAIR_CHAIN) -> str:
    """The `iptables-restore --noflush` text of one namespace's NFQUEUE rules (an empty chain when none).
    `--queue-bypass`: with no daemon bound the line passes unimpaired instead of going dead."""
    out = ["*mangle", f":{chain} - [0:0]"]
    out += [
        f"-A {chain} -i {h.iif} -s {h.saddr}/32 -d {h.daddr}/32 -m comment --comment \"line {li.line} {h.direction}\" "
        f"-j NFQUEUE --queue-num {h.queue} --queue-bypass"
        for li in lines if li.queued
        for h in li.hops if h.namespace == namespace
    ]
    return "\n".join(out + ["COMMIT"]) + "\n"
