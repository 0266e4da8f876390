"""User-facing, frozen and versioned compile configuration (validated on construction)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .errors import InputError

__all__ = ["CompileConfig", "SUPPORTED_TARGETS", "ARM64_CPUS", "ARM64_DEFAULT_CPU", "parse_shape"]

SUPPORTED_TARGETS = ("llvm", "arm64")
# CPUs of --target arm64 (their LLVM features: qcompile.backends.arm64.target.CPU_FEATURES)
ARM64_CPUS = ("cortex-a55", "cortex-a76", "neoverse-n1", "neoverse-n2", "apple-m1")
ARM64_DEFAULT_CPU = "neoverse-n1"
WEIGHT_BITS = (2, 3, 4, 8, 16)
# weight quantization methods (--method): round-to-nearest, or GPTQ on calibration Hessians
METHODS = ("rtn", "gptq", "gptaq")
# function-preserving graph passes run before quantization, in the order given (--passes)
GRAPH_PASSES = ("reorder", "hadamard")


@dataclass(frozen=True)
class CompileConfig:
    """What to compile for and how to quantize.

    ``bits`` 16 means no quantization (the float graph is lowered as is).
    ``group_size`` 0 quantizes per output channel; otherwise groups of that many input
    channels share a scale. ``shapes`` binds dynamic input dimensions, e.g.
    ``{"input_ids": (1, 128)}``. ``cpu`` picks the CPU of ``target`` "arm64" (one of
    :data:`ARM64_CPUS`, default :data:`ARM64_DEFAULT_CPU`); the host target detects its own.
    ``requantize``: for a pre-quantized model, dequantize its imported layers and quantize
    again with ``bits``/``group_size`` (default: keep the model's own recipe, quantize nothing else).
    ``passes``: function-preserving rewrites run on the float graph before quantization, in
    order: "reorder" (passes.reorder_channels, calibrated on the compile's eval inputs) and
    "hadamard" (passes.hadamard_rotation).
    ``method``: "rtn", "gptq" (passes.gptq, calibrated) or "gptaq" (passes.gptaq: GPTQ in graph
    order, each layer fit to the quantized model's inputs with the float model's output and
    residual stream as target; weight-only). ``act_order`` (default on): GPTQ in order of
    decreasing Hessian diagonal (static groups). ``calib``: npz of calibration inputs (default:
    the compile's eval inputs, else synthesized). Mixed precision (passes.mixed_precision)
    runs when ``bits`` is fractional (a non-integer average of code bits in (2, 8), e.g. 2.5) or
    ``size_budget_mb`` is set (total weight MB of the compiled graph; ``bits`` is then ignored
    unless it is 16); widths per Linear come from {2, 3, 4, 8}.
    ``fallback``: "auto" keeps a quantized Linear float when its kernel is estimated slower
    than the float one (backends.profitability; "off" only warns); the recipe records it.
    ``act_bits`` 8 (or 4: codes in [-7, 7], W4A4 / W8A4 numerics on the same int8 GEMMs, as x86
    and Arm have no 4-bit activation dot product) quantizes Linear activations too
    (passes.quantize_activations: int8 GEMMs,
    weights ``bits`` 8 or 4 symmetric per channel); ``act_mode`` "dynamic" (per token) or
    "static" (per tensor, calibrated like ``method`` gptq).
    ``integer_only`` (needs ``act_bits`` 8; implies static scales): passes.integerize makes every
    tensor between the input quantizer and the output dequantizer an integer (int32 accumulation,
    dyadic rescales); only those two boundary kernels compute in float.
    ``smooth``: SmoothQuant alpha for static activation scales (``act_mode`` static and
    ``integer_only``): per-channel activation ranges are migrated into the weights before the
    per-tensor scales are calibrated (passes.smooth_activations); 0 turns it off; None: the
    path's default (0.5 static, 0.6 integer-only: passes.smooth_activations.DEFAULT_ALPHA).
    ``outlier_bits``: weight-only quantization with ``group_size`` > 0: the leading weight
    groups of a Linear whose calibrated input channels are outliers (contiguous after the
    "reorder" pass) get their own Linear with these bits (passes.outlier_split).
    ``gemv_kernel``: kernel of a batch-1 (m = 1) QLinear (backends.lut_lowering): "vnni" the
    row-interleaved int8-activation VNNI GEMV (x86 AVX-512 VNNI, 2/4 bits), "lut" the T-MAC style
    lookup-table GEMV, each where it fits; "dequant" the fused dequant GEMV; "auto" (default) VNNI
    where it fits, else LUT where lut_kernels.choose_m1_kernel prefers it; the recipe records the
    choice per layer.
    ``tuning_db``: a MetaSchedule database directory written by ``qcompile tune`` (targets llvm
    and arm64, the latter tuned over RPC); the build schedules the functions it has records for from them, without searching.
    """

    target: str = "llvm"
    bits: int = 4
    group_size: int = 0
    symmetric: bool = False
    embedding_bits: int | None = 8
    shapes: dict = field(default_factory=dict)
    num_threads: int | None = None
    verify: bool = True
    requantize: bool = False
    cpu: str | None = None
    passes: tuple[str, ...] = ()
    method: str = "rtn"
    act_order: bool = True
    calib: str | None = None
    size_budget_mb: float | None = None
    fallback: str = "off"
    act_bits: int = 16
    act_mode: str = "dynamic"
    integer_only: bool = False
    smooth: float | None = None
    tuning_db: str | None = None
    outlier_bits: int | None = None
    gemv_kernel: str = "auto"
    version: int = 1

    def __post_init__(self):
        if self.act_bits not in (4, 8, 16):
            raise InputError(f"--act-bits must be 4, 8 or 16 (got {self.act_bits})")
        if self.act_mode not in ("dynamic", "static"):
            raise InputError(f"--act-mode must be dynamic or static (got '{self.act_mode}')")
        if self.integer_only and self.act_bits != 8:
            raise InputError(f"--integer-only needs --act-bits 8 (got {self.act_bits})")
        if self.act_bits != 16 and self.bits not in (4, 8):
            raise InputError(f"--act-bits {self.act_bits} needs --bits 8 or 4 (got {self.bits})")
        if self.smooth is not None and not 0.0 <= self.smooth <= 1.0:
            raise InputError(f"--smooth must lie in [0, 1] (got {self.smooth})")
        if self.fallback not in ("off", "auto"):
            raise InputError(f"--fallback must be off or auto (got '{self.fallback}')")
        if self.gemv_kernel not in ("auto", "vnni", "lut", "dequant"):
            raise InputError(f"--gemv-kernel must be auto, vnni, lut or dequant (got '{self.gemv_kernel}')")
        if self.target not in SUPPORTED_TARGETS:
            raise InputError(f"--target must be one of {', '.join(SUPPORTED_TARGETS)} (got '{self.target}')")
        if self.tuning_db is not None and self.target not in ("llvm", "arm64"):
            raise InputError(f"--db (tuning database) applies to --target llvm or arm64 (target is '{self.target}')")
        if self.cpu is not None and self.target != "arm64":
            raise InputError(f"--cpu applies to --target arm64 only (target is '{self.target}')")
        if self.target == "arm64" and self.cpu not in (None, *ARM64_CPUS):
            raise InputError(f"--cpu must be one of {', '.join(ARM64_CPUS)} (got '{self.cpu}')")
        if isinstance(self.bits, bool) or not isinstance(self.bits, (int, float)) or not (
                self.bits in WEIGHT_BITS or (2 < self.bits < 8 and not float(self.bits).is_integer())):
            raise InputError(f"--bits must be one of 2, 3, 4, 8, 16, or a fractional average in (2, 8) "
                             f"such as 2.5 for mixed precision (got {self.bits})")
        if self.method not in METHODS:
            raise InputError(f"--method must be one of {', '.join(METHODS)} (got '{self.method}')")
        if self.method == "gptaq" and self.act_bits != 16:
            raise InputError("--method gptaq is for weight-only quantization (--act-bits 16); "
                             "with --act-bits 8 use --method gptq")
        if self.size_budget_mb is not None and not (self.size_budget_mb > 0 and self.bits != 16):
            raise InputError(f"--size-budget must be a positive number of MB, with quantization on (got {self.size_budget_mb})")
        if self.group_size < 0 or (self.group_size and self.group_size % 8):
            raise InputError(f"--group-size must be 0 (per channel) or a positive multiple of 8 (got {self.group_size})")
        if self.embedding_bits not in (None, 4, 8):
            raise InputError(f"--embedding-bits must be 4, 8 or none (got {self.embedding_bits})")
        if self.num_threads is not None and self.num_threads < 1:
            raise InputError(f"--threads must be >= 1 (got {self.num_threads})")
        if self.outlier_bits is not None and (self.outlier_bits not in (3, 4, 8) or self.act_bits != 16
                                              or not self.group_size or not self.quantize):
            raise InputError(f"--outlier-bits must be 3, 4 or 8, with weight-only quantization and --group-size > 0 "
                             f"(got {self.outlier_bits})")
        unknown = [p for p in self.passes if p not in GRAPH_PASSES]
        if isinstance(self.passes, str) or unknown:
            raise InputError(f"--passes takes a comma-separated list of {', '.join(GRAPH_PASSES)} (got {self.passes!r})")

    @property
    def target_cpu(self) -> str | None:
        """The CPU compiled for: ``cpu`` or the target's default (None on the host target)."""
        return (self.cpu or ARM64_DEFAULT_CPU) if self.target == "arm64" else None

    @property
    def quantize(self) -> bool:
        return self.bits != 16

    @property
    def mixed_precision(self) -> bool:
        """Per-layer widths chosen under a budget (fractional ``bits`` or ``size_budget_mb``)."""
        return self.quantize and (self.size_budget_mb is not None or self.bits not in WEIGHT_BITS)

    def to_json(self) -> dict:
        data = asdict(self)
        data["shapes"] = {k: list(v) for k, v in sorted(self.shapes.items())}
        data["passes"] = list(self.passes)
        return data


def parse_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """``"input_ids=1x128"`` -> ``("input_ids", (1, 128))``."""
    name, sep, dims = text.partition("=")
    try:
        if not sep or not name:
            raise ValueError
        shape = tuple(int(d) for d in dims.lower().split("x"))
        if any(d <= 0 for d in shape):
            raise ValueError
    except ValueError:
        raise InputError(f"--shape expects NAME=D1xD2x... with positive sizes (got '{text}')") from None
    return name, shape
