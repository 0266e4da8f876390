#!/usr/bin/env python3
"""Per-GEMM benchmark of qcompile's scheduled kernels vs numpy and onnxruntime, one process.

For each MiniLM GEMM shape (batch 1, seq 128) prints ms and GFLOP/s of: our fp32 linear (with
bias), our fused 4-bit qlinear (group 32, symmetric and asymmetric, with bias), numpy
``np.matmul`` and onnxruntime MatMul fp32 (one-node model, constant B, intra_op_num_threads =
--threads). ``--extra`` adds g128 / 3-bit / 8-bit qlinear, m=1 GEMV rows and the attention
batch matmuls. GFLOP/s counts 2*m*k*n (the bias add is not counted).

Timing: every contender is a Python callable timed with perf_counter. The machine is shared
and noisy (periods where a vCPU runs at half speed), and TVM's and onnxruntime's pool threads
spin after a call, stealing cores from each other; so contenders run round-robin, --rounds
rounds of --repeats calls each with a pause between contenders, and a cell is the best
per-round median.

    python tools/bench_kernels.py [--threads 2] [--repeats 50] [--rounds 5] [--extra]
"""

from __future__ import annotations

import argparse
import os

from qcompile.timing import median_ms

GEMMS = [(128, 384, 384), (128, 384, 1536), (128, 1536, 384)]
EXTRA_GEMMS = [(1, 384, 1536), (1, 4096, 4096)]
BMMS = [(12, 128, 32, 128), (12, 128, 128, 32)]


def _median_s(fn, repeats: int) -> float:
    return median_ms(fn, repeats, warmup=3) / 1e3


def _cell(seconds: float, flop: float) -> str:
    return f"{seconds * 1e3:8.4f}/{flop / seconds / 1e9:6.1f}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--extra", action="store_true")
    args = p.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", str(args.threads))

    import numpy as np
    import tvm

    from qcompile.backends import kernels

    target = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(),
                                "num-cores": args.threads})
    rng = np.random.default_rng(0)
    qvariants = [("q4g32sym", 4, 32, True), ("q4g32asym", 4, 32, False)]
    if args.extra:
        qvariants += [("q4g128asym", 4, 128, False), ("q3g32asym", 3, 32, False),
                      ("q8g0sym", 8, 0, True)]
    cols = ["linear"] + [q[0] for q in qvariants] + ["numpy", "ort"]
    print(f"target {target}, threads {args.threads}, best of {args.rounds} medians of "
          f"{args.repeats}; cells: ms/GFLOP/s")
    print(f"{'m x k x n':>14} " + " ".join(f"{c:>15}" for c in cols))
    for m, k, n in GEMMS + (EXTRA_GEMMS if args.extra else []):
        contenders = _gemm_contenders(m, k, n, target, args.threads, rng, qvariants)
        best = _best_round_medians(contenders, args.repeats, args.rounds)
        flop = 2.0 * m * k * n
        print(f"{f'{m}x{k}x{n}':>14} " + " ".join(_cell(best[c], flop) for c in cols), flush=True)
    if args.extra:
        for bt, m, k, n in BMMS:
            a = rng.standard_normal((bt, m, k), dtype=np.float32)
            b = rng.standard_normal((bt, k, n), dtype=np.float32)
            ours = _tvm_callable(kernels.batch_matmul_kernel(bt, m, k, n, target),
                                 [a, b, np.zeros((bt, m, n), np.float32)], target)
            best = _best_round_medians({"ours": ours, "numpy": lambda: np.matmul(a, b)},
                                       args.repeats, args.rounds)
            flop = 2.0 * bt * m * k * n
            print(f"batch_matmul {bt}x{m}x{k}x{n}: ours {_cell(best['ours'], flop)}  "
                  f"numpy {_cell(best['numpy'], flop)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
