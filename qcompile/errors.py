"""Error hierarchy. Every error a user can trigger derives from ``QCompileError``.

The CLI prints ``str(error)`` on one line and exits with code 2; messages therefore name
the file, node, op or input they are about.
"""

__all__ = [
    "QCompileError",
    "ModelFormatError",
    "UnsupportedOpError",
    "ShapeError",
    "InputError",
    "ArtifactError",
    "InvariantError",
    "ToolchainError",
]


class QCompileError(Exception):
    """Base class of every error qcompile raises on purpose."""


class ModelFormatError(QCompileError):
    """The model file cannot be read or is malformed."""


class UnsupportedOpError(QCompileError):
    """An operator (or an attribute value of one) has no lowering."""

    def __init__(self, op_type: str, node_name: str, detail: str = ""):
        self.op_type = op_type
        self.node_name = node_name
        extra = f": {detail}" if detail else ""
        super().__init__(f"unsupported op {op_type} (node '{node_name}'){extra}")


class ShapeError(QCompileError):
    """A dimension is unknown or shapes disagree."""


class InputError(QCompileError):
    """A user-supplied value (option, input array) is invalid or missing."""


class ArtifactError(QCompileError):
    """An artifact directory is missing files or fails its hash check."""


class InvariantError(QCompileError):
    """A pass or the IR verifier found a broken invariant (a bug, not user error)."""


class ToolchainError(QCompileError):
    """An external tool a target needs (cross compiler, emulator, device runtime) is missing or failed."""
