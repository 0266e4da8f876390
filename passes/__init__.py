"""Graph passes (installed as ``qcompile.passes``). One pass per module; see base.py."""

from .base import Pass, PassManager, PassResult

__all__ = ["Pass", "PassManager", "PassResult"]
