#!/usr/bin/env python3
"""MiniLM W8A8 (int8 GEMMs, float nonlinearities): latency and accuracy vs onnxruntime.

One process: onnxruntime fp32, onnxruntime int8 dynamic (``quantize_dynamic``, per channel),
qcompile fp32, qcompile W8A8 / W4A8 dynamic per token, batch 1 seq 128. The machine may be
shared, so contenders are timed in interleaved rounds and each reports the lowest of its
per-round medians. Accuracy: mean / min embedding cosine vs the fp32 reference over the 32
sentences, each run at batch 1.

    python tools/bench_w8a8.py [--threads 2] [--rounds 5] [--repeats 20]
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
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--json", default="tools/results/bench_w8a8.json")
    args = p.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)

    import numpy as np
    from onnxruntime.quantization import QuantType, quantize_dynamic

    import qcompile
    from qcompile.models import minilm
    from qcompile.models.demo import default_onnx_path, ort_session
    from qcompile.timing import median_ms

    onnx_path = default_onnx_path()
    work = Path(tempfile.mkdtemp(prefix="qcw8a8-"))
    all_feeds = minilm.tokenize(minilm.SENTENCES, 128)
    samples = [{k: v[i:i + 1] for k, v in all_feeds.items()} for i in range(len(minilm.SENTENCES))]
    shapes = {n: (1, 128) for n in minilm.INPUT_NAMES}
    q_path = work / "minilm_int8_dynamic.onnx"
    quantize_dynamic(str(onnx_path), str(q_path), weight_type=QuantType.QInt8, per_channel=True)

    runners = {}
    s_fp = ort_session(onnx_path, args.threads)
    runners["onnxruntime fp32"] = lambda f: s_fp.run(None, f)[0]
    s_q = ort_session(q_path, args.threads)
    runners["onnxruntime int8 dynamic"] = lambda f: s_q.run(None, f)[0]
    compile_s = {}
    for label, kw in [("qcompile fp32", dict(bits=16)),
                      ("qcompile W8A8 dynamic", dict(bits=8, act_bits=8)),
                      ("qcompile W4A8 dynamic", dict(bits=4, act_bits=8))]:
        start = time.perf_counter()
        art = qcompile.compile(onnx_path, output=work / label.replace(" ", "_"), shapes=shapes,
                               num_threads=args.threads, verify=False, **kw)
        compile_s[label] = round(time.perf_counter() - start, 1)
        model = art.load(num_threads=args.threads)
        runners[label] = lambda f, m=model: m(**f)

    ref = [runners["onnxruntime fp32"](f)[0] for f in samples]
    rows = []
    cos = {}
    for label, fn in runners.items():
        c = [float(np.dot(r, fn(f)[0]) / np.linalg.norm(r) / np.linalg.norm(fn(f)[0])) for r, f in zip(ref, samples)]
        cos[label] = (float(np.mean(c)), float(np.min(c)))
    best = {label: float("inf") for label in runners}
    one = samples[0]
    for _ in range(args.rounds):
        for label, fn in runners.items():
            best[label] = min(best[label], median_ms(lambda: fn(one), args.repeats))
    base, base_q = best["onnxruntime fp32"], best["onnxruntime int8 dynamic"]
    print(f"all-MiniLM-L6-v2 b1 s128, {args.threads} threads, best of {args.rounds} interleaved medians of {args.repeats}")
    print(f"{'contender':26s} {'ms':>8s} {'vs ort fp32':>12s} {'vs ort int8':>12s} {'cos mean':>9s} {'cos min':>9s}")
    for label in runners:
        ms = best[label]
        print(f"{label:26s} {ms:8.2f} {base / ms:11.2f}x {base_q / ms:11.2f}x {cos[label][0]:9.5f} {cos[label][1]:9.5f}")
        rows.append({"contender": label, "best_median_ms": ms, "cos_mean": cos[label][0], "cos_min": cos[label][1],
                     "compile_s": compile_s.get(label)})
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
