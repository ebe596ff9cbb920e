"""One namespace's nftables ruleset, compiled from the topology's allow-lists (netns mode).

Same data as the app-level check (`policy.reachability`), so the kernel and the servers cannot
disagree. Deny by default on input, forward and output; allow exactly the allow-listed
(source address -> destination address, tcp port) pairs as new connections, then their
established/related packets. Before any of that, anti-spoofing: a packet arriving on a veth
must come from the one node at the far end of that line. Every accept names the allow entry
it comes from ("nodes.ocsp.allow[0]"), so a rule traces back to one line of the topology file.
Besides the lines' pairs: each admin surface's consoles on its `admin_port` (`admin_reachability`)
and the monitoring namespace on every server's metrics port (`topology.policy.monitoring`).
"""

from __future__ import annotations

from dataclasses import dataclass

from topology.netns.impair import MARK_MASK, Hop, LineImpairment, run_mark
from topology.netns.plan import MONITORING_SITE, NetPlan, build_plan
from topology.policy.compiler import admin_label, allowed_admin_reachability, allowed_reachability
from topology.policy.monitoring import METRICS_PORT, MONITORING_PRINCIPAL
from topology.policy.monitoring import RULE as MONITORING_RULE
from topology.spec.model import Topology

TABLE = "konbini"


@dataclass(frozen=True)
class Flow:
    """One allowed new connection as the kernel sees it: addresses, port, and the entry allowing it."""

    src: str  # node id, or "monitoring"
    dst: str
    src_site: str  # the monitoring namespace's is MONITORING_SITE
    dst_site: str
    src_ip: str
    dst_ip: str
    port: int
    rule: str
    surface: str  # "line" | "admin" | "metrics"


def allowed_flows(topo: Topology, plan: NetPlan) -> list[Flow]:
    """Every connection the rulesets accept: the allow-lists' pairs, the admin consoles, the scrapes."""
    flows = []
    for surface, matrix in (("line", allowed_reachability(topo)), ("admin", allowed_admin_reachability(topo))):
        for r in matrix:
            if r.allowed:
                flows.append(
                    Flow(
                        r.src,
                        r.dst,
                        topo.nodes[r.src].site,
                        topo.nodes[r.dst].site,
                        plan.address(r.src),
                        plan.address(r.dst),
                        r.port,
                        r.rule or "",
                        surface,
                    )
                )
    for node in topo.nodes.values():  # a console at the node itself (the store controller's own console)
        index = next((i for i, rule in enumerate(node.admin) if node.id in rule.at), None)
        if index is not None and node.admin_port is not None:
            addr = plan.address(node.id)
            flows.append(
                Flow(
                    node.id,
                    node.id,
                    node.site,
                    node.site,
                    addr,
                    addr,
                    node.admin_port,
                    admin_label(node.id, index),
                    "admin",
                )
            )
    if plan.monitoring is not None:
        for site in plan.monitoring.links:
            for node_id in plan.sites[site].servers:
                flows.append(
                    Flow(
                        MONITORING_PRINCIPAL,
                        node_id,
                        MONITORING_SITE,
                        site,
                        plan.monitoring.address,
                        plan.address(node_id),
                        METRICS_PORT,
                        MONITORING_RULE,
                        "metrics",
                    )
                )
    return flows


def accept_rule(flow: Flow) -> str:
    """The one nft rule that lets `flow` open a connection (in the input or the output chain alike)."""
    return (
        f"ip saddr {flow.src_ip} ip daddr {flow.dst_ip} tcp dport {flow.port} ct state new counter accept "
        + _comment(f"{flow.rule}: {flow.src} -> {flow.dst}")
    )


def _comment(text: str) -> str:
    """nft caps comments at 128 bytes."""
    return f'comment "{text[:120]}"'


def _allow_rules(flows: list[Flow], site: str, side: str) -> list[str]:
    """accept rules for new connections whose destination (side "dst") or source ("src") is on `site`."""
    return [accept_rule(f) for f in flows if (f.dst_site if side == "dst" else f.src_site) == site]


def _chains(antispoof: list[str], names: list[str], inputs: list[str], outputs: list[str]) -> list[str]:
    """The four chains every ruleset has: anti-spoofing, then input/forward/output, default drop."""
    quoted = ", ".join(f'"{n}"' for n in names)
    return [
        "\tchain antispoof {",
        "\t\ttype filter hook prerouting priority raw; policy accept;",
        *(f"\t\t{r}" for r in antispoof),
        f'\t\tiifname != {{ {quoted} }} counter drop comment "not an interface of this topology"',
        "\t}",
        "",
        "\tchain input {",
        "\t\ttype filter hook input priority filter; policy drop;",
        "\t\tct state established,related accept",
        *(f"\t\t{r}" for r in inputs),
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
        *(f"\t\t{r}" for r in outputs),
        '\t\tcounter comment "default drop"',
        "\t}",
        "}",
    ]


def _header(lines: list[str], local: str) -> list[str]:
    return [
        *lines,
        f"table inet {TABLE}",
        f"delete table inet {TABLE}",
        f"table inet {TABLE} {{",
        "\tset local {",
        "\t\ttype ipv4_addr",
        f"\t\telements = {{ {local} }}",
        "\t}",
        "",
    ]


def compile_rulesets(topo: Topology, plan: NetPlan) -> dict[str, str]:
    """Every namespace's ruleset (the monitoring one last), from one `allowed_flows`, each given
    only the flows from or to its site: one ruleset after another would each compute the whole
    matrix again (docs/national.md), and each scanning every flow is sites x flows again."""
    sites = [*plan.sites, *([MONITORING_SITE] if plan.monitoring is not None else [])]
    touching: dict[str, list[Flow]] = {site: [] for site in sites}  # each site's flows, in order
    for f in allowed_flows(topo, plan):
        touching[f.src_site].append(f)
        if f.dst_site != f.src_site:
            touching[f.dst_site].append(f)
    return {site: compile_ruleset(topo, site, plan, touching[site]) for site in sites}


def compile_ruleset(topo: Topology, site: str, plan: NetPlan | None = None, flows: list[Flow] | None = None) -> str:
    """The `nft -f` text for the namespace of `site` (or of the monitoring namespace, MONITORING_SITE).
    `flows`: `allowed_flows(topo, plan)`, or at least those from or to `site`, where the caller has them."""
    plan = plan or build_plan(topo)
    flows = allowed_flows(topo, plan) if flows is None else flows
    if site == MONITORING_SITE and plan.monitoring is not None:
        return compile_monitoring_ruleset(topo, plan, flows)
    if site not in plan.sites:
        raise ValueError(f"unknown site {site!r}; sites: {', '.join(sorted(plan.sites))}")
    info = plan.sites[site]
    antispoof = ['iifname "lo" ip saddr != @local counter drop comment "anti-spoofing: lo carries only local sources"']
    for iface in info.interfaces:
        antispoof.append(
            f'iifname "{iface.name}" ip saddr != {plan.address(iface.peer)} counter drop '
            + _comment(f"anti-spoofing: line {iface.line} reaches only {iface.peer}")
        )
    link = plan.monitor_link(site)
    if link is not None and plan.monitoring is not None:
        antispoof.append(
            f'iifname "{link.site_ifname}" ip saddr != {plan.monitoring.address} counter drop '
            + _comment("anti-spoofing: the monitoring veth carries only the monitoring principal")
        )
    head = _header(
        [
            f"# konbini {topo.name}: site {site} (namespace {info.namespace}); nodes {', '.join(info.nodes)}",
            f"# compiled from the allow-lists of {topo.source}; default drop, every accept names its allow entry",
        ],
        ", ".join(plan.local_addresses(site)),
    )
    out = head + _chains(
        antispoof, plan.interface_names(site), _allow_rules(flows, site, "dst"), _allow_rules(flows, site, "src")
    )
    return "\n".join(out) + "\n"


def compile_monitoring_ruleset(topo: Topology, plan: NetPlan, flows: list[Flow] | None = None) -> str:
    """The monitoring namespace: it may open scrapes to every server's metrics port and nothing else;
    nothing may open a connection to it."""
    mon = plan.monitoring
    assert mon is not None
    antispoof = ['iifname "lo" ip saddr != @local counter drop comment "anti-spoofing: lo carries only local sources"']
    for site, link in mon.links.items():
        servers = ", ".join(plan.address(n) for n in plan.sites[site].servers)
        antispoof.append(
            f'iifname "{link.mon_ifname}" ip saddr != {{ {servers} }} counter drop '
            + _comment(f"anti-spoofing: this veth reaches only the servers of {site}")
        )
    head = _header(
        [
            f"# konbini {topo.name}: the monitoring namespace {mon.namespace} ({mon.address})",
            "# compiled from topology/policy/monitoring.py: scrapes out, nothing in; default drop",
        ],
        mon.address,
    )
    names = ["lo", *(link.mon_ifname for link in mon.links.values())]
    flows = allowed_flows(topo, plan) if flows is None else flows
    out = head + _chains(antispoof, names, [], _allow_rules(flows, MONITORING_SITE, "src"))
    return "\n".join(out) + "\n"


# -- line impairments (topology.netns.impair): loss and queue rules on the receiving side -----------

IMPAIR_TABLE = (
    "konbini_impair"  # a run's own table is konbini_impair_<run>: replacing it never touches the policy above
)
IMPAIR_CHAIN = "KONBINI-IMP"  # a run's iptables-nft chain in table mangle, KONBINI-IMP-<run> (nft has no `queue` here; xt NFQUEUE does)
LOSS_PRIORITY = -160  # after anti-spoofing (raw, -300), just before the hold (mangle, -150)
LOSS_SCALE = 1_000_000  # numgen draws per million: 0.001 % is the finest loss


def impair_names(run: str) -> tuple[str, str]:
    """(nft table, iptables chain) of one run; iptables caps chain names at 28 characters."""
    return f"{IMPAIR_TABLE}_{run}", f"{IMPAIR_CHAIN}-{run}"[:28]


def _hop_match(hop: Hop) -> str:
    return f'iifname "{hop.iif}" ip saddr {hop.saddr} ip daddr {hop.daddr}'


def compile_impair_ruleset(lines: list[LineImpairment], namespace: str | None, table: str, queue: int) -> str | None:
    """The `nft -f` text of one namespace's part of a run: per hop loss rules, and the set of queued
    hops whose packets get the run's mark (one hash lookup a packet, however many lines there are).
    None: the namespace has neither, delete the table."""
    rules = [
        f"\t\t{_hop_match(h)} numgen random mod {LOSS_SCALE} < {round(li.shape.loss * LOSS_SCALE)} counter drop "
        + _comment(f"line {li.line} {h.direction}: loss {li.shape.loss * 100:g}%")
        for li in lines
        if li.shape.loss and not li.netem
        for h in li.hops
        if h.namespace == namespace
    ]
    queued = [
        f'"{h.iif}" . {h.saddr} . {h.daddr}' for li in lines if li.queued for h in li.hops if h.namespace == namespace
    ]
    if not rules and not queued:
        return None
    out = [f"table inet {table}", f"delete table inet {table}", f"table inet {table} {{"]
    if queued:
        out += [
            "\tset queued {",
            "\t\ttype ifname . ipv4_addr . ipv4_addr",
            f"\t\telements = {{ {', '.join(queued)} }}",
            "\t}",
        ]
    out += ["\tchain loss {", f"\t\ttype filter hook prerouting priority {LOSS_PRIORITY}; policy accept;", *rules]
    if queued:
        out.append(
            f"\t\tiifname . ip saddr . ip daddr @queued meta mark set 0x{run_mark(queue):08x} "
            + _comment(f"queued lines: NFQUEUE {queue}")
        )
    return "\n".join(out + ["\t}", "}"]) + "\n"


def compile_queue_rules(lines: list[LineImpairment], namespace: str | None, chain: str, queue: int) -> str:
    """The `iptables-restore --noflush` text of one namespace's NFQUEUE rule: packets with the run's
    mark go to the run's queue (an empty chain when the namespace has no queued hop).
    `--queue-bypass`: with no daemon bound the line passes unimpaired instead of going dead."""
    out = ["*mangle", f":{chain} - [0:0]"]
    if any(h.namespace == namespace for li in lines if li.queued for h in li.hops):
        out.append(
            f'-A {chain} -m mark --mark 0x{run_mark(queue):x}/0x{MARK_MASK:x} -m comment --comment "queued lines" '
            f"-j NFQUEUE --queue-num {queue} --queue-bypass"
        )
    return "\n".join(out + ["COMMIT"]) + "\n"
