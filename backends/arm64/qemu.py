"""Run an arm64 artifact on this (non-ARM) host: the cross-built runner under ``qemu-aarch64``.

:class:`QemuModule` has :class:`qcompile.backends.runtime.HostModule`'s calling convention
(``module({name: array}) -> {name: array}``). Each call writes the inputs as ``.npy`` files
in a temporary directory, runs::

    LD_LIBRARY_PATH=<aarch64 runtime libs> TVM_NUM_THREADS=<n> \\
        qemu-aarch64 -cpu max -L /usr/aarch64-linux-gnu RUNNER model.so OUT_DIR in_0.npy ...

and reads ``OUT_DIR/output_<i>.npy`` back, in the order of ``output_names``. ``-cpu max``
emulates every extension a supported CPU may use (dotprod ``sdot``, i8mm ``smmla``). qemu translates
every instruction: its timings say nothing about ARM hardware and are never reported.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from qcompile.errors import InputError, ToolchainError

from . import toolchain

__all__ = ["QemuModule", "qemu_available"]


def qemu_available() -> bool:
    """True when both qemu-aarch64 and the Debian aarch64 libc (its ``-L`` root) are present."""
    return toolchain.find_tool(toolchain.QEMU) is not None and Path(toolchain.SYSROOT, "lib").is_dir()


class QemuModule:
    """A ``model.so`` for aarch64 plus its runner, run under qemu-user."""

    def __init__(self, library, runner, input_names, output_names, num_threads=None,
                 runtime: toolchain.DeviceRuntime | None = None):
        self.library, self.runner = Path(library).resolve(), Path(runner).resolve()
        self.input_names, self.output_names = list(input_names), list(output_names)
        self.num_threads = int(num_threads or os.cpu_count() or 1)
        self._qemu = toolchain.require_tool(toolchain.QEMU)
        if not Path(toolchain.SYSROOT, "lib").is_dir():
            raise ToolchainError(f"{toolchain.SYSROOT} not found: qemu needs the aarch64 libc "
                                 "(Debian/Ubuntu: apt-get install gcc-aarch64-linux-gnu)")
        for path in (self.library, self.runner):
            if not path.is_file():
                raise ToolchainError(f"{path}: missing (an arm64 artifact holds model.so and runner)")
        self._runtime = runtime or toolchain.device_runtime()

    def command(self, out_dir, inputs) -> list[str]:
        return [self._qemu, "-cpu", "max", "-L", toolchain.SYSROOT, str(self.runner), str(self.library),
                str(out_dir), *map(str, inputs)]

    def __call__(self, feeds: dict) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise InputError(f"missing input(s): {', '.join(missing)}")
        with tempfile.TemporaryDirectory(prefix="qcompile-qemu-") as tmp:
            tmp = Path(tmp)
            inputs = []
            for i, name in enumerate(self.input_names):
                inputs.append(tmp / f"in_{i}.npy")
                np.save(inputs[-1], np.ascontiguousarray(feeds[name]), allow_pickle=False)
            env = dict(os.environ, LD_LIBRARY_PATH=str(self._runtime.lib_dir),
                       TVM_NUM_THREADS=str(self.num_threads))
            proc = subprocess.run(self.command(tmp, inputs), capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                raise ToolchainError(f"arm64 runner failed under qemu (exit {proc.returncode}) on "
                                     f"{self.library}: {proc.stderr.strip()[-2000:]}")
            outs = {}
            for i, name in enumerate(self.output_names):
                path = tmp / f"output_{i}.npy"
                if not path.is_file():
                    raise ToolchainError(f"arm64 runner wrote no output {i} ('{name}')")
                outs[name] = np.load(path, allow_pickle=False)
        return outs
