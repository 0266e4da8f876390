"""MatMulInteger (uint8 activations x constant int8 B, int32 out) through qcompile, scheduled
onto the int8 GEMM kernels vs the unscheduled ``relax.op.matmul`` lowering, and onnxruntime.

    python tools/matmul_integer_speed.py [--m 128 --k 384 --n 1536 --threads 2]

Prints one JSON line: median ms per contender (timed in separate blocks, qcompile.timing) and
whether every contender's output equals onnxruntime's.
"""

from __future__ import annotations

import argparse
import json
import os
from unittest import mock

import numpy as np


def _model(m, k, n, rng):
    from onnx import helper, numpy_helper

    a = rng.integers(0, 256, size=(m, k)).astype(np.uint8)
    b = rng.integers(-128, 128, size=(k, n)).astype(np.int8)
    node = helper.make_node("MatMulInteger", ["a", "b", "az"], ["y"])
    graph = helper.make_graph([node], "mmi", [helper.make_tensor_value_info("a", 2, a.shape)],
                              [helper.make_empty_tensor_value_info("y")],
                              [numpy_helper.from_array(b, "b"), numpy_helper.from_array(np.uint8(7), "az")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), a


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    for dim, default in (("m", 128), ("k", 384), ("n", 1536)):
        p.add_argument(f"--{dim}", type=int, default=default)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    import onnxruntime as ort
    import tvm

    import qcompile.backends.arm64  # noqa: F401  (import order of the backends package)
    from qcompile.backends import matmul_integer_gemm
    from qcompile.backends.llvm import build, host_target
    from qcompile.frontends.onnx_frontend import load_onnx
    from qcompile.timing import time_contenders

    model, a = _model(args.m, args.k, args.n, np.random.default_rng(0))
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    ref = sess.run(None, {"a": a})[0]
    graph, target, ta = load_onnx(model), host_target(args.threads), tvm.runtime.tensor(a)
    vm_sched = tvm.relax.VirtualMachine(build(graph, target), tvm.cpu())["main"]
    with mock.patch.object(matmul_integer_gemm, "lower_matmul_integer_gemm", lambda ctx, node: None):
        vm_plain = tvm.relax.VirtualMachine(build(graph, target), tvm.cpu())["main"]
    exact = {name: bool(np.array_equal(f(ta)[0].numpy(), ref))
             for name, f in (("scheduled", vm_sched), ("unscheduled", vm_plain))}
    times = time_contenders({"qcompile scheduled": lambda: vm_sched(ta), "qcompile unscheduled": lambda: vm_plain(ta),
                             "onnxruntime": lambda: sess.run(None, {"a": a})}, repeats=20, rounds=3)
    gop = 2 * args.m * args.k * args.n / 1e9
    print(json.dumps({"shape": [args.m, args.k, args.n], "threads": args.threads, "exact_vs_onnxruntime": exact,
                      "median_ms": {k: round(v, 3) for k, v in times.items()},
                      "gop_per_s": {k: round(gop / (v / 1e3), 1) for k, v in times.items()}}))


if __name__ == "__main__":
    main()
