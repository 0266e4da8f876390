"""The aarch64 target: per-CPU LLVM targets, build (the host llvm pipeline) and cross export.

Nothing about lowering or scheduling is specific to this file: :func:`build` is the llvm
backend's ``build`` (``lower_graph`` + the same Relax pipeline) with an aarch64 target, and
the kernel schedules pick their NEON register tile from the target
(:func:`qcompile.schedules.llvm.cpu_params`). What is ARM-specific:

1. :data:`CPU_FEATURES`: the ``mcpu`` and ``mattr`` of every supported CPU. ``+neon`` always
   (every aarch64 CPU has Advanced SIMD), ``+dotprod`` (``sdot``/``udot``) on ARMv8.2+ cores
   that have it, ``+i8mm`` (``smmla``) where the CPU has it (Neoverse N2; not Apple M1).
2. :func:`export_library` links ``model.so`` with ``aarch64-linux-gnu-g++``.

Invariant: the library's ``main`` has the signature of
:func:`qcompile.backends.relax_lowering.lower_graph` (tuple output), so the C++ runner and
the host share one calling convention.
"""

from __future__ import annotations

from types import MappingProxyType

import tvm

from qcompile.config import ARM64_CPUS, ARM64_DEFAULT_CPU
from qcompile.errors import InputError

from ..llvm import build as _llvm_build
from ..llvm.target import export_library as llvm_export_library
from . import toolchain

__all__ = ["CPU_FEATURES", "MTRIPLE", "arm64_target", "build", "export_library"]

MTRIPLE = "aarch64-linux-gnu"

CPU_FEATURES = MappingProxyType({
    "cortex-a55": ("+neon", "+dotprod"),            # ARMv8.2-A little core
    "cortex-a76": ("+neon", "+dotprod"),            # ARMv8.2-A big core
    "neoverse-n1": ("+neon", "+dotprod"),           # ARMv8.2-A server (Graviton2, Ampere Altra)
    "neoverse-n2": ("+neon", "+dotprod", "+i8mm"),  # ARMv9.0-A (Graviton3 is V1; N2: Yitian, Cobalt)
    "apple-m1": ("+neon", "+dotprod"),              # ARMv8.5-A class, no i8mm (M2 adds it)
})
if set(CPU_FEATURES) != set(ARM64_CPUS):  # pragma: no cover  (a table edit forgot one side)
    raise ImportError("CPU_FEATURES and qcompile.config.ARM64_CPUS disagree")


def arm64_target(cpu: str | None = None, num_cores: int | None = None) -> tvm.target.Target:
    """The llvm aarch64 target of ``cpu`` (default ``neoverse-n1``) with its features.

    ``num_cores`` only informs TVM's cost decisions; the runtime thread count is set on the
    device (``TVM_NUM_THREADS``).
    """
    cpu = cpu or ARM64_DEFAULT_CPU
    if cpu not in CPU_FEATURES:
        raise InputError(f"--cpu must be one of {', '.join(CPU_FEATURES)} (got '{cpu}')")
    spec = {"kind": "llvm", "mtriple": MTRIPLE, "mcpu": cpu, "mattr": list(CPU_FEATURES[cpu]),
            # as on the host: lets LLVM vectorise float reductions, keeps NaN/inf semantics
            "fast-math-reassoc": True}
    if num_cores:
        spec["num-cores"] = int(num_cores)
    return tvm.target.Target(spec)


def build(graph, target: tvm.target.Target | None = None):
    """Lower ``graph`` and compile it for ``target`` (default: :func:`arm64_target`)."""
    return _llvm_build(graph, target or arm64_target())


def export_library(executable, path) -> str:
    """Link the executable into an aarch64 shared library at ``path`` (needs the cross g++)."""
    return llvm_export_library(executable, path, cc=toolchain.require_tool(toolchain.CXX))
