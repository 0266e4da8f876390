"""Artifact contract: manifest content, hash verification on load, atomic writes, determinism."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

import qcompile
from qcompile.errors import ArtifactError, QCompileError


def _ort(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_float_artifact_matches_onnxruntime(tmp_path, mlp_onnx):
    art = qcompile.compile(mlp_onnx, output=tmp_path / "fp", bits=16)
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    got = qcompile.load(art.path)(x)
    ref = _ort(mlp_onnx, x)
    assert np.max(np.abs(got - ref)) / np.max(np.abs(ref)) < 1e-5


def test_manifest_contents(tmp_path, mlp_onnx):
    art = qcompile.compile(mlp_onnx, output=tmp_path / "q", bits=4, group_size=32)
    m = json.loads((tmp_path / "q" / "manifest.json").read_text())
    for key in ("format_version", "qcompile_version", "tvm_version", "source_model_sha256", "target",
                "recipe", "inputs", "outputs", "files", "accuracy"):
        assert key in m
    assert m["inputs"] == [{"name": "x", "shape": [4, 64], "dtype": "float32"}]
    assert {r["bits"] for r in m["recipe"]} == {4} and len(m["recipe"]) == 2
    assert set(m["files"]) == {"model.so", "report.json"}
    acc = m["accuracy"]["y"]
    assert acc["compiled_vs_fake_quant"]["max_rel_error"] < 1e-4
    assert acc["compiled_vs_float"]["cosine"] > 0.98
    assert art.manifest == m


def test_load_refuses_tampered_library(tmp_path, mlp_onnx):
    qcompile.compile(mlp_onnx, output=tmp_path / "a", bits=8)
    lib = tmp_path / "a" / "model.so"
    data = lib.read_bytes()
    lib.unlink()  # a new inode: the compile step has the original mapped in this process
    lib.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(ArtifactError, match="sha256"):
        qcompile.load(tmp_path / "a")


def test_failed_compile_leaves_previous_artifact_untouched(tmp_path, mlp_onnx):
    out = tmp_path / "keep"
    qcompile.compile(mlp_onnx, output=out, bits=8)
    before = (out / "manifest.json").read_text()
    with pytest.raises(QCompileError):
        qcompile.compile(tmp_path / "missing.onnx", output=out, bits=8)
    assert (out / "manifest.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["keep", "mlp.onnx"])


def test_builds_are_deterministic(tmp_path, mlp_onnx):
    a = qcompile.compile(mlp_onnx, output=tmp_path / "a", bits=4, group_size=32)
    b = qcompile.compile(mlp_onnx, output=tmp_path / "b", bits=4, group_size=32)
    assert a.manifest["recipe"] == b.manifest["recipe"]
    assert a.manifest["files"]["model.so"]["sha256"] == b.manifest["files"]["model.so"]["sha256"]
