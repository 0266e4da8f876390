"""Graph passes (installed as ``qcompile.passes``). One pass per module; see base.py."""

from .base import Pass, PassManager, PassResult
from .fold_linear import FoldLinearPass
from .quant_config import WeightQuantConfig
from .quantize_weights import QuantizeWeightsPass
from .rtn import quantize_and_pack, quantize_rtn

__all__ = [
    "Pass",
    "PassManager",
    "PassResult",
    "FoldLinearPass",
    "WeightQuantConfig",
    "QuantizeWeightsPass",
    "quantize_rtn",
    "quantize_and_pack",
]
