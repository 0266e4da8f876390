"""User-facing, frozen and versioned compile configuration (validated on construction)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .errors import InputError

__all__ = ["CompileConfig", "SUPPORTED_TARGETS", "parse_shape"]

SUPPORTED_TARGETS = ("llvm",)
WEIGHT_BITS = (2, 3, 4, 8, 16)


@dataclass(frozen=True)
class CompileConfig:
    """What to compile for and how to quantize.

    ``bits`` 16 means no quantization (the float graph is lowered as is).
    ``group_size`` 0 quantizes per output channel; otherwise groups of that many input
    channels share a scale. ``shapes`` binds dynamic input dimensions, e.g.
    ``{"input_ids": (1, 128)}``.
    """

    target: str = "llvm"
    bits: int = 4
    group_size: int = 0
    symmetric: bool = False
    embedding_bits: int | None = 8
    shapes: dict = field(default_factory=dict)
    num_threads: int | None = None
    verify: bool = True
    version: int = 1

    def __post_init__(self):
        if self.target not in SUPPORTED_TARGETS:
            raise InputError(f"--target must be one of {', '.join(SUPPORTED_TARGETS)} (got '{self.target}')")
        if self.bits not in WEIGHT_BITS:
            raise InputError(f"--bits must be one of 2, 3, 4, 8, 16 (got {self.bits})")
        if self.group_size < 0 or (self.group_size and self.group_size % 8):
            raise InputError(f"--group-size must be 0 (per channel) or a positive multiple of 8 (got {self.group_size})")
        if self.embedding_bits not in (None, 4, 8):
            raise InputError(f"--embedding-bits must be 4, 8 or none (got {self.embedding_bits})")
        if self.num_threads is not None and self.num_threads < 1:
            raise InputError(f"--threads must be >= 1 (got {self.num_threads})")

    @property
    def quantize(self) -> bool:
        return self.bits != 16

    def to_json(self) -> dict:
        data = asdict(self)
        data["shapes"] = {k: list(v) for k, v in sorted(self.shapes.items())}
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
