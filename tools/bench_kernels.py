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
import time

GEMMS = [(128, 384, 384), (128, 384, 1536), (128, 1536, 384)]
EXTRA_GEMMS = [(1, 384, 1536), (1, 4096, 4096)]
BMMS = [(12, 128, 32, 128), (12, 128, 128, 32)]


def _median_s(fn, repeats: int) -> float:
    import numpy as np

    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _best_round_medians(contenders: dict, repeats: int, rounds: int) -> dict:
    best = {label: float("inf") for label in contenders}
    for _ in range(rounds):
        for label, fn in contenders.items():
            time.sleep(0.05)  # let the previous contender's spinning pool threads go idle
            best[label] = min(best[label], _median_s(fn, repeats))
    return best


def _tvm_callable(func, arrays, target):
    import tvm

    mod = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
    fn, args = mod.mod["main"], [tvm.runtime.tensor(a) for a in arrays]
    return lambda: fn(*args)


def _ort_callable(a, b, threads: int):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])], "mm",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, list(a.shape))],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [a.shape[0], b.shape[1]])],
        [numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    # no spin-waiting after a run: spinning ORT workers starve OpenBLAS's and TVM's threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return lambda: sess.run(None, {"a": a})


def _qlinear_arrays(rng, x, n, bits, group, symmetric):
    import numpy as np

    from qcompile import quant

    m, k = x.shape
    groups = k // group if group else 1
    packed = quant.pack_codes(rng.integers(0, 1 << bits, (n, k), dtype=np.uint8), bits)
    scales = rng.random((n, groups), dtype=np.float32) * 0.01
    zeros = [] if symmetric else [rng.integers(0, 1 << bits, (n, groups)).astype(np.float32)]
    return [x, packed, scales, *zeros, rng.standard_normal(n, dtype=np.float32),
            np.zeros((m, n), np.float32)]


def _gemm_contenders(m, k, n, target, threads, rng, qvariants) -> dict:
    import numpy as np

    from qcompile.backends import kernels

    a = rng.standard_normal((m, k), dtype=np.float32)
    b = rng.standard_normal((k, n), dtype=np.float32)
    bias = rng.standard_normal(n, dtype=np.float32)
    out = {"linear": _tvm_callable(kernels.linear_kernel(m, k, n, True, target),
                                   [a, b, bias, np.zeros((m, n), np.float32)], target)}
    for label, bits, group, sym in qvariants:
        func = kernels.qlinear_kernel(m, k, n, bits, group, sym, True, target)
        out[label] = _tvm_callable(func, _qlinear_arrays(rng, a, n, bits, group, sym), target)
    out["numpy"] = lambda: np.matmul(a, b)
    out["ort"] = _ort_callable(a, b, threads)
    return out


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
