"""The compile stages the compile cache (:mod:`qcompile.cache`) keeps: what each key names, what
each entry holds.

In compile order:

1. ``front``: the pair (float graph, graph to build) after the passes. Key: the model's bytes
   (and its external-data files), the config without ``tuning_db`` and ``verify`` (so ``qcompile
   tune`` and the compiles with and without ``--db`` share it), calibration inputs (arrays and
   ``--calib`` file), :func:`qcompile.cache.environment`.
2. ``build``: the payload files (``model.so``, ...) and ``build.json`` (their names, the manifest's
   ``device`` section, the tuning report). Key: the front key, the config without ``verify``,
   the target string, the bytes of the tuning database.
3. ``reference``: the verify step's interpreter outputs (float reference and fake-quant) and
   per-layer report. Key: the front key, the target string (it picks GEMV kernels), the feeds.

Invariant: every input a stage's product depends on is in its key, directly or through the front key.
"""

from __future__ import annotations

import io
import json
import os
import pickle
from pathlib import Path

import numpy as np

from . import artifact
from .cache import arrays_sha256, environment, tree_sha256
from .ir import Graph

__all__ = ["front_document", "graphs_files", "read_graphs", "build_document", "build_files", "read_build",
           "reference_document", "reference_files", "read_reference"]

GRAPHS = "graphs.pkl"
BUILD = "build.json"
LAYERS = "layers.json"
OUTPUTS = "outputs.npz"


# ---------------------------------------------------------------------------- front
def front_document(model, model_sha: str, config, calibration) -> dict:
    settings = {k: v for k, v in config.to_json().items() if k not in ("tuning_db", "verify")}
    calib_file = Path(config.calib) if config.calib else None
    return {"model_sha256": model_sha, "external_data": _external_data_sha256(model), "config": settings,
            "calibration": arrays_sha256(calibration),
            "calib_file": artifact.sha256_file(calib_file) if calib_file and calib_file.is_file() else None,
            **environment()}


def _external_data_sha256(model) -> dict:
    """sha256 per external-data file an ONNX model file names (their bytes are not in the model's)."""
    if not isinstance(model, (str, os.PathLike)) or b"location" not in Path(model).read_bytes():
        return {}  # an external tensor names its file under the key "location": none here
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    proto = onnx.load(str(model), load_external_data=False)
    names = sorted({ExternalDataInfo(t).location for t in _get_all_tensors(proto) if uses_external_data(t)})
    base = Path(model).parent
    return {name: artifact.sha256_file(base / name) if (base / name).is_file() else None for name in names}


def graphs_files(graphs: tuple[Graph, Graph]) -> dict:
    return {GRAPHS: pickle.dumps(graphs, protocol=pickle.HIGHEST_PROTOCOL)}


def read_graphs(entry: Path) -> tuple[Graph, Graph]:
    graphs = pickle.loads((entry / GRAPHS).read_bytes())
    if not (isinstance(graphs, tuple) and len(graphs) == 2 and all(isinstance(g, Graph) for g in graphs)):
        raise ValueError(f"{GRAPHS} does not hold (float graph, graph)")
    return graphs


# ---------------------------------------------------------------------------- build
def build_document(front_key: str, config, target) -> dict:
    settings = {k: v for k, v in config.to_json().items() if k != "verify"}
    db = tree_sha256(Path(config.tuning_db).expanduser()) if config.tuning_db else None
    return {"front": front_key, "config": settings, "target": str(target), "tuning_db": db}


def build_files(stage: Path, payload: list[str], device: dict, tuning: dict | None) -> dict:
    built = json.dumps({"payload": payload, "device": device, "tuning": tuning}, sort_keys=True)
    return {**{name: stage / name for name in payload}, BUILD: built.encode()}


def read_build(entry: Path) -> tuple[Path, dict]:
    """(entry directory, build.json): the payload files lie in the entry under their names."""
    built = json.loads((entry / BUILD).read_text())
    if not isinstance(built.get("payload"), list):
        raise ValueError(f"{BUILD} lists no payload")
    return entry, built


# ---------------------------------------------------------------------------- reference
def reference_document(front_key: str, target, feeds: dict) -> dict:
    return {"front": front_key, "target": str(target), "feeds": arrays_sha256(feeds)}


def reference_files(layers: list, ref_out: dict, fq_out: dict) -> dict:
    buffer = io.BytesIO()
    np.savez(buffer, **{f"ref/{k}": v for k, v in ref_out.items()}, **{f"fq/{k}": v for k, v in fq_out.items()})
    return {OUTPUTS: buffer.getvalue(), LAYERS: json.dumps(layers, sort_keys=True, default=artifact.jsonable).encode()}


def read_reference(entry: Path) -> tuple[list, dict, dict]:
    """(per-layer report, float reference outputs, fake-quant outputs), as layer_report returns them."""
    with np.load(entry / OUTPUTS, allow_pickle=False) as data:
        ref_out = {k[len("ref/"):]: data[k] for k in data.files if k.startswith("ref/")}
        fq_out = {k[len("fq/"):]: data[k] for k in data.files if k.startswith("fq/")}
    return json.loads((entry / LAYERS).read_text()), ref_out, fq_out
