"""What live evidence for the security annex a topology file can give (DESIGN §2): the store the
checks start from, the admin surfaces each check needs, and the requirements a file cannot show.

Pure: `topology/check/annex.py` runs the checks; `konbini check` names what a file leaves out.
"""

from __future__ import annotations

from topology.spec.model import Topology

EVIDENCE_CERTIFICATE = "residence-record"  # what the issuing checks ask for


class NotCheckable(ValueError):
    """The topology lacks what a check needs (e.g. no store with admin surfaces)."""


def first_store(topo: Topology) -> tuple[str, str, str, str]:
    """(store controller, its console, a kiosk of that store, the kiosk's console) of the first store with both."""
    for ctl in topo.of_kind("store-controller"):
        kiosks = [k for k in topo.of_kind("kiosk") if k.site == ctl.site and k.admin]
        if ctl.admin and kiosks:
            return ctl.id, ctl.admin[0].at[0], kiosks[0].id, kiosks[0].admin[0].at[0]
    raise NotCheckable(
        "no store whose controller has an admin API and a kiosk a maintenance endpoint (admin_port "
        "and admin; a compact group has them unless it says `admin: false`)"
    )


def monitored_store(topo: Topology) -> tuple[str, str, str]:
    """(store controller, its console, a kiosk of its store) of the first store whose controller has
    an admin API: where a fault and a silence can be read (SEC-KI-7, SEC-KI-8); kiosks need none."""
    for ctl in topo.of_kind("store-controller"):
        kiosks = [k.id for k in topo.of_kind("kiosk") if k.site == ctl.site]
        if ctl.admin and kiosks:
            return ctl.id, ctl.admin[0].at[0], kiosks[0]
    raise NotCheckable("no store controller with an admin API (admin_port and admin) and a kiosk in its store")


def evidence_site(topo: Topology) -> str:
    """The store every check starts from: the first with every admin surface, else the first whose
    controller has an admin API, else the first kiosk's; the checks that need no surface run anywhere."""
    for find in (first_store, monitored_store):
        try:
            return topo.node(find(topo)[0]).site
        except NotCheckable:
            pass
    kiosks = topo.of_kind("kiosk")
    if not kiosks:
        raise NotCheckable("no kiosk in this topology")
    return kiosks[0].site


def evidence_municipality(topo: Topology) -> str:
    """The municipality the issuing checks ask: the first that takes part and offers a residence record."""
    for code, node in topo.municipalities().items():
        m = node.municipality
        if m is not None and m.participating and EVIDENCE_CERTIFICATE in m.certificates:
            return code
    raise NotCheckable(f"no participating municipality offers a {EVIDENCE_CERTIFICATE} to issue")


def unshowable(topo: Topology) -> list[tuple[str, str]]:
    """(requirement, why) for every annex item whose live check this file gives nothing to run on."""
    out = []
    for requirements, find in (
        (("SEC-ST-3/KI-6", "SEC-KI-4"), first_store),
        (("SEC-KI-7", "SEC-KI-8"), monitored_store),
        (("SEC-KI-1", "SEC-KI-2", "SEC-KI-5"), evidence_site),
        (("SEC-KI-2",), evidence_municipality),
    ):
        try:
            find(topo)
        except NotCheckable as exc:
            out += [(req, str(exc)) for req in requirements]
    if not topo.of_kind("wifi"):
        out.append(("SEC-ST-4", "no in-store Wi-Fi node (kind wifi) to probe kiosks from"))
    return out
