"""``qcompile compare``: per-layer float vs fake-quant, outputs vs the compiled artifact."""

from __future__ import annotations

import json

import numpy as np

from qcompile.cli import main


def _inputs(tmp_path, batch=4, dim=64):
    path = tmp_path / "in.npz"
    np.savez(path, x=np.random.default_rng(7).standard_normal((batch, dim)).astype(np.float32))
    return str(path)


def test_compare_cli_rtn(tmp_path, capsys, mlp_onnx):
    out = tmp_path / "art"
    assert main(["compile", str(mlp_onnx), "-o", str(out), "--bits", "4", "--group-size", "32", "-q"]) == 0
    capsys.readouterr()
    assert main(["compare", str(mlp_onnx), str(out), "--json", str(tmp_path / "c.json")]) == 0
    text = capsys.readouterr().out
    assert "fc1_matmul" in text and "QLinear" in text and "compiled_vs_float" in text
    result = json.loads((tmp_path / "c.json").read_text())
    assert [layer["op"] for layer in result["layers"]] == ["QLinear", "QLinear"]
    assert all(layer["bits"] == 4 and layer["sqnr_db"] > 15 for layer in result["layers"])
    out_cmp = result["outputs"][0]
    assert out_cmp["compiled_vs_fake_quant"]["cosine"] > 0.99999
    assert out_cmp["fake_quant_vs_float"]["cosine"] > 0.99


def test_compare_cli_gptq_mixed_precision(tmp_path, capsys, mlp_onnx):
    inputs = _inputs(tmp_path)
    out = tmp_path / "art"
    rc = main(["compile", str(mlp_onnx), "-o", str(out), "--bits", "3.5", "--group-size", "32",
               "--method", "gptq", "--inputs", inputs, "-q"])
    assert rc == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["method"] == "gptq" and manifest["config"]["bits"] == 3.5
    assert {r["method"] for r in manifest["recipe"] if r["op"] == "QLinear"} == {"gptq"}
    assert all(r["bits"] in (2, 3, 4, 8) for r in manifest["recipe"])
    capsys.readouterr()
    assert main(["compare", str(mlp_onnx), str(out), "--inputs", inputs, "--json", str(tmp_path / "c.json")]) == 0
    result = json.loads((tmp_path / "c.json").read_text())
    assert result["inputs"] == "user"
    assert result["outputs"][0]["compiled_vs_fake_quant"]["cosine"] > 0.99999


def test_compare_cli_errors(tmp_path, capsys, mlp_onnx):
    assert main(["compare", str(mlp_onnx), str(tmp_path / "missing")]) == 2
    assert "error" in capsys.readouterr().err
