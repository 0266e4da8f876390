"""CLI contract: one-line errors with exit code 2, no traceback, nothing half-written."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper

from qcompile.cli import main


def _run_cli(*args):
    return subprocess.run([sys.executable, "-m", "qcompile", *map(str, args)], capture_output=True, text=True)


def test_unsupported_op_is_one_line_exit_2(tmp_path):
    node = helper.make_node("NonMaxSuppression", ["boxes", "scores"], ["sel"], name="nms_0")
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, 4, 4]),
         helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 1, 4])],
        [helper.make_tensor_value_info("sel", TensorProto.INT64, [None, 3])],
    )
    path = tmp_path / "nms.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    out = tmp_path / "out"
    proc = _run_cli(path, "-o", out, "-q")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    err_lines = [l for l in proc.stderr.splitlines() if l.startswith("qcompile: error")]
    assert len(err_lines) == 1 and "NonMaxSuppression" in err_lines[0] and "nms_0" in err_lines[0]
    assert not out.exists()
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_malformed_file_is_clear(tmp_path, capsys):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"this is not a protobuf")
    assert main([str(bad), "-o", str(tmp_path / "o"), "-q"]) == 2
    assert "broken.onnx" in capsys.readouterr().err


def test_missing_file_and_bad_bits(tmp_path, capsys, mlp_onnx):
    assert main([str(tmp_path / "nope.onnx"), "-o", str(tmp_path / "o"), "-q"]) == 2
    assert "nope.onnx" in capsys.readouterr().err
    assert main([str(mlp_onnx), "-o", str(tmp_path / "o"), "--bits", "5", "-q"]) == 2
    assert "--bits" in capsys.readouterr().err


def test_dynamic_axis_needs_shape(tmp_path, capsys):
    from conftest import make_mlp_onnx

    path = make_mlp_onnx(tmp_path / "dyn.onnx", dynamic_batch=True)
    assert main([str(path), "-o", str(tmp_path / "o"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "'x'" in err and "batch" in err and "--shape" in err
    assert main([str(path), "-o", str(tmp_path / "o"), "--shape", "x=3x64", "--bits", "8", "-q"]) == 0
    manifest = __import__("json").loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["inputs"][0]["shape"] == [3, 64]


def test_compile_run_inspect_roundtrip(tmp_path, capsys, mlp_onnx):
    out = tmp_path / "art"
    assert main([str(mlp_onnx), "-o", str(out), "--bits", "8", "-q"]) == 0
    x = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    assert main(["run", str(out), "--inputs", str(tmp_path / "in.npz"), "--output", str(tmp_path / "res.npz")]) == 0
    with np.load(tmp_path / "res.npz") as res:
        assert res["y"].shape == (4, 32)
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "quantized layers: 2" in text and "8-bit" in text
    np.savez(tmp_path / "wrong.npz", z=x)
    assert main(["run", str(out), "--inputs", str(tmp_path / "wrong.npz"), "--output", str(tmp_path / "r.npz")]) == 2
    assert "missing input" in capsys.readouterr().err


def test_gptaq_from_the_cli_is_recorded_per_layer(tmp_path, capsys, mlp_onnx):
    out = tmp_path / "art"
    assert main([str(mlp_onnx), "-o", str(out), "--bits", "2", "--group-size", "32", "--method", "gptaq", "-q"]) == 0
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.count("2-bit group 32 asym gptaq") == 2
    assert main([str(mlp_onnx), "-o", str(tmp_path / "bad"), "--bits", "8", "--act-bits", "8", "--method", "gptaq"]) == 2
    assert "weight-only" in capsys.readouterr().err and not (tmp_path / "bad").exists()
