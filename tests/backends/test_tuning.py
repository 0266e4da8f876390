"""MetaSchedule tuning (qcompile.backends.llvm.tuning): task selection, database application,
and the ``qcompile tune`` -> ``qcompile MODEL --db`` round trip (slow: MetaSchedule's first
task pays 30-60 s importing TVM's tensor intrinsics)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import make_mlp_onnx
from qcompile.cli import main
from qcompile.config import CompileConfig
from qcompile.errors import InputError


def _float_graph(path):
    from qcompile.frontends.onnx_frontend import load_onnx
    from qcompile.pipeline import optimize

    return optimize(load_onnx(path), CompileConfig(bits=16))[1]


def _check_matches_interpreter(model_path, artifact_dir):
    from qcompile.driver import load
    from qcompile.interpreter import run

    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((4, 64)).astype(np.float32)}
    want = run(_float_graph(model_path), feeds)["y"]
    got = load(artifact_dir).run(feeds)["y"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _hand_record(db_dir, task, target):
    """Commit one tuning record for ``task``: a traced schedule that fuses, parallelises and vectorises."""
    from tvm import s_tir
    from tvm.s_tir import meta_schedule as ms

    from qcompile.backends.llvm.tuning import open_database

    mod = task.dispatched[0]
    sch = s_tir.Schedule(mod)
    block = sch.get_child_blocks(sch.get_sblock("root"))[0]
    outer, inner = sch.split(sch.fuse(*sch.get_loops(block)), [None, 16])
    sch.parallel(outer)
    sch.vectorize(inner)
    db = open_database(db_dir)
    db.commit_tuning_record(ms.database.TuningRecord(
        sch.trace, db.commit_workload(mod), run_secs=[1e-6], target=target,
        args_info=ms.arg_info.ArgInfo.from_prim_func(mod["main"])))


def test_default_db_dir_is_per_target():
    from qcompile.backends.llvm.target import host_target
    from qcompile.backends.llvm.tuning import default_db_dir

    assert default_db_dir(host_target(2)) == default_db_dir(host_target(2))
    assert default_db_dir(host_target(2)) != default_db_dir(host_target(1))
    assert default_db_dir(host_target(2)).parent.name == "tuning"


@pytest.mark.parametrize("bits", [16, 4])
def test_tasks_leave_hand_scheduled_kernels_out(tmp_path, bits):
    from qcompile.backends.llvm.target import host_target
    from qcompile.backends.llvm.tuning import prepare_module, tunable_tasks
    from qcompile.frontends.onnx_frontend import load_onnx
    from qcompile.pipeline import optimize

    graph = optimize(load_onnx(make_mlp_onnx(tmp_path / "mlp.onnx")), CompileConfig(bits=bits))[1]
    target = host_target()
    tasks = tunable_tasks(prepare_module(graph, target), target)
    assert [t.task_name for t in tasks] == ["relu"]  # the two Linear kernels keep their schedules


def test_compile_applies_database_records(tmp_path):
    """A record committed by hand is applied by compile(tuning_db=...), outputs unchanged."""
    from qcompile.backends.llvm.target import host_target
    from qcompile.backends.llvm.tuning import prepare_module, tunable_tasks
    from qcompile.driver import compile as compile_model

    path = make_mlp_onnx(tmp_path / "mlp.onnx")
    target = host_target()
    (task,) = tunable_tasks(prepare_module(_float_graph(path), target), target)
    _hand_record(tmp_path / "db", task, target)
    art = compile_model(path, CompileConfig(bits=16, tuning_db=str(tmp_path / "db")), output=tmp_path / "out")
    report = json.loads((art.path / "report.json").read_text())
    assert report["tuning"]["applied"] == ["relu"]
    _check_matches_interpreter(path, art.path)
    # without the database nothing is taken from records
    art = compile_model(path, CompileConfig(bits=16), output=tmp_path / "plain")
    assert "tuning" not in json.loads((art.path / "report.json").read_text())


def test_bad_database_options(tmp_path):
    from qcompile.driver import compile as compile_model
    from qcompile.driver import tune

    # arm64 databases come from tuning over RPC (test_rpc_tuning.py); both llvm targets take --db
    assert CompileConfig(target="arm64", tuning_db=str(tmp_path)).tuning_db == str(tmp_path)
    path = make_mlp_onnx(tmp_path / "mlp.onnx")
    with pytest.raises(InputError, match="no tuning database"):
        compile_model(path, CompileConfig(bits=16, tuning_db=str(tmp_path / "missing")), output=tmp_path / "o")
    with pytest.raises(InputError, match="trials"):
        tune(path, CompileConfig(bits=16), trials=0, db=tmp_path / "db")


@pytest.mark.slow
def test_tune_then_compile_with_db(tmp_path, capsys):
    path = make_mlp_onnx(tmp_path / "mlp.onnx")
    db = tmp_path / "db"
    assert main(["tune", str(path), "--trials", "2", "--db", str(db), "--bits", "16", "-q"]) == 0
    assert "tuned 1 of 1 function(s)" in capsys.readouterr().out
    assert (db / "database_workload.json").is_file() and (db / "database_tuning_record.json").is_file()
    out = tmp_path / "out"
    assert main([str(path), "--bits", "16", "--db", str(db), "-o", str(out), "-q"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["tuning"]["applied"] == ["relu"]
    _check_matches_interpreter(path, out)
