"""Frozen, versioned configuration of weight-only quantization (validated on construction).

:class:`WeightQuantConfig` says how :class:`passes.quantize_weights.QuantizeWeightsPass`
quantizes Linear weights and embedding (Gather) tables. It never describes "no
quantization": bits=16 is handled by the driver, which simply does not run the pass.

Invariants after ``__post_init__`` (violations raise :class:`qcompile.errors.InputError`
with the CLI flag name):

* ``bits`` and ``embedding_bits`` (unless None) are in :data:`SUPPORTED_BITS`.
* ``group_size`` and ``embedding_group_size`` are 0 (one group per output channel / per
  table row) or a positive multiple of 8.
* ``min_linear_size`` and ``min_embedding_size`` are >= 0; ``exclude`` is a tuple of str.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from qcompile.errors import InputError

__all__ = ["WeightQuantConfig", "SUPPORTED_BITS", "DEFAULT_MIN_EMBEDDING_SIZE"]

SUPPORTED_BITS = (2, 3, 4, 8)
DEFAULT_MIN_EMBEDDING_SIZE = 64 * 1024


@dataclass(frozen=True)
class WeightQuantConfig:
    """How to quantize weights (round-to-nearest, per group along the reduction axis).

    Linear layers
        ``bits``: code width; ``group_size``: input channels (K) per scale, 0 = one group per
        output channel; ``symmetric``: zero point fixed at 2**(bits-1) and no zeros tensor;
        ``clip_search``: per group, shrink the range by a grid of ratios and keep the one with
        the least squared error; ``min_linear_size``: Linears with K*N below this stay float;
        ``exclude``: node names kept float.
    Embedding tables (``Gather(table[V, D], idx)`` on axis 0)
        ``embedding_bits``: None keeps tables float; groups run along D
        (``embedding_group_size`` 0 = one group per row); ``embedding_symmetric`` defaults to
        asymmetric; tables with fewer than ``min_embedding_size`` elements stay float
        (position / token-type embeddings).

    Example: ``WeightQuantConfig(bits=4, group_size=32)`` -> W[384, 1536] gets
    scales/zeros of shape [1536, 12] and 4-bit codes packed to uint8[1536, 192].
    """

    bits: int = 4
    group_size: int = 0
    symmetric: bool = False
    clip_search: bool = True
    embedding_bits: int | None = 8
    min_linear_size: int = 0
    exclude: tuple[str, ...] = ()
    embedding_group_size: int = 0
    embedding_symmetric: bool = False
    min_embedding_size: int = DEFAULT_MIN_EMBEDDING_SIZE
    version: int = 1

    def __post_init__(self):
        _check_bits("--bits", self.bits)
        if self.embedding_bits is not None:
            _check_bits("--embedding-bits", self.embedding_bits)
        _check_group("--group-size", self.group_size)
        _check_group("--embedding-group-size", self.embedding_group_size)
        for flag, value in (("min_linear_size", self.min_linear_size), ("min_embedding_size", self.min_embedding_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InputError(f"{flag} must be an integer >= 0 (got {value!r})")
        if isinstance(self.exclude, str) or not all(isinstance(n, str) for n in self.exclude):
            raise InputError(f"exclude must be a tuple of node names (got {self.exclude!r})")
        object.__setattr__(self, "exclude", tuple(self.exclude))
        if self.version != 1:
            raise InputError(f"WeightQuantConfig version {self.version} is not supported (known: 1)")

    def to_json(self) -> dict:
        data = asdict(self)
        data["exclude"] = list(self.exclude)
        return data


def _check_bits(flag: str, bits) -> None:
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise InputError(f"{flag} must be one of 2, 3, 4, 8 (got {bits})")


def _check_group(flag: str, group_size) -> None:
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 0 or group_size % 8:
        raise InputError(f"{flag} must be 0 (per channel) or a positive multiple of 8 (got {group_size})")
