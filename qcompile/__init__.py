"""qcompile: a compiler for quantized neural networks, lowered through Apache TVM."""

__version__ = "0.1.0"

from .config import CompileConfig  # noqa: E402
from .driver import Artifact, CompiledModel, compile, load  # noqa: E402
from .errors import QCompileError  # noqa: E402

__all__ = ["compile", "load", "CompileConfig", "Artifact", "CompiledModel", "QCompileError", "__version__"]
