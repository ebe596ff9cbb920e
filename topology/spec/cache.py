"""A large topology file's loaded model, kept between runs.

Loading national.yaml (expanding ~250,000 nodes from its groups, checking every rule) costs
about as much CPU as starting it with the PKI made. The result depends only on the file's
bytes and on the code that reads it, so it is kept as msgpack under the user's cache directory,
named by a hash of both, and read back with `msgspec` in a fraction of the time. A file that
changed, a konbini that changed, or a cache entry that does not decode is loaded from the file
again. Small files are not cached: they load in milliseconds.
"""

from __future__ import annotations

import gc
import hashlib
import os
import tempfile
from pathlib import Path

import msgspec

from topology.spec.load import load_topology
from topology.spec.model import Topology

CACHE_ABOVE = 200_000  # bytes of msgpack; national.yaml's model is ~126 MB, default.yaml's ~60 KB
_CODE = (Path(__file__).parent, Path(__file__).parent.parent / "policy")  # what turns a file into a model


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "konbini" / "topologies"


def _entry(directory: Path, path: Path) -> tuple[Path, str]:
    """(this file's cache entry, the prefix every entry of this path has)."""
    where = hashlib.sha256(f"{path}\0{path.resolve()}".encode()).hexdigest()[:16]
    digest = hashlib.sha256(path.read_bytes())
    for folder in _CODE:
        for source in sorted(folder.glob("*.py")):
            digest.update(source.name.encode() + source.read_bytes())
    return directory / f"{where}-{digest.hexdigest()[:24]}.msgpack", f"{where}-"


def load_cached(path: str | Path, directory: Path | None = None) -> Topology:
    """`load_topology(path)`, from the cache when the file and the code are unchanged."""
    path = Path(path)
    directory = directory or cache_dir()
    entry, prefix = _entry(directory, path)
    gc.disable()  # hundreds of thousands of new objects and no cycles: the collector only rescans them
    try:
        try:
            return msgspec.msgpack.decode(entry.read_bytes(), type=Topology)
        except (OSError, msgspec.DecodeError, msgspec.ValidationError):
            pass
        topo = load_topology(path)
    finally:
        gc.enable()
    data = msgspec.msgpack.encode(topo)
    if len(data) > CACHE_ABOVE:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            for old in directory.glob(f"{prefix}*.msgpack"):  # this path's model before a change
                old.unlink(missing_ok=True)
            with tempfile.NamedTemporaryFile(dir=directory, delete=False) as tmp:
                tmp.write(data)
            os.replace(tmp.name, entry)  # whole or not at all, for a run reading it beside this one
        except OSError:
            pass  # a read-only home only costs the next run the full load
    return topo
