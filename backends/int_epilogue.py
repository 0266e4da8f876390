"""Elementwise integer ops fused into the epilogue of an integer GEMM kernel.

An integer GEMM (``IntLinear``, ``IntMatMul``) produces int32 accumulators that, in the
integer-only graph, are almost always rescaled at once (``Requantize`` to codes or to an
aligned int32), sometimes followed by a table (``Lut``) and a second rescale. Written as
separate kernels, each step reads and writes the whole activation again. Here such a chain
runs inside the GEMM's epilogue instead: ``acc -> step 1 -> ... -> step n`` on the register
tile, and only the last value is stored.

Pattern (:func:`fusible_chain`), checked value by value from the GEMM's output:

1. the value has exactly one consumer and is not a graph output;
2. the consumer is one of :data:`EPILOGUE_OPS` and reads the value as its first input;
   every other input is a graph constant;
3. the step is elementwise on the GEMM's ``[rows, n]`` view: its output has the value's
   shape, and a per-channel ``Requantize`` runs along the last axis (``n``) or has one
   multiplier.

The chain stops at the first value that fails; an empty chain leaves the GEMM unchanged.
Each step is built by the same TE compute as its stand-alone lowering
(:func:`.integer_kernels.requantize_compute`, :func:`.integer_nn_kernels.lut_compute`), and
:func:`inline_chain` folds the blocks into one, so fused and unfused kernels compute the same
integer expression: bit-exactness with the numpy reference is kept by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import te

from qcompile.ir import Graph, Node

from . import integer_kernels, integer_nn_kernels

__all__ = ["EPILOGUE_OPS", "EpilogueStep", "fusible_chain", "step_of", "apply_steps", "inline_chain"]


def _requantize(x: te.Tensor, consts, attrs: dict) -> te.Tensor:
    mult, shift = consts
    return integer_kernels.requantize_compute(x, mult, shift, len(x.shape) - 1, attrs["out_dtype"],
                                              attrs.get("qmin", -127), attrs.get("qmax", 127))


def _lut(x: te.Tensor, consts, attrs: dict) -> te.Tensor:
    return integer_nn_kernels.lut_compute(x, consts[0], attrs.get("offset", 0))


# op -> TE builder (x, constant placeholders, attrs) -> elementwise te.Tensor of x's shape
EPILOGUE_OPS = {"Requantize": _requantize, "Lut": _lut}


@dataclass(frozen=True)
class EpilogueStep:
    """One fused step: the op, its attributes, and (shape, dtype) of its constant inputs.

    Hashable: it is part of the kernel cache key, so layers with equal steps share one kernel
    (the constants are kernel arguments, not baked in).
    """

    op: str
    attrs: tuple[tuple[str, object], ...]
    consts: tuple[tuple[tuple[int, ...], str], ...]


def step_of(graph: Graph, node: Node) -> EpilogueStep:
    consts = tuple((tuple(graph.constants[n].shape), str(graph.constants[n].dtype)) for n in node.inputs[1:])
    return EpilogueStep(node.op, tuple(sorted(node.attrs.items())), consts)


def fusible_chain(graph: Graph, value: str, consumers: dict[str, list[Node]]) -> list[Node]:
    """The nodes after ``value`` (a GEMM output) that its kernel can compute (module docstring)."""
    chain: list[Node] = []
    outputs = set(graph.outputs)
    while value not in outputs and len(consumers.get(value, ())) == 1:
        node = consumers[value][0]
        if not _fusible(graph, node, value):
            break
        chain.append(node)
        value = node.outputs[0]
    return chain


def _fusible(graph: Graph, node: Node, value: str) -> bool:
    if node.op not in EPILOGUE_OPS or len(node.outputs) != 1 or not node.inputs or node.inputs[0] != value:
        return False
    if not all(n and graph.is_constant(n) for n in node.inputs[1:]):
        return False
    shape = tuple(graph.type_of(value).shape)
    if tuple(graph.type_of(node.outputs[0]).shape) != shape:
        return False
    if node.op == "Requantize" and graph.constants[node.inputs[1]].size > 1:
        return int(node.attrs.get("axis", -1)) % len(shape) == len(shape) - 1
    return True


def apply_steps(x: te.Tensor, steps) -> tuple[te.Tensor, list[te.Tensor]]:
    """TE of ``steps`` applied to ``x`` -> (last tensor, the steps' constant placeholders in order)."""
    placeholders: list[te.Tensor] = []
    for s, step in enumerate(steps):
        consts = [te.placeholder(shape, dtype, name=f"step{s}_c{c}") for c, (shape, dtype) in enumerate(step.consts)]
        placeholders += consts
        x = EPILOGUE_OPS[step.op](x, consts, dict(step.attrs))
    return x, placeholders


def inline_chain(sch, first: str) -> str:
    """Inline block ``first`` and each block after it into the last consumer; return that block's name.

    Each block of the chain has exactly one consumer (the next step) until the output block.
    """
    block = sch.get_sblock(first)
    while True:
        consumers = sch.get_consumers(block)
        if not consumers:
            return sch.get(block).name_hint
        sch.compute_inline(block)
        (block,) = consumers
