"""The arm64 (aarch64 Linux) backend: cross-compiled ``model.so`` plus a C++ runner, run here under qemu.

* :mod:`.target`: per-CPU LLVM targets (:func:`arm64_target`), ``build`` (the llvm
  backend's pipeline) and ``export_library`` (``aarch64-linux-gnu-g++``);
* :mod:`.toolchain`: cross tools, the stock aarch64 TVM runtime (downloaded once, cached),
  the runner build, ``disassemble``;
* :mod:`.package`: the artifact payload and the manifest's ``device`` section;
* :mod:`.qemu`: :class:`QemuModule`, the host-side way to run an arm64 artifact.
"""

from .package import RUNNER, RUNNER_SOURCE_NAME, open_module, package
from .qemu import QemuModule, qemu_available
from .target import CPU_FEATURES, MTRIPLE, arm64_target, build, export_library
from .toolchain import DeviceRuntime, build_runner, device_runtime, disassemble, function_bodies

__all__ = [
    "CPU_FEATURES", "MTRIPLE", "arm64_target", "build", "export_library",
    "package", "open_module", "RUNNER", "RUNNER_SOURCE_NAME",
    "QemuModule", "qemu_available",
    "DeviceRuntime", "device_runtime", "build_runner", "disassemble", "function_bodies",
]
