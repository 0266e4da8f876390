#!/usr/bin/env python3
"""MiniLM accuracy sweep: mean embedding cosine vs fp32 for qcompile's quantization
recipes, beside onnxruntime's own quantizers, on the same 32 held-out sentences.

Rows (:data:`ROWS`, with :data:`ROW_LABELS`): W8A8 and W4A8 (int8 per-token dynamic
activations, symmetric per-channel weights), W4A4 (4-bit per-token activation codes), W4A16 g128 and W3A16 g128 (weight-only,
asymmetric groups of 128 with clip search), mixed precision at a 2.5-bit code average
(per-Linear widths from {2, 3, 4, 8}, g128), W2A16 g128 whose leading outlier groups
take 4 bits (--outlier-bits 4), and W2A16 g128, the 2.0-bit average (mixed precision at a
2.0 budget over {2, 3, 4, 8} can only choose 2 bits everywhere; 2-bit grids have float
zero points, refit after GPTQ: passes.rtn, passes.gptq). Columns (:data:`COLUMNS`): RTN,
+reorder, +hadamard, +both (function-preserving passes before RTN), then GPTQ alone and
after those passes, with the defaults a user gets from ``--method gptq`` (act-order,
dampening: passes.gptq), and GPTAQ +hadamard (``--method gptaq``: GPTQ in graph order with
error feedback, passes.gptaq; weight-only rows).
Embedding tables are 8-bit in every row. Every qcompile figure is the reference
interpreter's output of the quantized graph (what the compiled code reproduces; see the
artifact's compiled_vs_fake_quant figure). Calibration (reorder, GPTQ, outlier split,
mixed precision) uses all of minilm.CALIB_SENTENCES, disjoint from the evaluation sentences.
Besides the cosine, the JSON records each cell's average code bits over the Linears.

Sentences are tokenized to ``--seq-len`` 32 (the longest of either set is 26 tokens; mean
pooling and attention masks ignore padding, so 128 only adds padded rows and time).

    python tools/accuracy_sweep.py [--rows W4A16g128,W3A16g128] [--cols rtn,gptq] [--skip-ort]
    python tools/accuracy_sweep.py --merge part1.json part2.json   # one table from several runs
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
    "W4A4": dict(bits=4, act_bits=4),
    "W4A16g128": dict(bits=4, group_size=128),
    "W3A16g128": dict(bits=3, group_size=128),
    "mixed2.5": dict(bits=2.5, group_size=128),
    "W2A16g128+o4": dict(bits=2, group_size=128, outlier_bits=4),
    "W2A16g128": dict(bits=2, group_size=128),
    "W8A8int": dict(bits=8, act_bits=8, integer_only=True),
}
ROW_LABELS = {
    "W8A8": "W8A8 (int8 dynamic per-token acts, W8 per-channel sym)",
    "W4A8": "W4A8 (int8 dynamic per-token acts, W4 per-channel sym)",
    "W4A4": "W4A4 (4-bit dynamic per-token acts, W4 per-channel sym)",
    "W4A16g128": "W4A16 g128 (weight-only, asym)",
    "W3A16g128": "W3A16 g128 (weight-only, asym)",
    "mixed2.5": "mixed {2,3,4,8} at 2.5-bit avg, g128",
    "W2A16g128+o4": "W2A16 g128, outlier groups 4-bit",
    "W2A16g128": "W2A16 g128 (2.0-bit average)",
    "W8A8int": "W8A8 integer-only (static scales, per-row power-of-two codes at linear inputs)",
}
COLUMNS = {
    "rtn": dict(),
    "+reorder": dict(passes=("reorder",)),
    "+hadamard": dict(passes=("hadamard",)),
    "+both": dict(passes=("reorder", "hadamard")),
    "gptq": dict(method="gptq"),
    "gptq+hadamard": dict(method="gptq", passes=("hadamard",)),
    "gptq+both": dict(method="gptq", passes=("reorder", "hadamard")),
    "gptaq+hadamard": dict(method="gptaq", passes=("hadamard",)),
    "gptaq+both": dict(method="gptaq", passes=("reorder", "hadamard")),
}


def cosine(ref: np.ndarray, got: np.ndarray) -> float:
    return float(np.mean(np.sum(ref * got, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))))


def qcompile_cell(graph, feeds, calib, row: dict, col: dict) -> float | str:
    from qcompile.config import CompileConfig
    from qcompile.pipeline import optimize as _optimize
    from qcompile.errors import QCompileError
    from qcompile.interpreter import run

    if col.get("method") == "gptaq" and row.get("act_bits", 16) != 16:
        return "n/a"  # GPTAQ is weight-only
    try:
        config = replace(CompileConfig(embedding_bits=8), **row, **col)
        _, quantized = _optimize(graph, config, calibration=calib)
    except QCompileError as err:
        return f"error: {err}"
    return run(quantized, feeds)[graph.outputs[0]], average_bits(quantized)


def average_bits(graph) -> float:
    """Code bits per Linear weight element, averaged over the quantized Linears."""
    linears = [e for e in graph.metadata.get("quant_recipe", []) if e["op"] != "QGather"]
    elems = [e["shape"][0] * e["shape"][1] for e in linears]
    return round(sum(e["bits"] * n for e, n in zip(linears, elems)) / max(sum(elems), 1), 4)


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
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--json", default="tools/results/accuracy_sweep.json")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="merge the results of earlier runs into --json")
    args = p.parse_args()
    if args.merge:
        return _merge(args.merge, Path(args.json))

    from qcompile.frontends.onnx_frontend import load_onnx
    from qcompile.models import minilm
    from qcompile.models.demo import default_onnx_path, ort_session

    onnx_path = default_onnx_path()
    feeds = minilm.tokenize(minilm.SENTENCES, args.seq_len)
    calib = minilm.tokenize(minilm.CALIB_SENTENCES, args.seq_len)
    if max(feeds["attention_mask"].sum(1).max(), calib["attention_mask"].sum(1).max()) >= args.seq_len:
        print(f"warning: some sentences are truncated to {args.seq_len} tokens", file=sys.stderr)
    n = len(minilm.SENTENCES)
    graph = load_onnx(onnx_path, shapes={k: (n, args.seq_len) for k in minilm.INPUT_NAMES})
    # calibrate at the evaluation batch shape: all calibration sentences, repeated up to a
    # multiple of the batch (the pipeline splits them into batches)
    whole = -(-len(minilm.CALIB_SENTENCES) // n) * n
    calib_graph_feeds = {k: np.resize(v, (whole,) + v.shape[1:]) for k, v in calib.items()}
    ref = ort_session(onnx_path, 2).run(None, feeds)[0]

    ort = {} if args.skip_ort else {k: round(cosine(ref, v), 5) for k, v in ort_cells(onnx_path, feeds, calib).items()}
    results: dict[str, dict[str, float | str]] = {}
    avg_bits: dict[str, dict[str, float]] = {}
    rows = [r for r in args.rows.split(",") if r]
    cols = [c for c in args.cols.split(",") if c]
    for row in rows:
        results[row], avg_bits[row] = {}, {}
        for col in cols:
            start = time.perf_counter()
            got = qcompile_cell(graph, feeds, calib_graph_feeds, ROWS[row], COLUMNS[col])
            if isinstance(got, tuple):
                results[row][col], avg_bits[row][col] = round(cosine(ref, got[0]), 5), got[1]
            else:
                results[row][col] = got
            print(f"  {row:12s} {col:14s} {results[row][col]}  avg bits {avg_bits[row].get(col)}"
                  f"  ({time.perf_counter() - start:.1f} s)", flush=True)
            _save(Path(args.json), rows, cols, results, avg_bits, ort)  # partial results survive a stop
    print(_table(results, rows, cols, ort))
    _save(Path(args.json), rows, cols, results, avg_bits, ort)
    return 0


def _save(out: Path, rows, cols, results, avg_bits, ort) -> None:
    data = {"rows": {r: ROW_LABELS[r] for r in rows}, "columns": {c: _col_label(c) for c in cols},
            "qcompile": results, "average_bits": avg_bits, "onnxruntime": ort}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")


def _merge(paths, out: Path) -> int:
    data = {"rows": {}, "columns": {}, "qcompile": {}, "average_bits": {}, "onnxruntime": {}}
    for path in paths:
        part = json.loads(Path(path).read_text())
        for key in data:
            for name, value in part.get(key, {}).items():
                data[key][name] = {**data[key].get(name, {}), **value} if isinstance(value, dict) else value
    cols = [c for c in COLUMNS if c in data["columns"]]
    rows = [r for r in ROWS if r in data["qcompile"]]
    results = {r: {c: data["qcompile"][r].get(c, "not run") for c in cols} for r in rows}
    print(_table(results, rows, cols, data["onnxruntime"]))
    out.write_text(json.dumps(data, indent=2) + "\n")
    return 0


def _table(results, rows, cols, ort) -> str:
    lines = ["| recipe | " + " | ".join(_col_label(c) for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for row in rows:
        lines.append(f"| {ROW_LABELS[row]} | " + " | ".join(_fmt(results[row][c]) for c in cols) + " |")
    if ort:
        lines += ["", "| onnxruntime quantizer | cosine |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in ort.items()]
    return "\n".join(lines)


def _col_label(col: str) -> str:
    """'gptq+both' -> 'GPTQ +reorder +hadamard' (what the column runs)."""
    spec = COLUMNS[col]
    return " ".join([spec.get("method", "rtn").upper()] + [f"+{p}" for p in spec.get("passes", ())])


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


if __name__ == "__main__":
    sys.exit(main())
