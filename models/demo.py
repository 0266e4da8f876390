"""``qcompile demo``: the main job on the embedded default model, end to end.

Exports all-MiniLM-L6-v2 to ONNX (opset 17, raw torch.onnx.export), compiles it with
qcompile for the host at the requested bits, loads the artifact and prints: mean embedding
cosine vs the fp32 model over the fixed sentence set, artifact weight size vs fp32, and
batch-1 latency vs onnxruntime fp32 (same thread count, medians).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from . import minilm

__all__ = ["main", "embed_sentences", "ort_session", "default_onnx_path"]

SEQ = 128


def default_onnx_path() -> Path:
    cache = Path(os.environ.get("QCOMPILE_CACHE", Path.cwd() / ".cache"))
    path = cache / "all-MiniLM-L6-v2.opset17.onnx"
    if not path.exists():
        minilm.export_onnx(path, opset=17)
    return path


def ort_session(path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def embed_sentences(run_one, feeds: dict) -> np.ndarray:
    """Run a batch-1 callable (dict -> array) over every sentence; returns [n, dim]."""
    n = next(iter(feeds.values())).shape[0]
    return np.concatenate([run_one({k: v[i : i + 1] for k, v in feeds.items()}) for i in range(n)])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="qcompile demo", description=__doc__.splitlines()[0])
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("-o", "--output", default="artifacts/minilm-demo")
    args = p.parse_args(argv)

    import qcompile
    from qcompile.timing import time_contenders

    onnx_path = default_onnx_path()
    feeds = minilm.tokenize(minilm.SENTENCES, SEQ)
    first = {k: v[:1] for k, v in feeds.items()}
    shapes = {name: (1, SEQ) for name in minilm.INPUT_NAMES}
    art = qcompile.compile(onnx_path, output=args.output, bits=args.bits, group_size=args.group_size,
                           shapes=shapes, num_threads=args.threads, eval_inputs=first)
    model = art.load(num_threads=args.threads)
    sess = ort_session(onnx_path, args.threads)
    ref = embed_sentences(lambda f: sess.run(None, f)[0], feeds)
    got = embed_sentences(lambda f: model(**f), feeds)
    cos = float(np.mean(np.sum(ref * got, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))))
    sizes = art.manifest["sizes"]
    lib_bytes = art.manifest["files"][art.manifest["library"]]["bytes"]
    best = time_contenders({"qcompile": lambda: model(**first), "ort": lambda: sess.run(None, first)},
                           repeats=30, rounds=3)
    t_q, t_ort = best["qcompile"], best["ort"]
    summary = {
        "model": "all-MiniLM-L6-v2", "bits": args.bits, "group_size": args.group_size,
        "sentences": len(minilm.SENTENCES), "mean_cosine_vs_fp32": round(cos, 5),
        "min_cosine_vs_fp32": round(float(np.min(np.sum(ref * got, 1))), 5),
        "weights_bytes": sizes["weights_bytes"], "weights_fp32_bytes": sizes["weights_fp32_bytes"],
        "weights_ratio": sizes["weights_ratio"], "library_bytes": lib_bytes,
        "latency_ms_qcompile": round(t_q, 3), "latency_ms_onnxruntime_fp32": round(t_ort, 3),
        "speedup_vs_onnxruntime_fp32": round(t_ort / t_q, 3), "threads": args.threads,
        "compile_timings_s": json.loads((art.path / "timings.json").read_text())["timings_s"],
    }
    print(_format(summary))
    (Path(args.output) / "demo_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


def _format(s: dict) -> str:
    return "\n".join([
        f"all-MiniLM-L6-v2, {s['bits']}-bit weights (group {s['group_size']}), batch 1, seq {SEQ}, {s['threads']} threads",
        f"  embedding cosine vs fp32 (onnxruntime), {s['sentences']} sentences: mean {s['mean_cosine_vs_fp32']:.5f}, min {s['min_cosine_vs_fp32']:.5f}",
        f"  weights: {s['weights_bytes'] / 1e6:.2f} MB vs {s['weights_fp32_bytes'] / 1e6:.2f} MB fp32 ({s['weights_ratio']:.3f}x); model.so {s['library_bytes'] / 1e6:.2f} MB",
        f"  latency: qcompile {s['latency_ms_qcompile']:.2f} ms vs onnxruntime fp32 {s['latency_ms_onnxruntime_fp32']:.2f} ms "
        f"({s['speedup_vs_onnxruntime_fp32']:.2f}x)",
        f"  compile phases (s): {s['compile_timings_s']}",
    ])
