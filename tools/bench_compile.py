"""Compile-time benchmark: where a compile's wall time goes, untuned and with a tuning database.

    python tools/bench_compile.py [--model M.onnx] [--trials 4] [--db DIR] [--runs 2] [--threads 2]

Default model: all-MiniLM-L6-v2 (batch 1, seq 128, 4-bit weights in groups of 32, as ``qcompile
demo``). Steps:

1. unless ``--db`` already holds a database, ``qcompile tune --trials N`` into it (wall time);
2. each compile, ``--runs`` times, in a fresh process through the CLI (what a user waits for):
   untuned and with ``--db``, alternating. Printed per run: wall time; startup (the imports of
   qcompile, TVM (which imports torch) and onnx, timed in that process); the driver's phases
   from ``report.json`` (import, passes, build, verify); and the rest (interpreter start, the
   CLI's own imports, artifact writing, exit);
3. run-time medians of the untuned and tuned artifacts (:mod:`qcompile.timing`, one block per
   contender, best of ``--rounds``).

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
MARK = "bench_compile startup_s="
# the CLI in a fresh process, timing its module imports (qcompile, TVM, torch via tvm_ffi, onnx) first
CLI = ("import sys, time; t = time.perf_counter(); import qcompile.driver, qcompile.backends.llvm, tvm, onnx; "
       f"print('{MARK}%f' % (time.perf_counter() - t), file=sys.stderr); "
       "from qcompile.cli import main; sys.exit(main(sys.argv[1:]))")


def _run(argv: list[str]) -> tuple[float, float]:
    """(wall seconds, startup seconds) of a CLI process."""
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {' '.join(argv)}\n{proc.stderr[-2000:]}")
    marks = [line for line in proc.stderr.splitlines() if line.startswith(MARK)]
    return elapsed, float(marks[0][len(MARK):]) if marks else 0.0


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", CLI, *args]


def _model_args(args) -> list[str]:
    shapes = [f"--shape={name}=1x{args.seq}" for name in args.inputs]
    return [str(args.model), "--bits", str(args.bits), "--group-size", str(args.group_size),
            "--threads", str(args.threads), *shapes]


def _compile_row(args, out: Path, db: Path | None) -> dict:
    extra = (["--db", str(db)] if db else []) + (["--no-verify"] if args.no_verify else [])
    wall, startup = _run(_cli(*_model_args(args), "-o", str(out), "-q", *extra))
    phases = json.loads((out / "report.json").read_text())["timings_s"]
    row = {"wall_s": wall, "startup_s": startup, **{p: phases.get(p, 0.0) for p in PHASES}}
    row["rest_s"] = wall - startup - sum(phases.get(p, 0.0) for p in PHASES)
    return row


def _runtime_medians(args, artifacts: dict) -> dict:
    from qcompile.driver import load
    from qcompile.models import minilm
    from qcompile.timing import time_contenders

    feeds = {k: v[:1] for k, v in minilm.tokenize(minilm.SENTENCES, args.seq).items()}
    models = {label: load(path, num_threads=args.threads) for label, path in artifacts.items()}
    calls = {label: (lambda m: lambda: m.run(feeds))(m) for label, m in models.items()}
    return time_contenders(calls, repeats=args.repeats, rounds=args.rounds)


def _print_row(label: str, row: dict) -> None:
    cells = " ".join(f"{row[k]:7.2f}" for k in ("wall_s", "startup_s", *PHASES, "rest_s"))
    print(f"  {label:22s} {cells}", flush=True)


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
    p.add_argument("--runs", type=int, default=2, help="compiles per variant")
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
    print(f"{args.model.name}: bits {args.bits} group {args.group_size}, {args.threads} threads, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    if not (db / "database_workload.json").is_file():
        tune_s, _ = _run(_cli("tune", *_model_args(args), "--trials", str(args.trials), "--db", str(db), "-q"))
        print(f"tune: {args.trials} trials per function in {tune_s:.1f} s -> {db}")
    print(f"  {'compile':22s} " + " ".join(f"{h:>7s}" for h in ("wall", "startup", *PHASES, "rest")))
    artifacts = {}
    for run in range(args.runs):  # variants alternate, so a load swing hits both
        for label, use_db in (("untuned", None), ("tuned (--db)", db)):
            out = work / f"{label.split()[0]}-{run}"
            _print_row(f"{label} #{run + 1}", _compile_row(args, out, use_db))
            artifacts[label] = out
        print(f"  (load average {os.getloadavg()[0]:.1f})")
    medians = _runtime_medians(args, artifacts)
    print(f"run time (median ms, best of {args.rounds} blocks of {args.repeats}), "
          f"load average {os.getloadavg()[0]:.1f}:")
    for label, ms in medians.items():
        print(f"  {label:22s} {ms:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
