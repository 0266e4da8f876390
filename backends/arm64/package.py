"""The arm64 artifact payload: ``model.so``, the runner (source and cross-built binary), and the
manifest section that tells a device what it needs.

Files written into the artifact directory (all hashed by the manifest's ``files``):

* ``model.so``: the model, linked by ``aarch64-linux-gnu-g++``;
* ``runner.cc``: the runner's source (rebuild it on the device, or with another toolchain);
* ``runner``: the runner for aarch64 Linux (glibc >= 2.28), rpath ``$ORIGIN:$ORIGIN/lib``.

The runtime libraries are NOT copied (they are the stock TVM runtime, ~4 MB): the manifest's
``device`` section names them, the wheels they come from and their sha256, and
:func:`open_module` takes them from the host cache (:func:`toolchain.device_runtime`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from qcompile.artifact import sha256_file

from . import toolchain
from .qemu import QemuModule
from .target import CPU_FEATURES, MTRIPLE, export_library

__all__ = ["RUNNER", "RUNNER_SOURCE_NAME", "package", "open_module"]

RUNNER = "runner"
RUNNER_SOURCE_NAME = "runner.cc"


def package(executable, stage: Path, library: str, cpu: str) -> tuple[list[str], dict]:
    """Write the payload into ``stage``; return (payload file names, manifest ``device`` section)."""
    stage = Path(stage)
    export_library(executable, stage / library)
    runtime = toolchain.device_runtime()
    shutil.copyfile(toolchain.RUNNER_SOURCE, stage / RUNNER_SOURCE_NAME)
    toolchain.build_runner(runtime, stage / RUNNER)
    device = {
        "arch": "aarch64",
        "mtriple": MTRIPLE,
        "cpu": cpu,
        "mattr": list(CPU_FEATURES[cpu]),
        "runner": RUNNER,
        "runner_source": RUNNER_SOURCE_NAME,
        "runtime": {
            "packages": runtime.packages,
            "wheel_platform": "manylinux_2_28_aarch64",
            "libraries": {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                          for p in runtime.libraries()},
            "wheel_paths": {"libtvm_runtime.so": "tvm/lib/libtvm_runtime.so",
                            "libtvm_ffi.so": "tvm_ffi/lib/libtvm_ffi.so"},
        },
        "usage": (f"put {', '.join(toolchain.RUNTIME_LIBRARIES)} beside {RUNNER} (or in ./lib or on "
                  f"LD_LIBRARY_PATH), then: ./{RUNNER} {library} OUT_DIR IN_0.npy ... "
                  "(one .npy per input, in manifest order; writes OUT_DIR/output_<i>.npy)"),
    }
    return [library, RUNNER_SOURCE_NAME, RUNNER], device


def open_module(library, input_names, output_names, num_threads=None) -> QemuModule:
    """The artifact's model, run by its own runner under qemu (``library``'s folder holds it)."""
    library = Path(library)
    return QemuModule(library, library.parent / RUNNER, input_names, output_names, num_threads)
