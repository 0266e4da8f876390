"""Graph passes (installed as ``qcompile.passes``). One pass per module; see base.py."""

from .base import Pass, PassManager, PassResult
from .fold_linear import FoldLinearPass
from .quant_config import WeightQuantConfig
from .quantize_weights import QuantizeWeightsPass
from .rtn import quantize_and_pack, quantize_rtn
from .calibrate import CalibrationPass, Stats, collect_statistics
from .gptq import GPTQPass, gptq_quantize
from .mixed_precision import MixedPrecisionPass, choose_bits

__all__ = [
    "Pass",
    "PassManager",
    "PassResult",
    "FoldLinearPass",
    "WeightQuantConfig",
    "QuantizeWeightsPass",
    "quantize_rtn",
    "quantize_and_pack",
    "CalibrationPass",
    "Stats",
    "collect_statistics",
    "GPTQPass",
    "gptq_quantize",
    "MixedPrecisionPass",
    "choose_bits",
]
