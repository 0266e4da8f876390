"""Command line: parses arguments, then calls the Python API. Nothing else lives here.

User errors (QCompileError) print one line ``qcompile: error: ...`` and exit with 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .config import ARM64_CPUS, ARM64_DEFAULT_CPU, CompileConfig, parse_shape
from .errors import InputError, QCompileError

__all__ = ["main"]

EXAMPLES = """\
examples:
  qcompile model.onnx --target llvm --bits 4 --group-size 32 -o out/
  qcompile model.onnx --target arm64 --cpu neoverse-n2 --bits 4 --group-size 32 -o out_arm/
  qcompile model.onnx --bits 16 --shape input_ids=1x128 --shape attention_mask=1x128 -o out_fp32/
  qcompile run out/ --inputs in.npz --output result.npz
  qcompile inspect out/
  qcompile model.onnx --method gptq --bits 2.5 --group-size 128 --calib calib.npz -o out/
  qcompile compare model.onnx out/ --inputs in.npz   # per-layer SQNR / cosine
  qcompile demo            # the embedded default model (all-MiniLM-L6-v2), end to end
  qcompile tune model.onnx --trials 32 --db tuned/ --bits 16 --shape x=1x128   # MetaSchedule
  qcompile model.onnx --bits 16 --shape x=1x128 --db tuned/ -o out/             # use its records
  qcompile tune model.onnx --trials 64 --db tuned/ --rpc tracker:9190 --key rk3588  # measure on boards
"""
SUBCOMMANDS = ("compile", "run", "inspect", "demo", "compare", "tune")


def _compile_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qcompile", description="Compile a (quantized) neural network to a deployable artifact.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="ONNX model file")
    p.add_argument("-o", "--output", required=True, help="artifact directory to write")
    p.add_argument("--target", default="llvm",
                   help="code generation target: llvm = this host (default), arm64 = aarch64 Linux (run here under qemu)")
    p.add_argument("--cpu", default=None,
                   help=f"CPU of --target arm64: {', '.join(ARM64_CPUS)} (default {ARM64_DEFAULT_CPU})")
    p.add_argument("--bits", type=_bits_option, default=4,
                   help="weight bits: 2, 3, 4, 8, or 16 for no quantization (default 4); a fractional value "
                        "(e.g. 2.5) is an average: per-layer widths from {2,3,4,8} by mixed precision")
    p.add_argument("--no-quant", action="store_true", help="same as --bits 16")
    p.add_argument("--group-size", type=int, default=0, help="input channels per scale; 0 = per output channel")
    p.add_argument("--symmetric", action="store_true", help="symmetric weight quantization (default asymmetric)")
    p.add_argument("--embedding-bits", default="8", help="bits of quantized embedding tables: 8, 4 or none")
    p.add_argument("--shape", action="append", default=[], metavar="NAME=D1xD2",
                   help="bind a dynamic input shape, e.g. input_ids=1x128 (repeatable)")
    p.add_argument("--inputs", help="npz of inputs for the compile-time accuracy check (default: synthesized)")
    p.add_argument("--threads", type=int, default=None, help="runtime threads (default: all cores)")
    p.add_argument("--no-verify", action="store_true", help="skip the compile-time accuracy check")
    p.add_argument("--passes", default="", metavar="reorder,hadamard",
                   help="function-preserving passes before quantization, in order: reorder, hadamard")
    p.add_argument("--requantize", action="store_true",
                   help="pre-quantized model: dequantize its layers and re-quantize with --bits (default: keep its recipe)")
    p.add_argument("--method", default="rtn", choices=("rtn", "gptq", "gptaq"),
                   help="weight quantization: rtn (round to nearest), gptq (calibrated) or gptaq (GPTQ with "
                        "error feedback from the layers already quantized; best at 2-3 bits); default rtn")
    p.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True,
                   help="GPTQ: quantize inputs by decreasing Hessian diagonal (default on)")
    p.add_argument("--calib", default=None, metavar="FILE.npz",
                   help="calibration inputs for gptq / mixed precision (default: --inputs, else synthesized)")
    p.add_argument("--size-budget", type=float, default=None, metavar="MB",
                   help="mixed precision: total weight size of the compiled model in MB")
    p.add_argument("--fallback", default="off", choices=("off", "auto"),
                   help="auto: keep layers float whose quantized kernel is estimated slower (default off: warn)")
    p.add_argument("--act-bits", type=int, default=16, choices=(4, 8, 16),
                   help="8: int8 activations into integer GEMMs (W8A8 / W4A8 with --bits 4); 4: codes in [-7, 7] "
                        "(W4A4 with --bits 4; run on the int8 GEMMs); default 16 (float)")
    p.add_argument("--act-mode", default="dynamic", choices=("dynamic", "static"),
                   help="--act-bits 8: per-token dynamic scales, or static per-tensor scales from --calib")
    p.add_argument("--smooth", type=float, default=None, metavar="ALPHA",
                   help="static activation scales (--act-mode static, --integer-only): SmoothQuant alpha that "
                        "migrates activation outlier channels into the weights (0: off; default 0.5, "
                        "integer-only 0.6)")
    p.add_argument("--integer-only", action="store_true",
                   help="--act-bits 8: integer-only inference (int32 accumulation, dyadic rescales; float only "
                        "in the input quantizer and the output dequantizer; implies --act-mode static)")
    p.add_argument("--outlier-bits", type=int, default=None, choices=(3, 4, 8),
                   help="weight-only: leading outlier weight groups of a Linear (after --passes reorder) get these bits")
    p.add_argument("--gemv-kernel", default="auto", choices=("auto", "vnni", "lut", "dequant"),
                   help="batch-1 quantized Linear: vnni (int8-activation AVX-512 VNNI GEMV), lut (lookup-table "
                        "GEMV), dequant (fused dequant GEMV), or auto (default: vnni where it fits, else lut "
                        "where it fits and is estimated faster)")
    p.add_argument("--db", default=None, metavar="DIR",
                   help="tuning database written by `qcompile tune` (same --target): apply its schedules")
    p.add_argument("--no-cache", action="store_true",
                   help="reuse nothing from the compile cache and store nothing in it (default: reuse the graphs after "
                        "the passes, the built library and the verify step's reference outputs of an identical earlier "
                        "compile from $QCOMPILE_CACHE_DIR, else ~/.cache/qcompile/compile)")
    p.add_argument("-q", "--quiet", action="store_true")
    return p


def _bits_option(text: str):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects a number (got '{text}')") from None
    return int(value) if value.is_integer() else value


def _load_npz(path: str) -> dict:
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: cannot read inputs ({err})") from None


def _cmd_compile(argv) -> int:
    args = _compile_parser().parse_args(argv)
    from .driver import compile as compile_model

    emb = None if str(args.embedding_bits).lower() == "none" else _int_option("--embedding-bits", args.embedding_bits)
    config = CompileConfig(
        target=args.target, bits=16 if args.no_quant else args.bits, group_size=args.group_size,
        symmetric=args.symmetric, embedding_bits=emb, shapes=dict(parse_shape(s) for s in args.shape),
        num_threads=args.threads, verify=not args.no_verify, requantize=args.requantize, cpu=args.cpu,
        passes=tuple(p.strip() for p in args.passes.split(",") if p.strip()),
        method=args.method, act_order=args.act_order, calib=args.calib, size_budget_mb=args.size_budget,
        fallback=args.fallback, act_bits=args.act_bits, act_mode=args.act_mode,
        integer_only=args.integer_only, smooth=args.smooth, tuning_db=args.db, outlier_bits=args.outlier_bits,
        gemv_kernel=args.gemv_kernel,
    )
    eval_inputs = _load_npz(args.inputs) if args.inputs else None
    art = compile_model(args.model, config, output=args.output, eval_inputs=eval_inputs,
                        cache=False if args.no_cache else None)
    print(_summary(art.manifest, args.output))
    return 0


def _int_option(flag: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise InputError(f"{flag} expects an integer (got '{text}')") from None


def _summary(manifest: dict, out) -> str:
    sizes = manifest["sizes"]
    lines = [f"wrote {out}: target {manifest['target']}, weights {sizes['weights_bytes'] / 1e6:.2f} MB "
             f"({sizes['weights_ratio']:.3f}x of fp32)"]
    for name, acc in manifest.get("accuracy", {}).items():
        if isinstance(acc, dict) and "compiled_vs_float" in acc:
            c = acc["compiled_vs_float"]
            lines.append(f"  {name}: cosine vs float {c.get('cosine')}, SQNR {c.get('sqnr_db')} dB "
                         f"({manifest['accuracy']['inputs']} inputs)")
    return "\n".join(lines)


def _cmd_run(argv) -> int:
    p = argparse.ArgumentParser(prog="qcompile run", description="Run a compiled artifact on inputs from an npz file.")
    p.add_argument("artifact")
    p.add_argument("--inputs", required=True, help="npz with one array per model input")
    p.add_argument("--output", required=True, help="npz to write the outputs to")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    import numpy as np

    from .driver import load

    model = load(args.artifact, num_threads=args.threads)
    outputs = model.run(_load_npz(args.inputs))
    np.savez(args.output, **outputs)
    print(f"wrote {args.output}: " + ", ".join(f"{k} {list(v.shape)} {v.dtype}" for k, v in outputs.items()))
    return 0


def _cmd_inspect(argv) -> int:
    p = argparse.ArgumentParser(prog="qcompile inspect", description="Show an artifact's manifest (verified).")
    p.add_argument("artifact")
    p.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    args = p.parse_args(argv)
    from .artifact import verify

    manifest = verify(args.artifact)
    if args.json:
        print(json.dumps(manifest, indent=2, sort_keys=True))
        return 0
    print(_summary(manifest, args.artifact))
    for io_kind in ("inputs", "outputs"):
        for io in manifest[io_kind]:
            print(f"  {io_kind[:-1]} {io['name']}: {io['dtype']}{io['shape']}")
    recipe = manifest.get("recipe", [])
    print(f"  quantized layers: {len(recipe)}")
    for layer in recipe:
        if layer.get("method") == "imported":
            print(f"    {layer.get('node')}: {layer.get('op')} imported from the model: "
                  + ", ".join(f"{k} {layer[k]}" for k in ("bits", "group_size", "symmetric", "dtype", "granularity", "source")
                              if k in layer))
            continue
        print(f"    {layer.get('node')}: {layer.get('op')} {layer.get('bits')}-bit group {layer.get('group_size')} "
              f"{'sym' if layer.get('symmetric') else 'asym'} {layer.get('method', 'rtn')} "
              f"rel.err {layer.get('rel_error', float('nan')):.4f}")
    print(f"  files: " + ", ".join(f"{k} ({v['bytes']} B, sha256 ok)" for k, v in manifest["files"].items()))
    return 0


def _cmd_compare(argv) -> int:
    p = argparse.ArgumentParser(prog="qcompile compare",
                                description="Per-layer error (SQNR, cosine): float vs fake-quant vs the compiled artifact.")
    p.add_argument("model", help="the ONNX model the artifact was compiled from")
    p.add_argument("artifact")
    p.add_argument("--inputs", help="npz of inputs shaped as the artifact's inputs (default: synthesized)")
    p.add_argument("--calib", help="calibration npz used by the compile (gptq / mixed precision; default: --inputs)")
    p.add_argument("--json", help="also write the comparison to this JSON file")
    args = p.parse_args(argv)
    from .artifact import write_json
    from .compare import compare_artifact, format_table

    inputs = _load_npz(args.inputs) if args.inputs else None
    calib = _load_npz(args.calib) if args.calib else None
    result = compare_artifact(args.model, args.artifact, inputs, calib)
    print(format_table(result))
    if args.json:
        write_json(args.json, result)
    return 0


def _cmd_tune(argv) -> int:
    p = argparse.ArgumentParser(
        prog="qcompile tune",
        description="Tune the functions without a hand schedule (fused elementwise / reduction functions) "
                    "with MetaSchedule; compile with --db DIR to use the results.")
    p.add_argument("model", help="ONNX model file")
    p.add_argument("--target", default="llvm",
                   help="llvm = this host (default), arm64 = aarch64 Linux (needs --rpc: measured on boards)")
    p.add_argument("--cpu", default=None, help=f"CPU of --target arm64: {', '.join(ARM64_CPUS)}")
    p.add_argument("--trials", type=int, required=True, help="MetaSchedule trials per function")
    p.add_argument("--db", default=None, metavar="DIR",
                   help="database directory (default ~/.cache/qcompile/tuning/<target hash>)")
    p.add_argument("--shape", action="append", default=[], metavar="NAME=D1xD2",
                   help="bind a dynamic input shape (as for compile: tune the shapes you compile)")
    p.add_argument("--bits", type=_bits_option, default=4, help="weight bits, as for compile (default 4)")
    p.add_argument("--group-size", type=int, default=0, help="as for compile")
    p.add_argument("--symmetric", action="store_true", help="as for compile")
    p.add_argument("--act-bits", type=int, default=16, choices=(8, 16), help="as for compile")
    p.add_argument("--threads", type=int, default=None, help="cores of the target (default: all)")
    p.add_argument("--rpc", default=None, metavar="HOST:PORT",
                   help="TVM RPC tracker: measure on the servers registered there with --key (in parallel)")
    p.add_argument("--key", default=None, help="with --rpc: the key the RPC servers registered with")
    p.add_argument("--no-cache", action="store_true",
                   help="do not reuse or store the graphs after the passes in the compile cache")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    from .driver import tune

    config = CompileConfig(target=args.target, bits=args.bits, group_size=args.group_size,
                           symmetric=args.symmetric, act_bits=args.act_bits, num_threads=args.threads,
                           shapes=dict(parse_shape(s) for s in args.shape), cpu=args.cpu)
    summary = tune(args.model, config, trials=args.trials, db=args.db, progress=not args.quiet,
                   rpc=args.rpc, rpc_key=args.key, cache=False if args.no_cache else None)
    tuned = sum(1 for t in summary["tasks"] if t["records"])
    print(f"tuned {tuned} of {len(summary['tasks'])} function(s) into {summary['db']}")
    for task in summary["tasks"]:
        print(f"  {task['name']}: {task['records']} valid record(s)")
    return 0


def _cmd_demo(argv) -> int:
    from qcompile.models.demo import main as demo_main

    return demo_main(argv)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet = "-q" in argv or "--quiet" in argv
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="[qcompile] %(message)s")
    for noisy in ("tvm", "torch", "onnxscript", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    handlers = {"run": _cmd_run, "inspect": _cmd_inspect, "demo": _cmd_demo, "compile": _cmd_compile,
                "compare": _cmd_compare, "tune": _cmd_tune}
    command = argv[0] if argv and argv[0] in SUBCOMMANDS else "compile"
    rest = argv[1:] if argv and argv[0] in SUBCOMMANDS else argv
    try:
        return handlers[command](rest)
    except QCompileError as err:
        print(f"qcompile: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qcompile: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
