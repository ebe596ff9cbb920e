"""Docs that stay true: every module path and dotted name the docs mention exists.

docs/*.md, README.md, the shipped topology files and the docstrings and comments of the Python
packages name modules (`gateway/protocol/splice.py`, `topology.spec.model.Node`); a module moved
or a class renamed leaves such names behind, and nothing else would notice. Names are resolved
statically (an `ast` walk of the module a name points into), so no module is imported.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from functools import cache
from pathlib import Path

import pytest
from markdown.extensions.toc import slugify

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("gateway", "topology", "kiosk_emu", "bench")

# `gateway/node/server.py`, `topology/launch/`, `topology/national.yaml`, `tests/test_layers.py`:
# a path from the repository root (not one under another folder, as in /etc/konbini/topology.yaml)
PATH = re.compile(r"(?<![\w./-])(?:gateway|topology|kiosk_emu|bench|tests|docs)/[\w./-]*[\w/]")
# `gateway.protocol.splice`, `topology.spec.model.Node`, `python -m bench.serve`
DOTTED = re.compile(r"(?<![\w./-])(?:gateway|topology|kiosk_emu|bench)(?:\.[A-Za-z_]\w*)+")
# `topology.yaml`, `topology.schema.json`: a file's name, not a module
FILE_SUFFIXES = {"yaml", "yml", "json", "svg", "html", "md", "py", "pem", "key", "sqlite", "png", "pdf", "jsonl", "txt"}


def _doc_texts() -> list[tuple[Path, str]]:
    """(file, text) for every place a reader meets module names: docs, READMEs, topology files."""
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "topology").glob("*.yaml"))]
    return [(f, f.read_text(encoding="utf-8")) for f in files]


def _comments_and_docstrings(path: Path) -> str:
    """A module's comments and docstrings, each kept at its own line (so findings name the line)."""
    source = path.read_text(encoding="utf-8")
    lines = [""] * (source.count("\n") + 2)
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            lines[token.start[0] - 1] += " " + token.string
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                doc = body[0].value.value
                if isinstance(doc, str):
                    for offset, line in enumerate(doc.split("\n")):
                        lines[body[0].lineno - 1 + offset] += " " + line
    return "\n".join(lines)


def _code_texts() -> list[tuple[Path, str]]:
    return [(p, _comments_and_docstrings(p)) for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]


def _module_file(dotted: str) -> Path | None:
    base = ROOT.joinpath(*dotted.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


@cache
def _scope_names(path: Path) -> dict[str, ast.AST | None]:
    """The names a module defines at top level, each with its class body (None if not a class)."""
    return _names_in(ast.parse(path.read_text(encoding="utf-8")).body)


def _names_in(body: list[ast.stmt]) -> dict[str, ast.AST | None]:
    names: dict[str, ast.AST | None] = {}
    for stmt in body:
        if isinstance(stmt, ast.ClassDef):
            names[stmt.name] = stmt
        elif isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names[stmt.name] = None
        elif isinstance(stmt, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
            for target in targets:
                for node in ast.walk(target):
                    if isinstance(node, ast.Name):
                        names[node.id] = None
        elif isinstance(stmt, (ast.Import, ast.ImportFrom)):
            for alias in stmt.names:
                names[(alias.asname or alias.name).split(".")[0]] = None
        elif isinstance(stmt, (ast.If, ast.Try)):  # names defined under `if TYPE_CHECKING:` or a try
            for block in (stmt.body, stmt.orelse, *(getattr(h, "body", []) for h in getattr(stmt, "handlers", []))):
                names.update(_names_in(block))
    return names


def _class_names(cls: ast.ClassDef) -> dict[str, ast.AST | None]:
    """A class's own names: its body's, and what its methods assign to `self`."""
    names = _names_in(cls.body)
    for node in ast.walk(cls):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
            if isinstance(node.ctx, ast.Store):
                names.setdefault(node.attr, None)
    return names


def resolves(dotted: str) -> bool:
    """Whether `dotted` names a module, or a name defined in one (a class's attributes checked too)."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        module = _module_file(".".join(parts[:cut]))
        if module is None:
            continue
        rest = parts[cut:]
        if not rest:
            return True
        scope: dict[str, ast.AST | None] = _scope_names(module)
        for name in rest:
            if name not in scope:
                return False
            found = scope[name]
            if not isinstance(found, ast.ClassDef):
                return True  # a function, a variable or an import: its attributes are not checked
            scope = _class_names(found)
        return True
    return False


def _path_exists(mention: str) -> bool:
    """A file or folder, or a module written as a path (`topology/pki`, `gateway/node/server.NodeServer`)."""
    if (ROOT / mention).exists():
        return True
    dotted = mention.removesuffix(".py").strip("/").replace("/", ".")
    return mention.split("/")[0] in PACKAGES and resolves(dotted)


def stale_mentions(texts: list[tuple[Path, str]]) -> list[str]:
    stale = []
    for path, text in texts:
        where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        for lineno, line in enumerate(text.split("\n"), 1):
            for match in PATH.finditer(line):
                if not _path_exists(match.group()):
                    stale.append(f"{where}:{lineno}: {match.group()}")
            for match in DOTTED.finditer(line):
                name = match.group()
                if name.rsplit(".", 1)[-1] in FILE_SUFFIXES:
                    continue
                if not resolves(name):
                    stale.append(f"{where}:{lineno}: {name}")
    return stale


def test_docs_readmes_and_topology_files_name_modules_that_exist():
    assert stale_mentions(_doc_texts()) == []


def test_docstrings_and_comments_name_modules_that_exist():
    assert stale_mentions(_code_texts()) == []


# [text](target): a link in Markdown; images too
LINK = re.compile(r"\]\(([^)\s]+)\)")


def broken_links(page: Path) -> list[str]:
    """Relative links of `page` whose file, or whose heading anchor, is not there.

    mkdocs checks the links between docs/ pages (`make docs`); the README is outside its tree."""
    broken = []
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if "://" in target:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md":
            headings = re.findall(r"^#+\s+(.+?)\s*$", file.read_text(encoding="utf-8"), re.MULTILINE)
            if anchor not in {slugify(h, "-") for h in headings}:
                broken.append(target)
    return broken


def test_the_readme_links_to_pages_and_headings_that_exist():
    assert broken_links(ROOT / "README.md") == []


def test_a_link_to_a_missing_heading_is_caught(tmp_path):
    (tmp_path / "page.md").write_text("# A page\n\n## Netns mode on a large file: `--sites`\n", encoding="utf-8")
    readme = tmp_path / "README.md"
    readme.write_text(
        "[ok](page.md#netns-mode-on-a-large-file-sites) [no](page.md#national-peak) [gone](other.md)\n",
        encoding="utf-8",
    )
    assert broken_links(readme) == ["page.md#national-peak", "other.md"]


@pytest.mark.parametrize(
    "mention, exists",
    [
        ("topology.spec.model.Node", True),
        ("gateway.protocol.splice", True),
        ("gateway/protocol/splice.py", True),
        ("topology.spec.model.NoSuchNode", False),
        ("gateway.h2trio", False),
        ("topology/model.py", False),
    ],
)
def test_the_check_tells_a_stale_mention_from_a_true_one(tmp_path, mention, exists):
    """The check itself can fail: a moved module or a renamed class is reported, a real one is not."""
    doc = tmp_path / "page.md"
    doc.write_text(f"see `{mention}` for how\n", encoding="utf-8")
    assert (stale_mentions([(doc, doc.read_text(encoding="utf-8"))]) == []) is exists
