#!/usr/bin/env python3
"""VNNI and LUT (T-MAC style) GEMVs vs qcompile's dequant GEMV vs onnxruntime MatMulNBits vs fp32, m = 1.

One process, one run, on the host. Every contender is timed in its own block (warm-up, then
the median of --repeats calls; --rounds blocks per contender, spread over the run, best block
median kept: the machine is shared). Helpers (memory bandwidth, onnxruntime sessions, TVM
callables) are tools/bench.py's.

Contenders per shape (n = out, k = in; x[1, k] @ W):
* qcompile VNNI W4 / W2 g128 (asymmetric, zero points; int8 activations per block of 128,
  row-interleaved vpdpbusd): backends/gemv_vnni.py;
* qcompile LUT W4 / W2 g128 (asymmetric, zero points): backends/lut_kernels.py;
* qcompile dequant W4 / W2 g128 (f32 activations): backends/gemv_kernels.py through
  kernels.qlinear_kernel;
* onnxruntime MatMulNBits 4-bit block 128 accuracy_level 4 (int8 activations);
* onnxruntime MatMul fp32 and qcompile fp32 GEMV.

GB/s counts each contender's weight bytes (codes + scales + zeros/offsets); "of BW" divides by
the measured read bandwidth (numpy sum over 1 GiB, --threads threads). 4096x4096 at <= 4 bits
fits in L3, so repeated calls can exceed the DRAM figure. The VNNI and LUT rows also report
the relative RMS error against the exact f32 GEMV of the same quantized weights (activation
or table rounding).

    python tools/bench_lut.py [--threads 2] [--repeats 50] [--rounds 2] [--shapes 4096x4096,...]

Writes tools/results/bench_lut.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from bench import _matmul_model, _ort_nbits, _ort_session, _tvm_callable, measure_bandwidth

from qcompile.timing import time_contenders

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
GROUP = 128
REFERENCE = "onnxruntime MatMulNBits q4 b128 acc4"
FP32 = "onnxruntime fp32"


def _weights(rng, n, k, bits):
    import numpy as np

    from qcompile import quant

    packed = quant.pack_codes(rng.integers(0, 1 << bits, (n, k), dtype=np.uint8), bits)
    scales = (rng.random((n, k // GROUP), dtype=np.float32) * 0.01).astype(np.float32)
    zeros = rng.integers(0, 1 << bits, (n, k // GROUP)).astype(np.float32)
    return packed, scales, zeros


def _repacked_contender(kind, x, n, k, bits, weights, target):
    """(callable, weight bytes, relative RMS error vs the exact f32 GEMV) of the "vnni" or "lut"
    GEMV, whose weights are repacked from qcompile's QLinear layout."""
    import numpy as np

    from qcompile import quant
    from qcompile.backends.lut_lowering import repack_m1_weights

    packed, scales, zeros = weights
    arrays, builders, builder = repack_m1_weights(kind, packed, scales, zeros, bits, GROUP, k, target)
    func = getattr(builders, builder)(k, n, bits, GROUP, False, False, target)
    arrays = [x, *arrays, np.zeros((1, n), np.float32)]
    call = _tvm_callable(func, arrays, target)
    got = _tvm_output(func, arrays, target)
    exact = x.astype(np.float64) @ quant.dequantize_weight(packed, scales, zeros, bits, GROUP, k)
    err = np.sqrt(np.mean((got - exact) ** 2)) / np.sqrt(np.mean(exact ** 2))
    return call, sum(a.nbytes for a in arrays[1:-1]), float(err)


def _unsupported(kind, k, n, bits, target) -> str | None:
    from qcompile.backends import gemv_vnni, lut_kernels

    fits = gemv_vnni.vnni_supported if kind == "vnni" else lut_kernels.lut_supported
    return fits(k, n, bits, GROUP, target)


def _tvm_output(func, arrays, target):
    """Run ``func`` once on ``arrays`` (last = output) and return the output."""
    import tvm

    mod = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
    args = [tvm.runtime.tensor(a) for a in arrays]
    mod.mod["main"](*args)
    return args[-1].numpy()


def contenders(n, k, target, threads):
    """label -> callable, label -> weight bytes, label -> relative error (VNNI and LUT rows only)."""
    import numpy as np

    from qcompile.backends import kernels

    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, k), dtype=np.float32)
    out = np.zeros((1, n), np.float32)
    calls, nbytes, errors = {}, {}, {}
    for bits in (4, 2):
        weights = _weights(rng, n, k, bits)
        for kind in ("vnni", "lut"):
            if _unsupported(kind, k, n, bits, target):
                continue
            label = f"qcompile {kind.upper()} W{bits} g{GROUP}"
            calls[label], nbytes[label], errors[label] = _repacked_contender(kind, x, n, k, bits, weights, target)
        func = kernels.qlinear_kernel(1, k, n, bits, GROUP, False, False, target)
        label = f"qcompile dequant W{bits} g{GROUP}"
        calls[label] = _tvm_callable(func, [x, *weights, out], target)
        nbytes[label] = sum(a.nbytes for a in weights)
    w = (rng.standard_normal((k, n), dtype=np.float32) * 0.02).astype(np.float32)
    model = _matmul_model(w, 1)
    fp32_blob = model.SerializeToString()  # before _ort_nbits, which rewrites the model in place
    for label, blob, size in [(FP32, fp32_blob, w.nbytes),
                              (REFERENCE, _ort_nbits(model), k * n // 2 + 4 * n * (k // 128))]:
        sess = _ort_session(blob, threads)
        calls[label] = (lambda s: lambda: s.run(None, {"a": x}))(sess)
        nbytes[label] = size
    calls["qcompile fp32"] = _tvm_callable(kernels.linear_kernel(1, k, n, False, target), [x, w, out], target)
    nbytes["qcompile fp32"] = w.nbytes
    return calls, nbytes, errors


def bench_shape(n, k, args, target, bandwidth) -> list[dict]:
    calls, nbytes, errors = contenders(n, k, target, args.threads)
    best = time_contenders(calls, args.repeats, args.rounds)
    rows = []
    for label, ms in best.items():
        gbs = nbytes[label] / (ms * 1e-3) / 1e9
        rows.append({"shape": f"{n}x{k}", "n": n, "k": k, "contender": label, "ms": ms,
                     "weight_bytes": nbytes[label], "gbs": gbs,
                     "fraction_of_bandwidth": gbs / bandwidth["read_gbs"],
                     "speedup_vs_ort_nbits4": best[REFERENCE] / ms, "speedup_vs_ort_fp32": best[FP32] / ms,
                     "relative_rms_error": errors.get(label)})
    _print(rows, bandwidth)
    return rows


def _print(rows, bandwidth):
    print(f"\nGEMV {rows[0]['shape']} (n x k, m=1); read bandwidth {bandwidth['read_gbs']:.1f} GB/s")
    head = f"{'ms':>8s} {'GB/s':>7s} {'of BW':>6s} {'vs ORT q4':>9s} {'vs fp32':>8s} {'rel err':>8s}"
    print(f"  {'contender':36s} {head}")
    for r in rows:
        err = "" if r["relative_rms_error"] is None else f"{r['relative_rms_error']:8.1e}"
        print(f"  {r['contender']:36s} {r['ms']:8.3f} {r['gbs']:7.1f} {r['fraction_of_bandwidth']:6.2f} "
              f"{r['speedup_vs_ort_nbits4']:8.2f}x {r['speedup_vs_ort_fp32']:7.2f}x {err}", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES))
    p.add_argument("--json", default="tools/results/bench_lut.json")
    args = p.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",") if s]
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    import tvm

    from qcompile.backends.runtime import set_num_threads
    from qcompile.schedules.lut import lut_isa

    set_num_threads(args.threads)
    target = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(),
                                "num-cores": args.threads})
    result = {"threads": args.threads, "repeats": args.repeats, "rounds": args.rounds,
              "lut_isa": lut_isa(target).name, "load_average_start": os.getloadavg()}
    result["bandwidth"] = bw = measure_bandwidth(args.threads)
    print(f"read bandwidth (numpy sum, 1 GiB): {bw['gbs_1_thread']:.1f} GB/s 1 thread, "
          f"{bw['read_gbs']:.1f} GB/s {args.threads} threads; load average {result['load_average_start']}; "
          f"LUT ISA {result['lut_isa']}")
    result["gemv"] = [row for n, k in shapes for row in bench_shape(n, k, args, target, bw)]
    result["load_average_end"] = os.getloadavg()
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
