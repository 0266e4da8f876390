#!/usr/bin/env python3
"""MiniLM end-to-end latency: qcompile (fp32 and quantized) vs onnxruntime fp32 vs plain TVM.

One process, one run: every contender gets the same inputs (batch 1, seq 128, real
sentence) and the same thread count; medians after warm-up. Plain TVM is TVM's own
``from_onnx`` + ``tvm.compile`` with its default pipeline; since TVM cannot import the raw
export (broadcast_to ndim error), it is given qcompile's static-shape re-export of the same
float model (``to_onnx``). Writes JSON next to the printed table.

    python tools/bench_minilm.py [--threads 2] [--repeats 30] [--skip-plain-tvm]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--skip-plain-tvm", action="store_true")
    p.add_argument("--json", default="tools/results/bench_minilm.json")
    args = p.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)

    import qcompile
    from qcompile.models import minilm
    from qcompile.models.demo import default_onnx_path, median_ms, ort_session

    onnx_path = default_onnx_path()
    feeds = {k: v[:1] for k, v in minilm.tokenize(minilm.SENTENCES[:1], 128).items()}
    shapes = {n: (1, 128) for n in minilm.INPUT_NAMES}
    rows = []

    sess = ort_session(onnx_path, args.threads)
    rows.append(("onnxruntime fp32", median_ms(lambda: sess.run(None, feeds), args.repeats), None))
    work = Path(tempfile.mkdtemp(prefix="qcbench-"))
    for label, bits, group in [("qcompile fp32", 16, 0), ("qcompile W8 per-channel", 8, 0),
                               ("qcompile W4 g32", 4, 32), ("qcompile W4 g128", 4, 128)]:
        start = time.perf_counter()
        art = qcompile.compile(onnx_path, output=work / label.replace(" ", "_"), bits=bits, group_size=group,
                               shapes=shapes, num_threads=args.threads, eval_inputs=feeds)
        compile_s = time.perf_counter() - start
        model = art.load(num_threads=args.threads)
        rows.append((label, median_ms(lambda: model(**feeds), args.repeats), compile_s))
    if not args.skip_plain_tvm:
        rows.append(_plain_tvm(onnx_path, shapes, feeds, args))
    base = rows[0][1]
    print(f"all-MiniLM-L6-v2 batch 1 seq 128, {args.threads} threads, median of {args.repeats}")
    print(f"{'contender':28s} {'ms':>9s} {'vs ort fp32':>12s} {'compile s':>10s}")
    for label, ms, cs in rows:
        print(f"{label:28s} {ms:9.2f} {base / ms:11.2f}x {'' if cs is None else f'{cs:10.1f}'}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps([{"contender": l, "median_ms": m, "compile_s": c} for l, m, c in rows], indent=2) + "\n")
    return 0


def _plain_tvm(onnx_path, shapes, feeds, args):
    import tvm
    from tvm import relax

    from qcompile.frontends.onnx_frontend import load_onnx
    from qcompile.models.demo import median_ms
    from qcompile.onnx_export import to_onnx

    start = time.perf_counter()
    proto = to_onnx(load_onnx(onnx_path, shapes=shapes))
    mod = relax.frontend.onnx.from_onnx(proto, keep_params_in_input=False)
    ex = tvm.compile(mod, target=tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()}))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    compile_s = time.perf_counter() - start
    inputs = [tvm.runtime.tensor(feeds[n]) for n in ("input_ids", "attention_mask", "token_type_ids")]
    return ("plain TVM fp32 (default)", median_ms(lambda: vm["main"](*inputs), max(3, args.repeats // 10), 1), compile_s)


if __name__ == "__main__":
    sys.exit(main())
