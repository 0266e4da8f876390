"""MetaSchedule tuning (host llvm; aarch64 over RPC): ``qcompile tune`` and builds with ``--db``.

What is tuned: the PrimFuncs of the lowered module that are NOT marked ``tirx.is_scheduled``,
i.e. the fused elementwise / reduction functions (softmax, layer norm, GELU chains, residual
adds, ...) that the pipeline's rules (:mod:`qcompile.backends.llvm.target`, step 3) would
otherwise schedule. The kernel PrimFuncs of :mod:`qcompile.backends.kernels` (Linear,
QLinear, MatMul, QGather) keep their hand schedules and are never tuned.

Invariants:

* tuning and a tuned build run the same front half of the pipeline (:func:`prepare_module`:
  FastMath, library dispatch, legalization and fusion) so the workloads match: a workload is
  the structural hash of the single-function module MetaSchedule normalises each PrimFunc to;
* a database is a MetaSchedule ``JSONDatabase`` directory (``database_workload.json``,
  ``database_tuning_record.json``, plus MetaSchedule's ``logs/``); records hold their target,
  and the default directory is per target (:func:`default_db_dir`, a hash of the target JSON);
* candidates are measured on this machine, or with a farm (:mod:`qcompile.backends.rpc`) on
  its RPC servers, linked for the target (aarch64 targets need a farm: nothing here runs them);
* a tuned build applies, for each function the database has a valid record for, the best
  record's schedule *before* the rule-based scheduling (which skips functions so marked); the
  other functions fall back to the rules. A tuned build never searches.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import tvm
from tvm import relax, tirx
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

from ..relax_lowering import lower_graph
from .target import front_passes, relax_pipeline

__all__ = ["default_db_dir", "prepare_module", "tunable_tasks", "tune", "open_database",
           "tuned_pipeline", "build_tuned"]

logger = logging.getLogger("qcompile")

CACHE_ROOT = Path("~/.cache/qcompile/tuning")
SCHEDULED = "tirx.is_scheduled"
BUILD_TIMEOUT_S = 120  # per candidate; a fresh builder process needs a few seconds to import TVM


def default_db_dir(target: tvm.target.Target) -> Path:
    """``~/.cache/qcompile/tuning/<first 16 hex digits of sha256(target JSON)>``."""
    text = json.dumps(_target_json(target), sort_keys=True, default=str)
    return CACHE_ROOT.expanduser() / hashlib.sha256(text.encode()).hexdigest()[:16]


def _target_json(target: tvm.target.Target):
    try:
        return target.export()
    except Exception:  # pylint: disable=broad-except  (export is best effort; the string form is stable)
        return str(target)


def prepare_module(graph, target: tvm.target.Target) -> tvm.IRModule:
    """Lower ``graph`` and run the pipeline up to scheduling: the module the tasks come from."""
    mod = lower_graph(graph, target)
    with target:
        return tvm.transform.Sequential(front_passes(target))(mod)


def _is_scheduled(func) -> bool:
    return bool(func.attrs is not None and func.attrs.get(SCHEDULED, False))


def tunable_tasks(mod: tvm.IRModule, target: tvm.target.Target) -> list:
    """MetaSchedule tasks of ``mod`` (a :func:`prepare_module` result), hand-scheduled ones left out."""
    tasks = ms.relax_integration.extract_tasks(mod, target)
    return [t for t in tasks if not _is_scheduled(t.dispatched[0]["main"])]


def open_database(db_dir) -> ms.database.JSONDatabase:
    """The JSONDatabase in ``db_dir`` (created, with its parent folders, when missing)."""
    path = Path(db_dir).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return ms.database.JSONDatabase(work_dir=str(path), module_equality="structural")


def tune(graph, target: tvm.target.Target, db_dir, trials: int, *, seed: int = 0,
         progress: bool = True, farm=None) -> dict:
    """Tune every tunable function of ``graph`` with ``trials`` MetaSchedule trials each.

    Records go to the JSONDatabase in ``db_dir`` (existing records are kept: tuning again adds
    to them); MetaSchedule's logs to ``db_dir/logs`` (the console gets its warnings only). Returns a summary: ``{"db", "tasks": [{"name", "weight", "records"}], "trials"}``.
    ``farm`` (a :class:`qcompile.backends.rpc.Farm`): measure on its RPC servers instead of
    this machine, candidates linked for ``target`` (the only way to tune a cross target).
    """
    if trials < 1:
        raise ValueError(f"trials must be >= 1 (got {trials})")
    db_dir = Path(db_dir).expanduser()
    database = open_database(db_dir)
    tasks = tunable_tasks(prepare_module(graph, target), target)
    summary = {"db": str(db_dir), "trials": trials, "tasks": []}
    if farm is not None:
        summary["rpc"] = {"tracker": farm.address, "key": farm.key, "servers": farm.servers}
    if not tasks:
        logger.info("nothing to tune: every function has a hand schedule")
        return summary
    # console: warnings only (MetaSchedule would print DEBUG); its full logs go to db_dir/logs
    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)
    contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
        tasks, work_dir=str(db_dir), seed=seed, num_threads=max(1, os.cpu_count() or 1))
    logger.info("tuning %d function(s), %d trials each, database %s, measured %s", len(tasks), trials, db_dir,
                f"on {farm.servers} RPC server(s) via {farm.address}" if farm else "here")
    bar = _ProgressBar(len(tasks) * trials) if progress else None
    try:
        ms.tune_tasks(
            tasks=contexts, task_weights=weights, work_dir=str(db_dir),
            max_trials_global=trials * len(tasks), max_trials_per_task=trials,
            num_trials_per_iter=min(trials, 64), database=database,
            builder=_builder(target, farm), runner=_runner(farm),
            measure_callbacks=ms.measure_callback.MeasureCallback.create("default") + ([bar] if bar else []),
        )
    finally:
        if bar is not None:
            bar.close()
    for task in tasks:
        mod = task.dispatched[0]
        records = database.get_top_k(database.commit_workload(mod), trials) if database.has_workload(mod) else []
        summary["tasks"].append({"name": task.task_name, "weight": int(task.weight), "records": len(records)})
    return summary


def _builder(target: tvm.target.Target, farm) -> ms.builder.LocalBuilder:
    """Candidates built here; for a farm, linked into shared libraries its servers can load."""
    if farm is None:
        return ms.builder.LocalBuilder(f_build=_build_candidate, timeout_sec=BUILD_TIMEOUT_S)
    from .. import rpc

    return ms.builder.LocalBuilder(f_build=_build_candidate, f_export=rpc.exporter(target),
                                   timeout_sec=BUILD_TIMEOUT_S)


def _runner(farm):
    """MetaSchedule's local runner, or its RPC runner over ``farm`` (one worker per server)."""
    if farm is None:
        return "local"
    from .. import rpc

    return rpc.make_runner(farm)


def _build_candidate(mod: tvm.IRModule, target: tvm.target.Target, _params):
    """MetaSchedule's default build without its ``import tvm.s_tir.tensor_intrin``.

    That import registers every target's tensor intrinsics and takes 10-30 s in each fresh
    builder process (longer than the builder's timeout on a loaded machine). Candidates are
    already tensorized when they reach the builder, so it needs no registry.
    """
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm_build(mod, target=target)


@derived_object
class _ProgressBar(ms.measure_callback.PyMeasureCallback):
    """A tqdm bar over all measured candidates (MetaSchedule also logs per task under logs/)."""

    def __init__(self, total: int):
        from tqdm import tqdm

        self._bar = tqdm(total=total, desc="tuning", unit="trial")

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
        self._bar.update(len(measure_candidates))

    def close(self):
        self._bar.total = self._bar.n  # MetaSchedule stops early when a task's space is exhausted
        self._bar.close()


def _apply_database(database, applied: list[str]):
    """MetaScheduleApplyDatabase, noting in ``applied`` the functions it scheduled."""

    @tvm.transform.module_pass(opt_level=0, name="QCompileApplyTuningDatabase")
    def _apply(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        before = {gv.name_hint for gv, f in mod.functions_items()
                  if isinstance(f, tirx.PrimFunc) and not _is_scheduled(f)}
        with database:
            mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
        applied.extend(sorted(gv.name_hint for gv, f in mod.functions_items()
                              if gv.name_hint in before and _is_scheduled(f)))
        return mod

    return _apply


def tuned_pipeline(target: tvm.target.Target, database, applied: list[str]) -> tvm.transform.Pass:
    """The host pipeline with the database applied before the rule-based scheduling; names
    of the functions scheduled from records go to ``applied``."""
    return relax_pipeline(target, before_schedules=[_apply_database(database, applied)])


def build_tuned(graph, target: tvm.target.Target, db_dir) -> tuple:
    """Like :func:`qcompile.backends.llvm.build`, with the records of ``db_dir`` applied.

    Returns ``(executable, {"db", "applied": [names of the functions scheduled from records]})``.
    """
    db_dir = Path(db_dir).expanduser()
    if not (db_dir / "database_workload.json").is_file():
        raise FileNotFoundError(f"{db_dir}: no tuning database (run `qcompile tune` first)")
    database = open_database(db_dir)
    mod = lower_graph(graph, target)
    applied: list[str] = []
    executable = tvm.compile(mod, target=target, relax_pipeline=tuned_pipeline(target, database, applied))
    logger.info("tuning database %s: %d function(s) scheduled from records", db_dir, len(applied))
    return executable, {"db": str(db_dir), "applied": applied}
