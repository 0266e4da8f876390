#!/usr/bin/env python3
"""MiniLM accuracy sweep: mean embedding cosine vs fp32 for qcompile's quantization
recipes, beside onnxruntime's own quantizers, on the same 32 real sentences.

Rows: W8A8, W4A8, W4A16 g128, W3A16 g128, 2.5-bit-average mixed precision.
Columns: RTN, +reorder, +hadamard, +both, GPTQ. Every qcompile figure is the reference
interpreter's output of the quantized graph (what the compiled code reproduces; see the
artifact's compiled_vs_fake_quant figure). Calibration (reorder, GPTQ, static ranges,
mixed precision) uses minilm.CALIB_SENTENCES, disjoint from the evaluation sentences.

    python tools/accuracy_sweep.py [--rows W4A16g128,W3A16g128] [--cols rtn,gptq] [--skip-ort]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROWS = {
    "W8A8": dict(bits=8, act_bits=8),
    "W4A8": dict(bits=4, act_bits=8),
    "W4A16g128": dict(bits=4, group_size=128),
    "W3A16g128": dict(bits=3, group_size=128),
    "mixed2.5": dict(bits=2.5, group_size=128),
}
COLUMNS = {
    "rtn": dict(),
    "+reorder": dict(passes=("reorder",)),
    "+hadamard": dict(passes=("hadamard",)),
    "+both": dict(passes=("reorder", "hadamard")),
    "gptq": dict(method="gptq"),
}


def cosine(ref: np.ndarray, got: np.ndarray) -> float:
    return float(np.mean(np.sum(ref * got, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))))


def qcompile_cell(graph, feeds, calib, row: dict, col: dict) -> float | str:
    from qcompile.config import CompileConfig
    from qcompile.pipeline import optimize as _optimize
    from qcompile.errors import QCompileError
    from qcompile.interpreter import run

    if "act_bits" in row and col.get("method") == "gptq":
        return "n/a"
    try:
        config = replace(CompileConfig(embedding_bits=8), **row, **col)
        _, quantized = _optimize(graph, config, calibration=calib)
    except QCompileError as err:
        return f"error: {err}"
    return run(quantized, feeds)[graph.outputs[0]]


def ort_cells(onnx_path: Path, feeds: dict, calib: dict) -> dict[str, np.ndarray]:
    """onnxruntime's quantizers on the same model: dynamic int8, static QDQ, MatMulNBits."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from qcompile.models.demo import ort_session

    work = Path(tempfile.mkdtemp(prefix="qcsweep-"))
    out = {}

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{k: v[i : i + 1] for k, v in calib.items()} for i in range(len(calib["input_ids"]))])

        def get_next(self):
            return next(self.items, None)

    def run(path):
        sess = ort_session(path, 2)
        return np.concatenate([sess.run(None, {k: v[i : i + 1] for k, v in feeds.items()})[0]
                               for i in range(len(feeds["input_ids"]))])

    quantize_dynamic(str(onnx_path), str(work / "dyn.onnx"), per_channel=True, weight_type=QuantType.QInt8)
    out["ort dynamic int8 per-channel"] = run(work / "dyn.onnx")
    quantize_static(str(onnx_path), str(work / "qdq.onnx"), Reader(), quant_format=QuantFormat.QDQ, per_channel=True)
    out["ort static QDQ int8 (all ops)"] = run(work / "qdq.onnx")
    for block in (32, 128):
        model = onnx.load(str(onnx_path))
        quant = MatMulNBitsQuantizer(model, block_size=block, is_symmetric=False)
        quant.process()
        quant.model.save_model_to_file(str(work / f"nbits{block}.onnx"), False)
        out[f"ort MatMulNBits 4-bit block {block}"] = run(work / f"nbits{block}.onnx")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--cols", default=",".join(COLUMNS))
    p.add_argument("--skip-ort", action="store_true")
    p.add_argument("--json", default="tools/results/accuracy_sweep.json")
    args = p.parse_args()

    from qcompile.frontends.onnx_frontend import load_onnx
    from qcompile.models import minilm
    from qcompile.models.demo import default_onnx_path, ort_session

    onnx_path = default_onnx_path()
    feeds = minilm.tokenize(minilm.SENTENCES, 128)
    calib = minilm.tokenize(minilm.CALIB_SENTENCES, 128)
    n = len(minilm.SENTENCES)
    graph = load_onnx(onnx_path, shapes={k: (n, 128) for k in minilm.INPUT_NAMES})
    calib_graph_feeds = {k: v[: n] for k, v in calib.items()}
    if len(minilm.CALIB_SENTENCES) < n:  # calibrate at the evaluation batch shape: repeat the set
        reps = -(-n // len(minilm.CALIB_SENTENCES))
        calib_graph_feeds = {k: np.concatenate([v] * reps)[:n] for k, v in calib.items()}
    ref = ort_session(onnx_path, 2).run(None, feeds)[0]

    results: dict[str, dict[str, float | str]] = {}
    rows = [r for r in args.rows.split(",") if r]
    cols = [c for c in args.cols.split(",") if c]
    for row in rows:
        results[row] = {}
        for col in cols:
            start = time.perf_counter()
            got = qcompile_cell(graph, feeds, calib_graph_feeds, ROWS[row], COLUMNS[col])
            results[row][col] = round(cosine(ref, got), 5) if isinstance(got, np.ndarray) else got
            print(f"  {row:10s} {col:10s} {results[row][col]}  ({time.perf_counter() - start:.1f} s)", flush=True)
    ort = {} if args.skip_ort else {k: round(cosine(ref, v), 5) for k, v in ort_cells(onnx_path, feeds, calib).items()}
    print(_table(results, rows, cols, ort))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"qcompile": results, "onnxruntime": ort}, indent=2) + "\n")
    return 0


def _table(results, rows, cols, ort) -> str:
    lines = ["| recipe | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for row in rows:
        lines.append(f"| {row} | " + " | ".join(_fmt(results[row][c]) for c in cols) + " |")
    if ort:
        lines += ["", "| onnxruntime quantizer | cosine |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in ort.items()]
    return "\n".join(lines)


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


if __name__ == "__main__":
    sys.exit(main())
