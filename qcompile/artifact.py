"""The artifact contract: a directory with manifest.json, the model library, report.json.

Invariants:
1. An artifact directory appears complete or not at all: everything is written to a
   temporary sibling directory and renamed into place (a failed compile leaves no OUT).
2. ``manifest["files"]`` lists every payload file with its sha256 and size; :func:`verify`
   recomputes them, so a tampered or truncated artifact is refused before it runs.
3. Nothing time-dependent is hashed: the same inputs give the same manifest and files.
   ``timings.json`` (wall time per compile phase, compile-cache use) is the one file that
   differs between two compiles; it is informational and not listed in the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import ArtifactError

__all__ = ["FORMAT_VERSION", "sha256_file", "staging_dir", "write_json", "read_manifest", "verify"]

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TIMINGS = "timings.json"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_json(path: Path, data) -> None:
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True, default=jsonable) + "\n")


def jsonable(obj):
    """``json.dumps`` default: numpy scalars as Python numbers, tuples and sets as lists."""
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (tuple, set)):
        return list(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


@contextmanager
def staging_dir(out: Path):
    """Yield a temporary directory beside ``out``; on success it replaces ``out`` atomically."""
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def file_entries(directory: Path, names) -> dict:
    return {
        name: {"sha256": sha256_file(directory / name), "bytes": (directory / name).stat().st_size}
        for name in sorted(names)
    }


def read_manifest(directory) -> dict:
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{directory}: not a qcompile artifact (no {MANIFEST})") from None
    except (OSError, ValueError) as err:
        raise ArtifactError(f"{path}: unreadable manifest ({err})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: format_version {manifest.get('format_version')} is not supported (expected {FORMAT_VERSION})"
        )
    return manifest


def verify(directory) -> dict:
    """Read the manifest and check every listed file's size and sha256; return the manifest."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    for name, entry in manifest.get("files", {}).items():
        path = directory / name
        if not path.is_file():
            raise ArtifactError(f"{directory}: file '{name}' listed in the manifest is missing")
        if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
            raise ArtifactError(f"{directory}: file '{name}' does not match its sha256 in the manifest")
    return manifest
