"""The import contract: konbini's rooms import one way only (docs/architecture.md).

An `ast` walk over every module, counting imports inside functions too, so that neither a new
module-level import nor a lazy one hidden in a function can quietly run against the layers.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("gateway", "topology", "kiosk_emu", "bench")

# Top to bottom: a module may import its own layer and the layers below it, never one above.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("topology.cli",),  # the only argparse / rich / print code
    ("bench",),  # scenarios, runner, baselines, reports
    ("topology.launch", "topology.check"),  # wiring nodes into a running topology; live evidence
    ("kiosk_emu",),  # the card, the kiosk flow and device, the load generator
    ("gateway.nodes",),  # one module per node kind
    ("gateway.node", "gateway.transport"),  # a node's deny-early listener; TLS and upstreams
    ("gateway.protocol", "gateway.business"),  # HTTP/2 core and messages; the business domain
    ("topology.export",),  # manifests for other engines (Kubernetes, compose); reads the PKI's files
    (
        "topology.pki",
        "topology.pkifiles",
        "topology.nodestore",
        "topology.leafstamp",
    ),  # the test PKI; where its files are; its node identities; their certificates in bulk
    ("topology.spec", "topology.policy", "topology.netns"),  # the file format, the policy compiler, the netns plan
)
# The model: no event loop, no sockets, no processes (topology.netns.enter is a single setns call).
PURE = ("topology.spec", "topology.policy", "topology.netns.plan")
IMPURE_IMPORTS = {"trio", "socket", "subprocess", "asyncio", "uvloop", "multiprocessing", "ssl"}
# Third-party imports that may stay inside functions, for start-up cost only (and the standard library).
LAZY_ALLOWED = {"rich", "matplotlib", "scapy", "uvloop"}
# Modules whose project imports may sit in functions, and why. The layer and cycle tests still see them.
LAZY_PROJECT = {
    # each node kind's module is imported when a node of that kind is made: a bench process serving
    # relays only does not load the center and its holiday calendar (4 MiB of its RSS)
    "gateway.nodes.registry",
}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _layer(module: str) -> int:
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_layers.py")


def _imports(module: str) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for every import in `module`."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    out: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                out.extend((a.name, child.lineno, in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                out.append((child.module, child.lineno, in_function))
                # `from pkg import module` names a module too
                out.extend(
                    (f"{child.module}.{a.name}", child.lineno, in_function)
                    for a in child.names
                    if f"{child.module}.{a.name}" in MODULES
                )
            visit(child, inner)

    visit(tree, False)
    return out


def _project(name: str) -> str | None:
    """The project module an import refers to (a module, or the package holding a name)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def test_every_module_sits_in_a_layer():
    for module in MODULES:
        if module in PACKAGES:
            continue
        _layer(module)


def test_imports_run_downwards_only():
    upward = []
    for module in MODULES:
        if module in PACKAGES:
            continue
        for name, line, _ in _imports(module):
            target = _project(name)
            if target is None or target in PACKAGES:
                continue
            if _layer(target) < _layer(module):
                upward.append(f"{MODULES[module].relative_to(ROOT)}:{line}: {module} imports {target} (a higher layer)")
    assert upward == []


def test_no_project_import_hides_inside_a_function():
    """Imports inside functions only for start-up cost of heavy libraries, never to dodge a cycle."""
    hidden = []
    for module in MODULES:
        for name, line, in_function in _imports(module):
            if not in_function or (module in LAZY_PROJECT and _project(name) is not None):
                continue
            top = name.split(".")[0]
            if _project(name) is not None or top not in LAZY_ALLOWED | sys.stdlib_module_names:
                hidden.append(f"{MODULES[module].relative_to(ROOT)}:{line}: import {name}")
    assert hidden == []


def test_no_import_cycle_between_modules():
    graph = {m: {t for n, _, _ in _imports(m) if (t := _project(n)) and t != m and t not in PACKAGES} for m in MODULES}
    cycles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t) :] + [t])
            elif t not in state:
                walk(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            walk(m)
    assert cycles == []


@pytest.mark.parametrize("prefix", PURE)
def test_model_modules_do_no_io(prefix):
    for module in MODULES:
        if module == prefix or module.startswith(prefix + "."):
            bad = [
                f"{module}:{line} imports {name}"
                for name, line, _ in _imports(module)
                if name.split(".")[0] in IMPURE_IMPORTS
            ]
            assert bad == []


def test_model_imports_nothing_from_gateway_kiosk_or_bench():
    for module in MODULES:
        if module.startswith(("topology.spec", "topology.policy")):
            for name, line, _ in _imports(module):
                assert name.split(".")[0] not in ("gateway", "kiosk_emu", "bench"), f"{module}:{line} imports {name}"


def test_the_contract_catches_an_upward_import(tmp_path, monkeypatch):
    """The check itself can fail: a model module importing a gateway node is reported."""
    fake = tmp_path / "model.py"
    fake.write_text("from gateway.nodes.relay import Relay\n\ndef f():\n    from topology.cli.main import main\n")
    monkeypatch.setitem(MODULES, "topology.spec.fake", fake)
    imports = _imports("topology.spec.fake")
    assert ("gateway.nodes.relay", 1, False) in imports and ("topology.cli.main", 4, True) in imports
    assert _layer(_project("gateway.nodes.relay")) < _layer("topology.spec.fake")


def _documented_layers() -> tuple[tuple[str, ...], ...]:
    """The rooms column of docs/architecture.md's layer table, as dotted module prefixes."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    table = text.split("## The layers, top to bottom", 1)[1].split("\n## ", 1)[0]
    layers = []
    for row in table.splitlines():
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        if len(cells) > 1 and cells[0].isdigit():
            rooms = re.findall(r"`([^`]+)`", cells[1])
            layers.append(tuple(r.strip("/").removesuffix(".py").replace("/", ".") for r in rooms))
    return tuple(layers)


def test_the_documented_layer_table_is_the_contract():
    """docs/architecture.md's table is the one copy a reader sees: it lists exactly these layers."""
    assert _documented_layers() == LAYERS


def test_a_bench_relay_process_imports_no_crypto_and_no_center_code():
    """What keeps a relay process small (relay-1m's bound is per relay process): `python -m
    bench.serve` loads the relays' code and the PKI's paths, not `cryptography`, the card store,
    the center or the CLI."""
    import subprocess

    probe = "import sys, bench.serve; print(' '.join(sorted(sys.modules)))"
    loaded = set(
        subprocess.run(
            [sys.executable, "-c", probe], check=True, capture_output=True, text=True, cwd=ROOT
        ).stdout.split()
    )
    assert "gateway.nodes.registry" in loaded and "topology.launch.servers" in loaded  # the probe saw the launcher
    heavy = {
        "cryptography",
        "kiosk_emu.card",
        "topology.pki",
        "gateway.nodes.issuance",
        "holidays",
        "topology.cli.main",
    }
    assert heavy & loaded == set()


# Modules run as programs (`python -m`), which parse their own arguments and print their answer.
AGENTS = {
    # run inside a namespace by the CLI, which reads their one line of JSON back
    "topology.check.annex",
    "topology.check.app",
    "topology.check.probe",
    "topology.check.scrape",
    # a namespace's node host and the line-impairment daemon, forked or spawned by the netns launcher
    "topology.launch.nodehost",
    "topology.launch.impaird",
    # micro-benchmarks run by hand (`python -m bench.h2cost`), each printing its own table
    "bench.h2cost",
    "bench.ledger_throughput",
    "bench.ocsp_cost",
    "bench.tls_resume",
}
USER_IO = {"argparse", "rich"}  # what parses arguments or draws on a terminal; `print` is the third


def _where(module: str) -> Path:
    path = MODULES[module]
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def _user_io(module: str) -> list[str]:
    """Where `module` imports argparse or rich, or calls print."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    out = [
        f"{_where(module)}:{line}: import {name}" for name, line, _ in _imports(module) if name.split(".")[0] in USER_IO
    ]
    out += [  # a call, or print handed on (`say = print`)
        f"{_where(module)}:{node.lineno}: print"
        for node in ast.walk(tree)
        if isinstance(node, ast.Name) and node.id == "print"
    ]
    return out


def test_only_the_cli_and_named_agents_parse_arguments_or_print():
    found = []
    for module in MODULES:
        if module == "topology.cli" or module.startswith("topology.cli.") or module in AGENTS:
            continue
        found += _user_io(module)
    assert found == []


def test_every_named_agent_exists_and_runs_as_a_program():
    for module in AGENTS:
        assert module in MODULES, f"{module} is named in AGENTS but does not exist"
        assert "__main__" in MODULES[module].read_text(encoding="utf-8"), f"{module} is not run with python -m"


def _private_imports(module: str) -> list[str]:
    """`from project.module import _name`: a name its module keeps to itself, used elsewhere."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    return [
        f"{_where(module)}:{node.lineno}: from {node.module} import {a.name}"
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and _project(node.module)
        for a in node.names
        if a.name.startswith("_") and not a.name.startswith("__")
    ]


def test_no_private_name_is_imported_across_modules():
    found = [line for module in MODULES for line in _private_imports(module)]
    assert found == []


def test_the_user_io_and_private_name_checks_can_fail(tmp_path, monkeypatch):
    """Both checks see what they forbid: argparse, rich and print in the model, a private import."""
    fake = tmp_path / "fake.py"
    fake.write_text(
        "import argparse\nfrom rich.console import Console\nfrom topology.spec.model import _private\n\n"
        "def f():\n    print('x')\n"
    )
    monkeypatch.setitem(MODULES, "topology.spec.fake", fake)
    assert [x.rsplit(": ", 1)[1] for x in _user_io("topology.spec.fake")] == [
        "import argparse",
        "import rich.console",
        "print",
    ]
    assert _private_imports("topology.spec.fake") == [f"{fake}:3: from topology.spec.model import _private"]
