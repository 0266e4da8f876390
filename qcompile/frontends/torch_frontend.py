"""torch.export frontend: ``torch.nn.Module`` + example inputs -> qcompile IR.

The module is captured with ``torch.export.export`` (strict graph capture, no Python
fallbacks), the ExportedProgram is translated to ONNX in memory by torch's own exporter,
and the ONNX frontend turns that into IR with the example inputs' static shapes. Input
names come from the forward signature.
"""

from __future__ import annotations

import hashlib
import inspect

from ..errors import ModelFormatError
from ..ir import Graph

__all__ = ["load_torch", "module_sha256"]


def _as_tuple(example_inputs):
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def load_torch(module, example_inputs, opset: int = 18) -> Graph:
    import torch

    from .onnx_frontend import load_onnx

    args = _as_tuple(example_inputs)
    module = module.eval()
    try:
        exported = torch.export.export(module, args)
    except Exception as err:  # torch raises many types here; report the first line
        raise ModelFormatError(f"torch.export failed on {type(module).__name__}: {str(err).splitlines()[0]}") from err
    params = list(inspect.signature(module.forward).parameters)
    input_names = [params[i] if i < len(params) else f"input_{i}" for i in range(len(args))]
    try:
        program = torch.onnx.export(exported, args, dynamo=True, opset_version=opset,
                                    input_names=input_names, optimize=True, verbose=False)
    except Exception as err:
        raise ModelFormatError(f"translating the ExportedProgram of {type(module).__name__} failed: {str(err).splitlines()[0]}") from err
    proto = program.model_proto
    graph = load_onnx(proto, shapes={name: tuple(a.shape) for name, a in zip(input_names, args)})
    graph.metadata["source"] = f"torch.export:{type(module).__name__}"
    return graph


def module_sha256(module) -> str:
    """Hash of the module's class name and state (names, dtypes, shapes, bytes), sorted."""
    import torch

    digest = hashlib.sha256(type(module).__qualname__.encode())
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
