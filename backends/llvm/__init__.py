"""The host llvm backend (x86-64): ``host_target``, ``build``, ``export_library``.

See :mod:`qcompile.backends.llvm.target` for the pipeline; the library it writes is run
with :class:`qcompile.backends.runtime.HostModule`.
"""

from .target import CPUFallback, build, export_library, host_target, relax_pipeline

__all__ = ["host_target", "build", "export_library", "relax_pipeline", "CPUFallback"]
