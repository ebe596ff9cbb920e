"""Every node kind's facts in one table, as containerlab keeps one definition per kind.

What a kind listens on, whether it relays and to which upstream kind (and the security-annex rule
that demands it), whom it accepts, who administers it, the evidence the policy check counts for
it, and how the Kubernetes export runs it. The model, the policy compiler and audit, the policy
check, the exports, the bench and the node registry read these entries, never a table of their
own: a new kind is one entry here, its name in `NodeKind`, and its App in gateway/nodes/registry.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

NodeKind = Literal[
    "kiosk",
    "store-router",
    "store-controller",
    "wifi",
    "ec-router",
    "dmz-relay",
    "issuance-center",
    "ocsp",
    "municipality",
]


class Side(StrEnum):
    """Which side of the closed network a kind sits on (SEC-SN-3, SEC-EC-2)."""

    STORE = "store"
    EC = "ec"  # the EC center's dedicated router and its DMZ
    CENTER = "center"  # the issuance center and what only it may reach


@dataclass(frozen=True)
class Accepts:
    """The only peers a kind may allow (the audit's rule): these kinds, of the same operator or site."""

    kinds: tuple[str, ...]
    rule: str  # the requirement an allow entry naming anyone else breaks
    says: str  # how the audit's message names them: "its operator's store routers"
    same: Literal["operator", "site"] | None = None


@dataclass(frozen=True)
class Resources:
    """A workload's requests and limit in the Kubernetes export."""

    cpu: str
    memory: str
    memory_limit: str


# From each kind's RSS idle and a relay's peak under the bench (docs/performance.md); the center,
# OCSP and municipality were not measured under load, so theirs are a guess.
_RELAY_RESOURCES = Resources("100m", "64Mi", "192Mi")
_SMALL = Resources("50m", "64Mi", "128Mi")


@dataclass(frozen=True, kw_only=True)
class Kind:
    name: NodeKind
    side: Side
    listens: bool  # runs a server on `port`; the others only open connections
    relays: bool = False  # forwards every allowed request to its `upstream`
    upstream: NodeKind | None = None  # the kind its upstream must be, so a store reaches the center only via the EC
    upstream_rule: str | None = None  # the requirement that demands that upstream
    accepts: Accepts | None = None
    reaches_nothing: str | None = None  # the rule an allow entry naming it breaks (in-store Wi-Fi)
    lines_only_to: tuple[NodeKind, ...] | None = None  # the only kinds a line may join it to
    admin_principal: str | None = None  # who uses its admin_port surface
    admin_rule: str | None = None  # the requirement that says so
    evidence: tuple[str, ...] = ("SEC-EC-2",)  # what an allowed connection to it is evidence for
    denial_evidence: tuple[str, ...] = ()  # and a refused one, beyond the rule it would break
    workload: Literal["Deployment", "StatefulSet", "Job"] | None = None  # in the Kubernetes export
    resources: Resources | None = None
    pki_files: tuple[str, ...] = ()  # what it needs of the test PKI beyond its own identity and the network CA
    title: str = ""  # how messages name the kind when its id does not: "in-store Wi-Fi"


KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind(
            name="kiosk",
            side=Side.STORE,
            listens=False,
            upstream="store-router",
            upstream_rule="SEC-SN-3",
            admin_principal="maintenance",
            admin_rule="SEC-KI-4",
            workload="Job",  # a load job: `konbini issue` from this kiosk
            resources=Resources("100m", "64Mi", "128Mi"),
            # issues its emulated cards (test PKI only) and checks the center's signature (INT-1)
            pki_files=("jpki-ca.pem", "jpki-ca.key", "nodes/issuance-center.pem"),
        ),
        Kind(
            name="store-router",
            side=Side.STORE,
            listens=True,
            relays=True,
            upstream="ec-router",
            upstream_rule="SEC-SN-3",
            accepts=Accepts(("kiosk", "store-controller"), "SEC-ST-2", "its own store's kiosks and controller", "site"),
            evidence=("SEC-ST-2",),
            workload="Deployment",
            resources=_RELAY_RESOURCES,
        ),
        Kind(
            name="store-controller",
            side=Side.STORE,
            listens=True,
            admin_principal="operator",
            admin_rule="SEC-ST-3/KI-6",
            evidence=("SEC-ST-2",),
            workload="Deployment",
            resources=_SMALL,
        ),
        Kind(
            name="wifi",
            side=Side.STORE,
            listens=False,
            reaches_nothing="SEC-ST-4",
            lines_only_to=("store-router",),
            title="in-store Wi-Fi",
        ),
        Kind(
            name="ec-router",
            side=Side.EC,
            listens=True,
            relays=True,
            upstream="dmz-relay",
            upstream_rule="SEC-EC-3",
            accepts=Accepts(("store-router",), "SEC-EC-1", "its operator's store routers", "operator"),
            evidence=("SEC-EC-1",),
            denial_evidence=("SEC-EC-1",),
            workload="Deployment",
            resources=_RELAY_RESOURCES,
        ),
        Kind(
            name="dmz-relay",
            side=Side.EC,
            listens=True,
            relays=True,
            upstream="issuance-center",
            upstream_rule="SEC-EC-3",
            accepts=Accepts(("ec-router",), "SEC-EC-3", "its operator's ec-router", "operator"),
            evidence=("SEC-EC-2", "SEC-EC-3"),
            workload="Deployment",
            resources=_RELAY_RESOURCES,
        ),
        Kind(
            name="issuance-center",
            side=Side.CENTER,
            listens=True,
            accepts=Accepts(("dmz-relay",), "SEC-EC-3", "DMZ relays"),
            evidence=("SEC-EC-2", "SEC-EC-3"),
            workload="StatefulSet",  # its ledger must outlive the pod
            resources=Resources("200m", "96Mi", "192Mi"),
            pki_files=("jpki-ca.pem",),  # it verifies cards
        ),
        Kind(
            name="ocsp",
            side=Side.CENTER,
            listens=True,
            accepts=Accepts(("issuance-center",), "SEC-EC-3", "the issuance center"),
            evidence=("SEC-EC-3",),
            workload="Deployment",
            resources=_SMALL,
            pki_files=("jpki-ca.pem", "jpki-ca.key", "ocsp-signer.pem", "ocsp-signer.key"),  # signs responses, CRL
        ),
        Kind(
            name="municipality",
            side=Side.CENTER,
            listens=True,
            accepts=Accepts(("issuance-center",), "SEC-EC-3", "the issuance center"),
            evidence=("SEC-EC-3",),
            workload="Deployment",
            resources=_SMALL,
        ),
    )
}


def kind_names(**facts: object) -> frozenset[str]:
    """The kinds whose entries have every given fact: `kind_names(listens=True)`."""
    return frozenset(k.name for k in KINDS.values() if all(getattr(k, f) == v for f, v in facts.items()))


def issuance_path() -> tuple[str, ...]:
    """The hop order, from the kiosk along each kind's upstream to the kind that answers."""
    path = ["kiosk"]
    while (upstream := KINDS[path[-1]].upstream) is not None:
        path.append(upstream)
    return tuple(path)


ISSUANCE_PATH = issuance_path()  # kiosk, store-router, ec-router, dmz-relay, issuance-center
RELAY_CHAIN = tuple(k for k in ISSUANCE_PATH if KINDS[k].relays)  # the relays from the kiosk's router inwards
