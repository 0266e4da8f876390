"""Content-addressed cache of compile products, so that a repeated compile reuses them.

An entry is a directory ``ROOT/<stage>/<key[:2]>/<key>/`` with the stage's files and
``entry.json`` (each file's sha256 and size). ``key`` is the sha256 of a canonical JSON key
document naming everything the product depends on; the driver's documents hold the model bytes'
sha256, the compile config, calibration/eval input hashes, the tuning database's contents, the
target string and :func:`environment` (qcompile source tree, versions of Python, numpy, onnx, TVM).

Invariants:
1. A hit gives back exactly the bytes the miss that stored the entry produced, so an artifact
   is byte-identical whether or not the cache was used.
2. Entries appear whole or not at all: written into a temporary sibling, then renamed.
3. An entry that fails its ``entry.json`` check (missing, truncated, corrupt, unreadable) is a
   miss with a warning; a failed write (disk full, read-only) is a warning. Neither fails a compile.
4. ROOT is ``$QCOMPILE_CACHE_DIR``, else ``~/.cache/qcompile/compile``; ``QCOMPILE_NO_CACHE=1``
   (or ``--no-cache``) turns the cache off. After each store the least recently used entries
   are removed until the cache holds at most ``max_bytes`` (``$QCOMPILE_CACHE_MAX_MB``, default 4 GB).

Entries are pickles and binaries this user's own compiles wrote: the cache directory has the
trust of the user's home, like the tuning database.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from .artifact import sha256_file

__all__ = ["CompileCache", "CacheSession", "open_cache", "default_root", "environment", "tree_sha256", "arrays_sha256"]

logger = logging.getLogger("qcompile")

ENTRY = "entry.json"
DEFAULT_MAX_BYTES = 4 << 30
# the directories of the packages whose code decides what a compile produces
_SOURCE_PACKAGES = ("qcompile", "qcompile.passes", "qcompile.backends", "qcompile.schedules")
_SOURCE_SUFFIXES = (".py", ".cc")


def default_root() -> Path:
    """``$QCOMPILE_CACHE_DIR``, else ``~/.cache/qcompile/compile``."""
    env = os.environ.get("QCOMPILE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "qcompile" / "compile"


def open_cache(setting=None) -> "CompileCache | None":
    """The cache a compile uses: ``setting`` None = the default (off with ``QCOMPILE_NO_CACHE=1``),
    False = none, a path = that directory."""
    if setting is False or (setting is None and os.environ.get("QCOMPILE_NO_CACHE", "") not in ("", "0")):
        return None
    root = default_root() if setting in (None, True) else Path(setting).expanduser()
    max_mb = os.environ.get("QCOMPILE_CACHE_MAX_MB")
    return CompileCache(root, int(float(max_mb) * 1e6) if max_mb else DEFAULT_MAX_BYTES)


class CompileCache:
    """Entries ``stage/key`` of files; see the module docstring for the invariants."""

    def __init__(self, root: Path, max_bytes: int = DEFAULT_MAX_BYTES):
        self.root = Path(root)
        self.max_bytes = max_bytes

    def __repr__(self):
        return f"CompileCache('{self.root}')"

    @staticmethod
    def key(document: dict) -> str:
        """sha256 of ``document`` as canonical JSON (sorted keys, no whitespace)."""
        text = json.dumps(document, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(text.encode()).hexdigest()

    def entry_dir(self, stage: str, key: str) -> Path:
        return self.root / stage / key[:2] / key

    def lookup(self, stage: str, key: str) -> Path | None:
        """The entry's directory if it exists and every file matches ``entry.json``; else None
        (a damaged entry is reported and removed)."""
        entry = self.entry_dir(stage, key)
        if not entry.is_dir():
            return None
        problem = _check_entry(entry)
        if problem:
            logger.warning("compile cache: ignoring damaged entry %s (%s)", entry, problem)
            shutil.rmtree(entry, ignore_errors=True)
            return None
        _touch(entry / ENTRY)
        return entry

    def load(self, stage: str, key: str, reader):
        """``reader(entry directory)`` of a verified entry; None on a miss, or when ``reader`` fails."""
        entry = self.lookup(stage, key)
        if entry is None:
            return None
        try:
            return reader(entry)
        except Exception as err:  # any failure to read an entry is a miss, never a failed compile
            logger.warning("compile cache: ignoring unreadable entry %s (%s: %s)", entry, type(err).__name__, err)
            shutil.rmtree(entry, ignore_errors=True)
            return None

    def store(self, stage: str, key: str, files: dict) -> None:
        """Write an entry of ``files`` (name -> bytes, or a Path to copy) atomically, then prune."""
        entry = self.entry_dir(stage, key)
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{key[:12]}.tmp-", dir=entry.parent))
        except OSError as err:
            logger.warning("compile cache: cannot write to %s (%s)", self.root, err)
            return
        try:
            _write_entry(tmp, files)
            os.replace(tmp, entry)
        except OSError as err:  # disk full, or another process stored the same key first
            shutil.rmtree(tmp, ignore_errors=True)
            if not (entry / ENTRY).is_file():
                logger.warning("compile cache: cannot store %s (%s)", entry, err)
            return
        self.prune()

    def prune(self) -> None:
        """Remove least recently used entries until the cache holds at most ``max_bytes``."""
        entries = [(e.stat().st_mtime, _entry_bytes(e.parent), e.parent) for e in self.root.glob(f"*/??/*/{ENTRY}")]
        total = sum(size for _, size, _ in entries)
        for _, size, entry in sorted(entries):
            if total <= self.max_bytes:
                break
            shutil.rmtree(entry, ignore_errors=True)
            total -= size


def _write_entry(directory: Path, files: dict) -> None:
    index = {}
    for name, content in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, (bytes, bytearray, memoryview)):
            path.write_bytes(content)
            digest = hashlib.sha256(content).hexdigest()
        else:
            shutil.copy2(content, path)
            digest = sha256_file(path)
        index[name] = {"sha256": digest, "bytes": path.stat().st_size}
    (directory / ENTRY).write_text(json.dumps({"files": index}, sort_keys=True))


def _check_entry(entry: Path) -> str | None:
    """Why ``entry`` cannot be used, or None when every listed file matches."""
    try:
        index = json.loads((entry / ENTRY).read_text())["files"]
        for name, want in index.items():
            path = entry / name
            if not path.is_file() or path.stat().st_size != want["bytes"]:
                return f"file '{name}' missing or truncated"
            if sha256_file(path) != want["sha256"]:
                return f"file '{name}' does not match its sha256"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{ENTRY}: {type(err).__name__}: {err}"
    return None


def _entry_bytes(entry: Path) -> int:
    return sum(p.stat().st_size for p in entry.rglob("*") if p.is_file())


def _touch(path: Path) -> None:
    try:
        os.utime(path, (time.time(), time.time()))
    except OSError:
        pass


# ---------------------------------------------------------------------------- key material
def tree_sha256(directory, suffixes: tuple[str, ...] | None = None) -> str:
    """sha256 over the relative paths and contents of the files under ``directory`` (sorted)."""
    directory = Path(directory)
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        if suffixes is None or path.suffix in suffixes:
            digest.update(f"{path.relative_to(directory).as_posix()}\0{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def arrays_sha256(arrays: dict | None) -> str | None:
    """sha256 over names, dtypes, shapes and bytes of a dict of arrays (None for None)."""
    if arrays is None:
        return None
    import numpy as np

    digest = hashlib.sha256()
    for name in sorted(arrays):
        value = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}\0{value.dtype.str}\0{value.shape}\n".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


_ENVIRONMENT: dict | None = None


def environment() -> dict:
    """The code a compile runs: qcompile's source tree hash, library versions, the machine."""
    global _ENVIRONMENT  # computed once per process: the sources do not change under a run
    if _ENVIRONMENT is None:
        _ENVIRONMENT = {"source_sha256": _source_sha256(), "python": sys.version.split()[0],
                        "machine": platform.machine(), "cpu": _cpu_model(), **_versions()}
    return dict(_ENVIRONMENT)


def _source_sha256() -> str:
    import importlib.util

    digest = hashlib.sha256()
    for package in _SOURCE_PACKAGES:
        for location in importlib.util.find_spec(package).submodule_search_locations or ():
            digest.update(f"{package}\0{tree_sha256(location, _SOURCE_SUFFIXES)}\n".encode())
    return digest.hexdigest()


def _versions() -> dict:
    from importlib import metadata

    found = {}
    for dist in ("numpy", "onnx", "apache-tvm", "apache-tvm-ffi", "scipy"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = None
    return found


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            return next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "")
    except OSError:
        return platform.processor()


class CacheSession:
    """One compile's use of a cache (or of none): the key of each stage and "hit"/"miss" per stage.

    Stages are looked up in order; a later stage's key document names the earlier keys it builds on.
    """

    def __init__(self, cache: CompileCache | None):
        self.cache = cache
        self.keys: dict[str, str] = {}
        self.use: dict[str, str] = {}

    @property
    def enabled(self) -> bool:
        return self.cache is not None

    def fetch(self, stage: str, document, reader):
        """``reader(entry directory)`` for the entry of ``document``; None on a miss or without a cache.

        ``document`` is a dict, or a callable giving it (not called without a cache)."""
        if self.cache is None:
            return None
        key = self.keys[stage] = self.cache.key({"stage": stage, **(document() if callable(document) else document)})
        value = self.cache.load(stage, key, reader)
        self.use[stage] = "miss" if value is None else "hit"
        return value

    def keep(self, stage: str, files: dict) -> None:
        """Store ``files`` as the entry of the stage :meth:`fetch` missed."""
        if self.cache is not None and stage in self.keys:
            self.cache.store(stage, self.keys[stage], files)
