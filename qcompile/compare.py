"""``qcompile compare MODEL OUT``: where a compiled model loses accuracy, layer by layer.

The artifact ``OUT`` stores no graph, so the comparison rebuilds the compile's graphs from
``MODEL`` with the configuration in OUT's manifest (input shapes from its input specs) and
the same passes (deterministic; GPTQ / mixed precision recalibrate on ``calib`` or, as the
compile did by default, on the evaluation inputs). Then, on the same inputs:

* per quantized layer (QLinear / QGather, plus float Linear / MatMul): SQNR (dB) and
  cosine of the fake-quant output (reference interpreter on the quantized graph) against
  the float output;
* per model output: float vs fake-quant, float vs compiled (the artifact's library) and
  fake-quant vs compiled. A large fake-quant vs compiled error means the rebuilt graph is
  not the one compiled (different calibration data) or a backend bug.

Inputs: ``inputs`` (dict of arrays, shaped as the artifact's inputs) or synthesized
(:func:`qcompile.pipeline.synthesize_inputs`).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .config import CompileConfig
from .errors import InputError

__all__ = ["compare_artifact", "format_table", "config_from_manifest"]


def config_from_manifest(manifest: dict) -> CompileConfig:
    """The CompileConfig a manifest records (JSON lists back to tuples)."""
    data = dict(manifest.get("config", {}))
    fields = set(CompileConfig.__dataclass_fields__)
    data = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in fields}
    data["shapes"] = {io["name"]: tuple(io["shape"]) for io in manifest["inputs"]}
    return CompileConfig(**data)


def compare_artifact(model, artifact_dir, inputs: dict | None = None, calib: dict | None = None) -> dict:
    """Float vs fake-quant per layer and float / fake-quant / compiled on the outputs."""
    from . import driver, pipeline
    from .artifact import verify
    from .metrics import compare

    manifest = verify(artifact_dir)
    config = config_from_manifest(manifest)
    graph, _ = driver.import_model(model, config.shapes)
    feeds = pipeline.check_feeds(graph, inputs) if inputs is not None else pipeline.synthesize_inputs(graph)
    float_graph, quant_graph = pipeline.optimize(graph, config, calib if calib is not None else feeds)
    layers, ref_out, fq_out = driver.layer_report(float_graph, quant_graph, feeds)
    got = driver.load(artifact_dir).run(feeds)
    outputs = []
    for name in ref_out:
        if name not in got:
            raise InputError(f"artifact {artifact_dir} has no output '{name}' (model outputs: {list(ref_out)})")
        outputs.append({
            "output": name,
            "fake_quant_vs_float": compare(ref_out[name], fq_out[name]),
            "compiled_vs_float": compare(ref_out[name], got[name]),
            "compiled_vs_fake_quant": compare(fq_out[name], got[name]),
        })
    recipe = {r["node"]: r for r in manifest.get("recipe", [])}
    for layer in layers:
        entry = recipe.get(layer["node"], {})
        layer["bits"] = entry.get("bits")
        layer["method"] = entry.get("method")
    return {"artifact": str(Path(artifact_dir)), "inputs": "user" if inputs is not None else "synthetic",
            "layers": layers, "outputs": outputs}


def format_table(result: dict, max_name: int = 60) -> str:
    """The comparison as a plain-text table (layers, then outputs)."""
    lines = [f"{'layer':<{max_name}} {'op':<8} {'bits':>4} {'method':<6} {'SQNR dB':>8} {'cosine':>9}"]
    for layer in result["layers"]:
        name = _short(layer["node"], max_name)
        bits = "" if layer.get("bits") is None else str(layer["bits"])
        lines.append(f"{name:<{max_name}} {layer['op']:<8} {bits:>4} {layer.get('method') or '':<6} "
                     f"{_num(layer.get('sqnr_db'), '8.2f')} {_num(layer.get('cosine'), '9.6f')}")
    lines.append("")
    lines.append(f"{'output':<24} {'comparison':<24} {'SQNR dB':>8} {'cosine':>9}")
    for out in result["outputs"]:
        for key in ("fake_quant_vs_float", "compiled_vs_float", "compiled_vs_fake_quant"):
            m = out[key]
            lines.append(f"{_short(out['output'], 24):<24} {key:<24} {_num(m.get('sqnr_db'), '8.2f')} "
                         f"{_num(m.get('cosine'), '9.6f')}")
    return "\n".join(lines)


def _short(name: str, width: int) -> str:
    return name if len(name) <= width else "..." + name[-(width - 3):]


def _num(x, fmt: str) -> str:
    width = int(fmt.split(".")[0])
    if x is None:
        return " " * width
    if isinstance(x, float) and math.isinf(x):
        return f"{'inf':>{width}}"
    return format(float(np.float64(x)), fmt)
