"""A large file's loaded model kept between runs (topology/spec/cache.py): used only while the
file and the code that reads it are unchanged."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from topology.spec import cache
from topology.spec.load import DEFAULT_TOPOLOGY, load_topology


@pytest.fixture
def copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(cache, "CACHE_ABOVE", 0)  # the default file is small: cache it anyway
    return Path(shutil.copy(DEFAULT_TOPOLOGY, tmp_path / "t.yaml"))


def _no_load(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(path: object) -> None:
        raise AssertionError("loaded from the file, not the cache")

    monkeypatch.setattr(cache, "load_topology", refuse)


def test_the_second_load_is_the_cached_model(copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = cache.load_cached(copy, tmp_path / "c")
    assert first == load_topology(copy)
    _no_load(monkeypatch)
    assert cache.load_cached(copy, tmp_path / "c") == first


def test_a_changed_file_is_loaded_again_and_its_old_model_dropped(copy: Path, tmp_path: Path) -> None:
    cache.load_cached(copy, tmp_path / "c")
    copy.write_text(copy.read_text().replace("name: default", "name: changed", 1))
    assert cache.load_cached(copy, tmp_path / "c").name == "changed"
    assert len(list((tmp_path / "c").glob("*.msgpack"))) == 1


def test_a_damaged_entry_is_loaded_from_the_file(copy: Path, tmp_path: Path) -> None:
    expected = cache.load_cached(copy, tmp_path / "c")
    (entry,) = (tmp_path / "c").glob("*.msgpack")
    entry.write_bytes(entry.read_bytes()[:100])
    assert cache.load_cached(copy, tmp_path / "c") == expected


def test_changed_code_is_a_different_entry(copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache.load_cached(copy, tmp_path / "c")
    code = tmp_path / "code"
    shutil.copytree(Path(cache.__file__).parent, code)
    monkeypatch.setattr(cache, "_CODE", (code,))
    (code / "model.py").write_text((code / "model.py").read_text() + "\n# changed\n")
    _no_load(monkeypatch)
    with pytest.raises(AssertionError, match="loaded from the file"):
        cache.load_cached(copy, tmp_path / "c")
