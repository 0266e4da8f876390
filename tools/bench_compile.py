"""Compile-time benchmark: untuned compile, tune, and compiles with the tuning database, cold and warm.

    python tools/bench_compile.py [--model M.onnx] [--trials 4] [--db DIR] [--runs 2] [--threads 2]

Default model: all-MiniLM-L6-v2 (batch 1, seq 128, 4-bit weights in groups of 32, as ``qcompile
demo``). Every compile is the CLI in a fresh process (``python -m qcompile``), so each wall time
includes Python's start and the imports. Steps:

1. unless ``--db`` already holds a database, ``qcompile tune --trials N`` into it (wall time);
2. ``--runs`` times, in this order: the untuned compile (``--no-cache``); the ``--db`` compile
   with an empty compile cache (cold: every stage misses and is stored); the same ``--db``
   compile again (warm: every stage hits). Printed per compile: wall time, the driver's phases
   from ``timings.json`` (import, passes, build, verify), the rest (Python start, imports of
   TVM and the backend, artifact writing, exit) and which cache stages hit;
3. run-time medians of the untuned, the first ``--db`` (cold) and the warm ``--db`` artifacts
   (:mod:`qcompile.timing`, one block per contender, best of ``--rounds``), and whether the
   cold and warm ``--db`` libraries are byte-identical.

Timings on a shared machine are noisy: the load average is printed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PHASES = ("import", "passes", "build", "verify")


def _run(argv: list[str], env: dict | None = None) -> float:
    """Wall seconds of a process (it must succeed)."""
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **(env or {})})
    elapsed = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {' '.join(argv)}\n{proc.stderr[-2000:]}")
    return elapsed


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "qcompile", *args]


def _model_args(args) -> list[str]:
    shapes = [f"--shape={name}=1x{args.seq}" for name in args.inputs]
    return [str(args.model), "--bits", str(args.bits), "--group-size", str(args.group_size),
            "--threads", str(args.threads), *shapes]


def _compile_row(args, out: Path, extra: list[str], cache_dir: Path | None) -> dict:
    """Wall time of one CLI compile, its phases and cache use (``cache_dir`` None: --no-cache)."""
    flags = [*extra, *(["--no-verify"] if args.no_verify else []), *(["--no-cache"] if cache_dir is None else [])]
    env = {"QCOMPILE_CACHE_DIR": str(cache_dir)} if cache_dir else {}
    env["QCOMPILE_NO_CACHE"] = "0"
    wall = _run(_cli(*_model_args(args), "-o", str(out), "-q", *flags), env)
    timings = json.loads((out / "timings.json").read_text())
    phases = timings["timings_s"]
    row = {"wall_s": wall, **{p: phases.get(p, 0.0) for p in PHASES}, "cache": timings.get("cache", {})}
    row["rest_s"] = wall - sum(phases.get(p, 0.0) for p in PHASES)
    return row


def _startup_row() -> dict:
    """Wall seconds of a process that only imports the CLI, and one that also imports TVM and the backend."""
    cli = _run([sys.executable, "-c", "import qcompile.cli"])
    backend = _run([sys.executable, "-c", "import qcompile.cli, qcompile.driver as d; d._import_backend('llvm')"])
    return {"cli": cli, "backend": backend}


def _runtime_medians(args, artifacts: dict) -> dict:
    from qcompile.driver import load
    from qcompile.models import minilm
    from qcompile.timing import time_contenders

    feeds = {k: v[:1] for k, v in minilm.tokenize(minilm.SENTENCES, args.seq).items()}
    models = {label: load(path, num_threads=args.threads) for label, path in artifacts.items()}
    calls = {label: (lambda m: lambda: m.run(feeds))(m) for label, m in models.items()}
    return time_contenders(calls, repeats=args.repeats, rounds=args.rounds)


def _print_row(label: str, row: dict) -> None:
    cells = " ".join(f"{row[k]:7.2f}" for k in ("wall_s", *PHASES, "rest_s"))
    hits = ", ".join(f"{stage} {use}" for stage, use in sorted(row["cache"].items())) or "no cache"
    print(f"  {label:24s} {cells}   {hits}", flush=True)


def _load() -> str:
    return f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=None, help="ONNX model (default: all-MiniLM-L6-v2)")
    p.add_argument("--inputs", nargs="+", default=None, help="input names to bind to 1xSEQ (default: MiniLM's)")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--bits", default="4")
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--trials", type=int, default=4, help="trials per function when tuning")
    p.add_argument("--db", type=Path, default=None, help="tuning database (tuned into when missing)")
    p.add_argument("--runs", type=int, default=2, help="rounds of (untuned, --db cold, --db warm) compiles")
    p.add_argument("--no-verify", action="store_true", help="compile with --no-verify")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    from qcompile.models import minilm
    from qcompile.models.demo import default_onnx_path

    args.model = args.model or default_onnx_path()
    args.inputs = args.inputs or list(minilm.INPUT_NAMES)
    work = Path(tempfile.mkdtemp(prefix="qcbench-compile-"))
    db = args.db or work / "db"
    print(f"{args.model.name}: bits {args.bits} group {args.group_size}, {args.threads} threads, {_load()}")
    start = _startup_row()
    print(f"python start: import qcompile.cli {start['cli']:.2f} s; + TVM and the llvm backend {start['backend']:.2f} s")
    if not (db / "database_workload.json").is_file():
        tune_s = _run(_cli("tune", *_model_args(args), "--trials", str(args.trials), "--db", str(db), "-q",
                           "--no-cache"))
        print(f"tune: {args.trials} trials per function in {tune_s:.1f} s (wall) -> {db}")
    print(f"  {'compile (wall s)':24s} " + " ".join(f"{h:>7s}" for h in ("wall", *PHASES, "rest")) + "   cache")
    artifacts = {}
    for run in range(args.runs):
        cache = work / f"cache-{run}"  # empty: the first --db compile is cold
        for label, name, extra, cache_dir in (("untuned", "untuned", [], None),
                                              ("--db cold cache", "db-cold", ["--db", str(db)], cache),
                                              ("--db warm cache", "db-warm", ["--db", str(db)], cache)):
            out = work / f"{name}-{run}"
            _print_row(f"{label} #{run + 1}", _compile_row(args, out, extra, cache_dir))
            artifacts[label] = out
        print(f"  ({_load()})")
    same = (artifacts["--db cold cache"] / "manifest.json").read_bytes() == \
        (artifacts["--db warm cache"] / "manifest.json").read_bytes()
    print(f"--db cold and warm artifacts identical (manifest, so every file hash): {'yes' if same else 'NO'}")
    medians = _runtime_medians(args, artifacts)
    print(f"run time (median ms, best of {args.rounds} blocks of {args.repeats}), {_load()}:")
    for label, ms in medians.items():
        print(f"  {label:24s} {ms:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
