#!/usr/bin/env python3
"""qcompile vs onnxruntime / PyTorch / plain TVM: MiniLM end to end and LLM-decode GEMVs.

One process, one run. Every contender is timed in its own block (warm-up, then the median
of --repeats calls; with --rounds R the block is repeated R times, spread over the run, and
the best block median is kept, because the 2-core machine is shared and noisy). Contenders
are never interleaved call by call: onnxruntime's and TVM's spinning pools steal cores from
each other. All use --threads threads.

Parts:

1. memory read bandwidth: numpy sum over a 1 GiB float32 array, one thread and --threads
   threads (each summing its slice); medians. The GEMV table reports GB/s counting each
   contender's weight bytes (packed codes + scales + zeros for quantized ones) and the
   fraction of the --threads figure. 4096x4096 4-bit weights (8 MB) fit in a 32 MB L3, so
   repeated calls can exceed the DRAM figure.
2. decode GEMV, x[1, k] @ W (W given as out x in = n x k, as PyTorch stores it):
   4096x4096, 11008x4096, 4096x11008. qcompile kernels (fp32 GEMV; dequant W8/W4/W2 with f32
   activations) vs onnxruntime MatMul fp32, onnxruntime int8 dynamic (quantize_dynamic),
   onnxruntime MatMulNBits 4-bit block 128 accuracy_level 4, torch eager.
   "VNNI W4/W2 g128": the row-interleaved int8-activation vpdpbusd GEMV (backends/gemv_vnni.py,
   the scheme of MatMulNBits accuracy_level 4; compiled models use it for batch-1 QLinears on
   AVX-512 VNNI hosts, --gemv-kernel auto); "LUT W4/W2 g128": the T-MAC style lookup-table
   GEMV (backends/lut_kernels.py; --gemv-kernel lut, or auto without VNNI).
3. all-MiniLM-L6-v2, seq 128, batch 1 and 8: qcompile fp32 / W8 / W4 g32 / W4 g128 / W2 g32
   (weight-only, f32 activations) vs onnxruntime fp32, onnxruntime int8 dynamic, onnxruntime
   MatMulNBits 4-bit, torch eager, plain TVM fp32 (TVM's from_onnx + default tvm.compile on
   qcompile's static re-export of the float model; TVM cannot import the raw export).

Writes tools/results/bench.json and tools/results/bench.png (matplotlib, the "bench" extra).

    python tools/bench.py [--threads 2] [--repeats 30] [--rounds 2] [--skip-minilm]
                          [--skip-gemv] [--skip-plain-tvm] [--batches 1,8] [--update]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from qcompile.timing import time_contenders

GEMV_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (n = out, k = in)
# fused dequant GEMV (backends/gemv_kernels.py): label, bits, group, symmetric
GEMV_QVARIANTS = [("W8", 8, 0, True), ("W4 g32", 4, 32, False), ("W4 g128", 4, 128, False),
                  ("W2 g128", 2, 128, False)]
# GEMVs on a compile-time repacked layout (backends/gemv_vnni.py, backends/lut_kernels.py):
# label, kernel, bits, group, symmetric
GEMV_REPACKED_VARIANTS = [("VNNI W4 g128", "vnni", 4, 128, False), ("VNNI W2 g128", "vnni", 2, 128, False),
                          ("LUT W4 g128", "lut", 4, 128, False), ("LUT W2 g128", "lut", 2, 128, False)]
MINILM_VARIANTS = [("qcompile fp32", 16, 0), ("qcompile W8", 8, 0), ("qcompile W4 g32", 4, 32),
                   ("qcompile W4 g128", 4, 128), ("qcompile W2 g32", 2, 32),
                   ("qcompile W8A8 dynamic", 8, 0, {"act_bits": 8}),
                   ("qcompile W8A8 static", 8, 0, {"act_bits": 8, "act_mode": "static"}),
                   ("qcompile W8A8 integer-only", 8, 0, {"act_bits": 8, "integer_only": True})]
# optional 4th element: more CompileConfig fields; static scales calibrate on CALIB_SENTENCES


# ---------------------------------------------------------------------------- bandwidth
def measure_bandwidth(threads: int, repeats: int = 7) -> dict:
    import numpy as np

    data = np.ones(1 << 28, np.float32)  # 1 GiB
    one = statistics.median(_timed(lambda: data.sum(), repeats))
    parts = np.array_split(data, threads)
    with ThreadPoolExecutor(threads) as pool:
        many = statistics.median(_timed(lambda: list(pool.map(np.sum, parts)), repeats))
    del data
    return {"bytes": 1 << 30, "gbs_1_thread": (1 << 30) / one / 1e9,
            f"gbs_{threads}_threads": (1 << 30) / many / 1e9, "read_gbs": (1 << 30) / many / 1e9}


def _timed(fn, repeats):
    fn()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


# ---------------------------------------------------------------------------- GEMV
def _tvm_callable(func, arrays, target):
    import tvm

    mod = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
    fn, args = mod.mod["main"], [tvm.runtime.tensor(a) for a in arrays]
    return lambda: fn(*args)


def _ort_session(model_bytes, threads):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])


def _matmul_model(w_kn, m):
    from onnx import TensorProto, helper, numpy_helper

    k, n = w_kn.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"], name="mm")], "mm",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [m, n])],
        [numpy_helper.from_array(w_kn, "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _ort_int8_dynamic(model, path: Path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    import onnx

    src, dst = path / "fp32.onnx", path / "int8.onnx"
    onnx.save(model, src)
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    return dst.read_bytes()


def _ort_nbits(model, block: int = 128, accuracy_level: int = 4):
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quant = MatMulNBitsQuantizer(model, bits=4, block_size=block, is_symmetric=True,
                                 accuracy_level=accuracy_level)
    quant.process()
    return quant.model.model.SerializeToString()


def gemv_contenders(n, k, target, threads, tmp: Path) -> tuple[dict, dict]:
    """label -> callable, label -> weight bytes read per call."""
    import numpy as np
    import torch

    from qcompile import quant
    from qcompile.backends import kernels

    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, k), dtype=np.float32)
    w = (rng.standard_normal((k, n), dtype=np.float32) * 0.02).astype(np.float32)
    out = np.zeros((1, n), np.float32)
    calls, nbytes = {}, {}
    calls["qcompile fp32"] = _tvm_callable(kernels.linear_kernel(1, k, n, False, target), [x, w, out], target)
    nbytes["qcompile fp32"] = w.nbytes
    for label, bits, group, sym in GEMV_QVARIANTS:
        groups = k // group if group else 1
        packed = quant.pack_codes(rng.integers(0, 1 << bits, (n, k), dtype=np.uint8), bits)
        scales = rng.random((n, groups), dtype=np.float32) * 0.01
        zeros = [] if sym else [rng.integers(0, 1 << bits, (n, groups)).astype(np.float32)]
        func = kernels.qlinear_kernel(1, k, n, bits, group, sym, False, target)
        calls[f"qcompile {label}"] = _tvm_callable(func, [x, packed, scales, *zeros, out], target)
        nbytes[f"qcompile {label}"] = packed.nbytes + scales.nbytes * (1 + len(zeros))
    _repacked_contenders(x, out, target, rng, calls, nbytes)
    model = _matmul_model(w, 1)
    for label, blob, size in [("onnxruntime fp32", model.SerializeToString(), w.nbytes),
                              ("onnxruntime int8 dynamic", _ort_int8_dynamic(model, tmp), k * n),
                              ("onnxruntime MatMulNBits q4 b128 acc4", _ort_nbits(model), k * n // 2 + 4 * n * (k // 128))]:
        sess = _ort_session(blob, threads)
        calls[label] = (lambda s: lambda: s.run(None, {"a": x}))(sess)
        nbytes[label] = size
    wt, xt = torch.from_numpy(np.ascontiguousarray(w.T)), torch.from_numpy(x)

    def torch_call():
        with torch.inference_mode():
            torch.nn.functional.linear(xt, wt)

    calls["torch eager fp32"], nbytes["torch eager fp32"] = torch_call, w.nbytes
    return calls, nbytes


def _repacked_contenders(x, out, target, rng, calls, nbytes) -> None:
    """Add the VNNI and LUT GEMV variants (GEMV_REPACKED_VARIANTS) that fit the target to
    ``calls`` / ``nbytes``: weight bytes are the repacked codes (same bytes as the packed
    codes) + per-group scales and offsets."""
    import numpy as np

    from qcompile import quant
    from qcompile.backends import gemv_vnni, lut_kernels
    from qcompile.backends.lut_lowering import repack_m1_weights

    k, n = x.shape[1], out.shape[1]
    for label, kind, bits, group, sym in GEMV_REPACKED_VARIANTS:
        fits = gemv_vnni.vnni_supported if kind == "vnni" else lut_kernels.lut_supported
        if fits(k, n, bits, group, target) is not None:
            continue
        packed = quant.pack_codes(rng.integers(0, 1 << bits, (n, k), dtype=np.uint8), bits)
        scales = rng.random((n, k // group), dtype=np.float32) * 0.01
        zeros = None if sym else rng.integers(0, 1 << bits, (n, k // group)).astype(np.float32)
        weights, builders, builder = repack_m1_weights(kind, packed, scales, zeros, bits, group, k, target)
        func = getattr(builders, builder)(k, n, bits, group, sym, False, target)
        calls[f"qcompile {label}"] = _tvm_callable(func, [x, *weights, out], target)
        nbytes[f"qcompile {label}"] = sum(a.nbytes for a in weights)


def bench_gemv(args, target, bandwidth) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="qcbench-") as tmp:
        for n, k in GEMV_SHAPES:
            calls, nbytes = gemv_contenders(n, k, target, args.threads, Path(tmp))
            best = time_contenders(calls, args.repeats, args.rounds)
            ref = best["onnxruntime MatMulNBits q4 b128 acc4"]
            for label, ms in best.items():
                gbs = nbytes[label] / (ms * 1e-3) / 1e9
                rows.append({"shape": f"{n}x{k}", "n": n, "k": k, "contender": label, "ms": ms,
                             "weight_bytes": nbytes[label], "gbs": gbs,
                             "fraction_of_bandwidth": gbs / bandwidth["read_gbs"],
                             "speedup_vs_ort_nbits4": ref / ms})
            _print_gemv(rows[-len(best):], bandwidth)
    return rows


def _print_gemv(rows, bandwidth):
    print(f"\nGEMV {rows[0]['shape']} (n x k, m=1); bandwidth {bandwidth['read_gbs']:.1f} GB/s")
    print(f"  {'contender':40s} {'ms':>8s} {'GB/s':>7s} {'of BW':>6s} {'vs ORT q4':>9s}")
    for r in rows:
        print(f"  {r['contender']:40s} {r['ms']:8.3f} {r['gbs']:7.1f} {r['fraction_of_bandwidth']:6.2f} "
              f"{r['speedup_vs_ort_nbits4']:8.2f}x", flush=True)


# ---------------------------------------------------------------------------- MiniLM
def _calibration(batch: int) -> dict:
    """Calibration inputs of the static-scale variants: 16 held-out sentences, in batches of ``batch``."""
    from qcompile.models import minilm

    return minilm.tokenize(minilm.CALIB_SENTENCES[:16 // batch * batch], 128)


def minilm_contenders(batch, args, work: Path) -> dict:
    import numpy as np
    import onnx
    import torch

    import qcompile
    from qcompile.models import minilm
    from qcompile.models.demo import default_onnx_path

    onnx_path = default_onnx_path()
    sentences = (minilm.SENTENCES * batch)[:batch]
    feeds = minilm.tokenize(sentences, 128)
    shapes = {name: (batch, 128) for name in minilm.INPUT_NAMES}
    calls, compile_s = {}, {}
    for label, bits, group, *extra in MINILM_VARIANTS:
        options = extra[0] if extra else {}
        static = options.get("act_mode") == "static" or options.get("integer_only")
        start = time.perf_counter()
        art = qcompile.compile(onnx_path, output=work / f"{label.replace(' ', '_')}_b{batch}", bits=bits,
                               group_size=group, shapes=shapes, num_threads=args.threads, verify=False,
                               calib_inputs=_calibration(batch) if static else None, **options)
        compile_s[label] = time.perf_counter() - start
        model = art.load(num_threads=args.threads)
        calls[label] = (lambda mdl: lambda: mdl(**feeds))(model)
    proto = onnx.load(str(onnx_path))
    for label, blob in [("onnxruntime fp32", proto.SerializeToString()),
                        ("onnxruntime int8 dynamic", _ort_int8_dynamic(proto, work)),
                        ("onnxruntime MatMulNBits q4 b128 acc4", _try(lambda: _ort_nbits(proto)))]:
        if blob is not None:
            sess = _ort_session(blob, args.threads)
            calls[label] = (lambda s: lambda: s.run(None, feeds))(sess)
    torch.set_num_threads(args.threads)
    encoder = minilm.load_torch_model()
    tfeeds = [torch.from_numpy(feeds[n]) for n in minilm.INPUT_NAMES]

    def torch_call():
        with torch.inference_mode():
            encoder(*tfeeds)

    calls["torch eager fp32"] = torch_call
    if not args.skip_plain_tvm:
        start = time.perf_counter()
        plain = _try(lambda: _plain_tvm(onnx_path, shapes, feeds))
        if plain is not None:
            calls["plain TVM fp32 (default)"] = plain
            compile_s["plain TVM fp32 (default)"] = time.perf_counter() - start
    del np
    return calls, compile_s


def _try(fn):
    try:
        return fn()
    except Exception as err:  # pylint: disable=broad-except  (a contender that cannot be built is left out)
        print(f"  (skipped: {type(err).__name__}: {err})", file=sys.stderr)
        return None


def _plain_tvm(onnx_path, shapes, feeds):
    import tvm
    from tvm import relax
    from tvm.relax.frontend import onnx as relax_onnx

    from qcompile.frontends.onnx_frontend import load_onnx
    from qcompile.onnx_export import to_onnx

    proto = to_onnx(load_onnx(onnx_path, shapes=shapes))
    mod = relax_onnx.from_onnx(proto, keep_params_in_input=False)
    ex = tvm.compile(mod, target=tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()}))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    inputs = [tvm.runtime.tensor(feeds[n]) for n in ("input_ids", "attention_mask", "token_type_ids")]
    return lambda: vm["main"](*inputs)


def bench_minilm(args) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="qcbench-minilm-") as tmp:
        for batch in args.batches:
            calls, compile_s = minilm_contenders(batch, args, Path(tmp))
            slow = {"plain TVM fp32 (default)"}
            best = time_contenders({k: v for k, v in calls.items() if k not in slow}, args.repeats, args.rounds)
            best.update(time_contenders({k: v for k, v in calls.items() if k in slow}, 3, 1))
            del calls
            base = best["onnxruntime fp32"]
            int8 = best.get("onnxruntime int8 dynamic")
            print(f"\nall-MiniLM-L6-v2 batch {batch} seq 128, {args.threads} threads")
            print(f"  {'contender':40s} {'ms':>9s} {'vs ORT fp32':>11s} {'vs ORT int8':>11s} {'compile s':>9s}")
            for label, ms in best.items():
                row = {"batch": batch, "contender": label, "ms": ms, "speedup_vs_ort_fp32": base / ms,
                       "speedup_vs_ort_int8": (int8 / ms) if int8 else None, "compile_s": compile_s.get(label)}
                rows.append(row)
                cs = "" if row["compile_s"] is None else f"{row['compile_s']:9.1f}"
                print(f"  {label:40s} {ms:9.2f} {base / ms:10.2f}x {(int8 or 0) / ms:10.2f}x {cs}", flush=True)
    return rows


# ---------------------------------------------------------------------------- output
def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("gemv", s) for s in dict.fromkeys(r["shape"] for r in result.get("gemv", []))]
    panels += [("minilm", b) for b in dict.fromkeys(r["batch"] for r in result.get("minilm", []))]
    if not panels:
        return
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 3.2 * len(panels)), squeeze=False)
    for ax, (kind, key) in zip(axes[:, 0], panels):
        if kind == "gemv":
            rows = [r for r in result["gemv"] if r["shape"] == key]
            values, title = [r["gbs"] for r in rows], f"GEMV {key} (n x k, m=1): GB/s of weight bytes (higher is better)"
            ax.axvline(result["bandwidth"]["read_gbs"], color="k", ls="--", lw=1, label="numpy read bandwidth")
            ax.legend(loc="lower right", fontsize=7)
        else:
            rows = [r for r in result["minilm"] if r["batch"] == key]
            values, title = [r["ms"] for r in rows], f"all-MiniLM-L6-v2 batch {key} seq 128: ms, log scale (lower is better)"
            ax.set_xscale("log")
        colors = ["tab:blue" if r["contender"].startswith("qcompile") else "tab:gray" for r in rows]
        ax.barh([r["contender"] for r in rows], values, color=colors)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--skip-gemv", action="store_true")
    p.add_argument("--skip-minilm", action="store_true")
    p.add_argument("--skip-plain-tvm", action="store_true")
    p.add_argument("--json", default="tools/results/bench.json")
    p.add_argument("--png", default="tools/results/bench.png")
    p.add_argument("--update", action="store_true",
                   help="keep the parts of an existing --json that this run skips (then re-plot)")
    args = p.parse_args()
    args.batches = [int(b) for b in args.batches.split(",") if b]
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    import tvm

    from qcompile.backends.runtime import set_num_threads

    set_num_threads(args.threads)
    target = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(),
                                "num-cores": args.threads})
    out = Path(args.json)
    result = json.loads(out.read_text()) if args.update and out.exists() else {}
    result.update({"threads": args.threads, "repeats": args.repeats, "rounds": args.rounds,
                   "load_average_start": os.getloadavg()})
    result["bandwidth"] = measure_bandwidth(args.threads)
    bw = result["bandwidth"]
    print(f"read bandwidth (numpy sum, 1 GiB): {bw['gbs_1_thread']:.1f} GB/s 1 thread, "
          f"{bw['read_gbs']:.1f} GB/s {args.threads} threads; load average {result['load_average_start']}")
    if not args.skip_gemv:
        result["gemv"] = bench_gemv(args, target, bw)
    if not args.skip_minilm:
        result["minilm"] = bench_minilm(args)
    result["load_average_end"] = os.getloadavg()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, Path(args.png))
    print(f"\nwrote {out} and {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
