"""The compile cache (qcompile.cache): a hit gives a byte-identical artifact, a changed model,
config or tuning database misses, a damaged entry is ignored with a warning."""

from __future__ import annotations

import hashlib
import json
import logging

import numpy as np
import pytest

import qcompile
from conftest import make_mlp_onnx
from qcompile import cache_stages as stages
from qcompile import driver
from qcompile.artifact import TIMINGS
from qcompile.cache import ENTRY, CompileCache, open_cache
from qcompile.cli import main

ARTIFACT_FILES = ("manifest.json", "report.json", "model.so")
STAGES = ("front", "build", "reference")


@pytest.fixture
def counted(monkeypatch):
    """Counts of the passes and builds that really ran (the work a hit skips)."""
    calls = {"optimize": 0, "build": 0}

    def wrap(name, key):
        real = getattr(driver, name)

        def counting(*args, **kwargs):
            calls[key] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(driver, name, counting)

    wrap("optimize", "optimize")
    wrap("_build", "build")
    return calls


def _compile(model, out, cache, **overrides):
    settings = {"bits": 4, "group_size": 32, **overrides}
    return qcompile.compile(model, output=out, cache=cache, **settings)


def _cache_use(out) -> dict:
    return json.loads((out / TIMINGS).read_text())["cache"]


def _same_files(a, b) -> bool:
    return all((a / name).read_bytes() == (b / name).read_bytes() for name in ARTIFACT_FILES)


def test_hit_gives_byte_identical_artifact(tmp_path, mlp_onnx, counted):
    cache = tmp_path / "cache"
    _compile(mlp_onnx, tmp_path / "cold", cache)
    assert _cache_use(tmp_path / "cold") == dict.fromkeys(STAGES, "miss")
    assert counted == {"optimize": 1, "build": 1}
    warm = _compile(mlp_onnx, tmp_path / "warm", cache)
    assert _cache_use(tmp_path / "warm") == dict.fromkeys(STAGES, "hit")
    assert counted == {"optimize": 1, "build": 1}  # the warm compile ran no passes and no build
    _compile(mlp_onnx, tmp_path / "off", False)
    assert _cache_use(tmp_path / "off") == {}
    assert _same_files(tmp_path / "cold", tmp_path / "warm") and _same_files(tmp_path / "cold", tmp_path / "off")
    x = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
    np.testing.assert_array_equal(warm.load()(x), qcompile.load(tmp_path / "cold")(x))


def test_changed_model_config_or_database_misses(tmp_path, mlp_onnx, counted, monkeypatch):
    cache = tmp_path / "cache"
    _compile(mlp_onnx, tmp_path / "a", cache)
    _compile(mlp_onnx, tmp_path / "bits", cache, bits=8)
    assert _cache_use(tmp_path / "bits") == dict.fromkeys(STAGES, "miss")
    other = make_mlp_onnx(tmp_path / "other.onnx", seed=1)
    _compile(other, tmp_path / "model", cache)
    assert _cache_use(tmp_path / "model") == dict.fromkeys(STAGES, "miss")
    # a tuning database changes the build only; its records are not applied here, its bytes count
    monkeypatch.setattr(driver, "_build", lambda backend, graph, target, db: (backend.build(graph, target), None))
    db = tmp_path / "db"
    db.mkdir()
    (db / "database_workload.json").write_text("[1]\n")
    _compile(mlp_onnx, tmp_path / "db1", cache, tuning_db=str(db))
    assert _cache_use(tmp_path / "db1") == {"front": "hit", "build": "miss", "reference": "hit"}
    _compile(mlp_onnx, tmp_path / "db2", cache, tuning_db=str(db))
    assert _cache_use(tmp_path / "db2")["build"] == "hit"
    (db / "database_workload.json").write_text("[2]\n")
    _compile(mlp_onnx, tmp_path / "db3", cache, tuning_db=str(db))
    assert _cache_use(tmp_path / "db3")["build"] == "miss"


def _entry_files(cache, stage, name):
    return list((cache / stage).glob(f"??/*/{name}"))


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "bad_index"])
def test_damaged_entry_is_ignored_with_a_warning(tmp_path, mlp_onnx, caplog, damage):
    cache = tmp_path / "cache"
    _compile(mlp_onnx, tmp_path / "cold", cache)
    (library,) = _entry_files(cache, "build", "model.so")
    if damage == "flip":
        data = bytearray(library.read_bytes())
        data[len(data) // 2] ^= 1
        library.write_bytes(bytes(data))
    elif damage == "truncate":
        library.write_bytes(library.read_bytes()[:100])
    elif damage == "delete":
        library.unlink()
    else:
        (library.parent / ENTRY).write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="qcompile"):
        _compile(mlp_onnx, tmp_path / "again", cache)
    assert "damaged entry" in caplog.text
    assert _cache_use(tmp_path / "again") == {"front": "hit", "build": "miss", "reference": "hit"}
    assert _same_files(tmp_path / "cold", tmp_path / "again")
    _compile(mlp_onnx, tmp_path / "third", cache)  # the miss stored a good entry again
    assert _cache_use(tmp_path / "third")["build"] == "hit"


def test_unreadable_entry_with_matching_hashes_is_ignored(tmp_path, mlp_onnx, caplog):
    """An entry whose files match entry.json but do not unpickle (e.g. written by another qcompile)."""
    cache = tmp_path / "cache"
    _compile(mlp_onnx, tmp_path / "cold", cache)
    (graphs,) = _entry_files(cache, "front", stages.GRAPHS)
    garbage = b"not a pickle"
    graphs.write_bytes(garbage)
    index = {stages.GRAPHS: {"sha256": hashlib.sha256(garbage).hexdigest(), "bytes": len(garbage)}}
    (graphs.parent / ENTRY).write_text(json.dumps({"files": index}))
    with caplog.at_level(logging.WARNING, logger="qcompile"):
        _compile(mlp_onnx, tmp_path / "again", cache)
    assert "unreadable entry" in caplog.text
    assert _cache_use(tmp_path / "again")["front"] == "miss"
    assert _same_files(tmp_path / "cold", tmp_path / "again")


def test_unwritable_cache_only_warns(tmp_path, mlp_onnx, caplog):
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache directory should be")
    with caplog.at_level(logging.WARNING, logger="qcompile"):
        _compile(mlp_onnx, tmp_path / "out", blocker)
    assert "cannot write" in caplog.text
    assert (tmp_path / "out" / "model.so").is_file()


def test_store_is_atomic_and_prunes_least_recently_used(tmp_path):
    cache = CompileCache(tmp_path, max_bytes=2500)
    keys = [CompileCache.key({"n": n}) for n in range(3)]
    for key in keys:
        cache.store("s", key, {"blob": b"x" * 1000})
    assert not list(tmp_path.rglob(".*tmp-*"))  # no temporary directories left behind
    assert cache.lookup("s", keys[0]) is None and cache.lookup("s", keys[2]) is not None
    assert (cache.lookup("s", keys[1]) / "blob").read_bytes() == b"x" * 1000


def test_cli_no_cache_and_environment(tmp_path, monkeypatch):
    model = make_mlp_onnx(tmp_path / "mlp.onnx")
    monkeypatch.setenv("QCOMPILE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("QCOMPILE_NO_CACHE", raising=False)
    assert main([str(model), "--bits", "8", "-o", str(tmp_path / "a"), "-q", "--no-cache"]) == 0
    assert not (tmp_path / "cache").exists()
    assert main([str(model), "--bits", "8", "-o", str(tmp_path / "b"), "-q"]) == 0
    assert {p.name for p in (tmp_path / "cache").iterdir()} == set(STAGES)
    monkeypatch.setenv("QCOMPILE_NO_CACHE", "1")
    assert open_cache() is None and open_cache(tmp_path / "explicit").root == tmp_path / "explicit"
