"""``qcompile.compile`` and ``qcompile.load``: the end-to-end path.

compile: import (ONNX file / ModelProto / torch.nn.Module) -> passes (qcompile.pipeline
lists them) -> lower + build for the target -> measure accuracy of the built library
against the float reference interpreter -> write the artifact atomically (artifact.py).
The graphs after the passes, the built payload and the verify step's interpreter outputs are
taken from the compile cache (cache.py) when an identical earlier compile stored them.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np

from . import __version__, artifact
from . import cache_stages as stages
from .cache import CacheSession, open_cache
from .config import CompileConfig
from .errors import InputError, ModelFormatError
from .ir import Graph
from .pipeline import check_feeds, optimize, synthesize_inputs

__all__ = ["compile", "tune", "load", "Artifact", "CompiledModel", "import_model", "layer_report"]

logger = logging.getLogger("qcompile")

BACKENDS = {"llvm": "qcompile.backends.llvm", "arm64": "qcompile.backends.arm64"}
LIBRARY = "model.so"


@contextmanager
def _phase(name: str, timings: dict):
    start = time.perf_counter()
    logger.info("%s ...", name)
    yield
    timings[name] = round(time.perf_counter() - start, 3)
    logger.info("%s done in %.2f s", name, timings[name])


# ---------------------------------------------------------------------------- import
def import_model(model, shapes=None, example_inputs=None) -> tuple[Graph, str]:
    """Return (IR graph, sha256 of the source model)."""
    return _load_model(model, shapes, example_inputs), model_sha256(model)


def _load_model(model, shapes=None, example_inputs=None, fuse_qdq: bool = True) -> Graph:
    if _is_torch_module(model):
        from .frontends.torch_frontend import load_torch

        if example_inputs is None:
            raise InputError("compiling a torch.nn.Module needs example_inputs=(tensor, ...)")
        return load_torch(model, example_inputs)
    _check_onnx_source(model)
    from .frontends.onnx_frontend import load_onnx

    return load_onnx(model, shapes=shapes, fuse_qdq=fuse_qdq)


def model_sha256(model) -> str:
    """sha256 of an ONNX file's bytes, a ModelProto's serialization or a torch module's state."""
    if _is_torch_module(model):
        from .frontends.torch_frontend import module_sha256

        return module_sha256(model)
    _check_onnx_source(model)
    if isinstance(model, (str, os.PathLike)):
        return artifact.sha256_file(Path(model))
    return hashlib.sha256(model.SerializeToString()).hexdigest()


def _check_onnx_source(model) -> None:
    if isinstance(model, (str, os.PathLike)):
        if not Path(model).is_file():
            raise ModelFormatError(f"{model}: no such model file")
    elif not hasattr(model, "SerializeToString"):
        raise InputError(f"cannot compile an object of type {type(model).__name__}: "
                         "pass an ONNX path, ModelProto or torch.nn.Module")


def _is_torch_module(model) -> bool:
    torch = sys.modules.get("torch")  # a torch.nn.Module exists only once torch is imported
    return torch is not None and isinstance(model, torch.nn.Module)


def _import_tvm() -> None:
    """Import TVM, hiding torch from it unless torch is loaded already.

    tvm_ffi imports torch eagerly (2-3 s) for DLPack interop that qcompile does not use; hidden,
    TVM runs without that optional interop. A later ``import torch`` works as usual.
    """
    if "tvm" in sys.modules:
        return
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # makes `import torch` raise ImportError
    try:
        import tvm.relax  # noqa: F401
    finally:
        if hide and "torch" in sys.modules and sys.modules["torch"] is None:
            del sys.modules["torch"]


def _import_backend(target: str):
    _import_tvm()
    return importlib.import_module(BACKENDS[target])


# ---------------------------------------------------------------------------- verify
def layer_report(float_graph: Graph, quant_graph: Graph, feeds: dict) -> list[dict]:
    """Per quantized layer: error of the fake-quant output against the float output."""
    from .interpreter import run
    from .metrics import compare

    ref = run(float_graph, feeds, keep_all=True)
    fq = run(quant_graph, feeds, keep_all=True)
    layers = []
    for node in quant_graph.nodes:
        if node.op in ("QLinear", "QGather", "Linear", "MatMul"):
            out = node.outputs[0]
            if out in ref and out in fq:
                layers.append({"node": node.name, "op": node.op, "output": out, **compare(ref[out], fq[out])})
    return layers, {n: ref[n] for n in float_graph.outputs}, {n: fq[n] for n in quant_graph.outputs}


# ---------------------------------------------------------------------------- compile
def _resolve_config(config: CompileConfig | None, overrides: dict) -> CompileConfig:
    config = config or CompileConfig()
    return replace(config, **overrides) if overrides else config


def _prepare(model, config: CompileConfig, example_inputs, calibration, timings: dict, session: CacheSession):
    """Import, passes and the profitability check shared by compile and tune.

    The graphs after the passes come from the "front" cache entry when ``session`` has it.
    Returns (float_graph, graph_to_build, source sha256, backend module, target)."""
    with _phase("import", timings):
        model_sha = model_sha256(model)
        document = partial(stages.front_document, model, model_sha, config, calibration)
        graphs = session.fetch("front", document, stages.read_graphs)
        if graphs is None:
            # --requantize: QDQ groups keep their float reading, which DequantizeImportedPass undoes
            graph = _load_model(model, config.shapes, example_inputs, fuse_qdq=not config.requantize)
    with _phase("passes", timings):
        if graphs is None:
            graphs = optimize(graph, config, calibration=calibration)
            session.keep("front", stages.graphs_files(graphs))
    float_graph, graph = graphs
    backend = _import_backend(config.target)
    target = _make_target(backend, config)
    if graph is not float_graph:
        graph = _profitability(graph, float_graph, target, config.fallback)
    graph = _gemv_dispatch(graph, target, config.gemv_kernel)
    return float_graph, graph, model_sha, backend, target


def compile(model, config: CompileConfig | None = None, *, output=None, example_inputs=None,
            eval_inputs: dict | None = None, calib_inputs: dict | None = None, cache=None,
            **overrides) -> "Artifact":
    """Compile ``model`` for ``config.target`` and write the artifact to ``output``.

    ``model``: path to an ONNX file, an ``onnx.ModelProto`` or a ``torch.nn.Module`` (then
    ``example_inputs`` is required; it is captured with ``torch.export``). Keyword
    overrides are CompileConfig fields (``bits=4, group_size=32, ...``).
    ``eval_inputs``: inputs for the compile-time accuracy check (default: synthesized).
    ``calib_inputs``: calibration arrays for GPTQ / mixed precision / reorder (default:
    ``config.calib``, else ``eval_inputs``); the leading axis may hold several samples.
    ``cache``: the compile cache (:mod:`qcompile.cache`) of an ONNX model: None = the default
    directory, False = off, a path = that directory. It reuses the graphs after the passes, the
    built library and the interpreter outputs of the verify step; the artifact is the same either way.
    """
    config = _resolve_config(config, overrides)
    if output is None:
        raise InputError("compile needs output=DIRECTORY for the artifact")
    timings: dict[str, float] = {}
    session = _cache_session(cache, example_inputs)
    calibration = calib_inputs if calib_inputs is not None else eval_inputs
    float_graph, graph, model_sha, backend, target = _prepare(model, config, example_inputs, calibration, timings,
                                                              session)
    with artifact.staging_dir(Path(output)) as stage:
        with _phase("build", timings):
            payload, device, tuning = _build_payload(backend, graph, target, config, stage, session)
        report = {"tuning": tuning} if tuning else {}
        accuracy = {}
        if config.verify and not _can_run_here(backend, config):
            logger.warning("qemu-aarch64 not found: the arm64 artifact is not checked at compile time")
            accuracy = {"skipped": "qemu-aarch64 not found (apt-get install qemu-user)"}
        elif config.verify:
            with _phase("verify", timings):
                feeds = check_feeds(graph, eval_inputs) if eval_inputs is not None else synthesize_inputs(graph)
                layers, ref_out, fq_out = _reference_outputs(float_graph, graph, feeds, target, session)
                compiled = CompiledModel(stage / LIBRARY, graph.inputs, graph.outputs, config.num_threads,
                                         target=config.target)
                got = compiled.run(feeds)
                accuracy = _accuracy(ref_out, fq_out, got, eval_inputs is None)
                report["layers"] = layers
        report.update(_sizes(float_graph, graph))
        report["recipe"] = graph.metadata.get("quant_recipe", [])
        if "gemv_kernels" in graph.metadata:
            report["gemv_kernels"] = list(graph.metadata["gemv_kernels"].values())
        if "mixed_precision" in graph.metadata:
            report["mixed_precision"] = graph.metadata["mixed_precision"]
        artifact.write_json(stage / "report.json", report)
        manifest = _manifest(graph, config, model_sha, accuracy, report, stage, payload)
        if device:
            manifest["device"] = device
        artifact.write_json(stage / artifact.MANIFEST, manifest)
        artifact.write_json(stage / artifact.TIMINGS, {"timings_s": timings, "cache": session.use})
    logger.info("wrote %s", output)
    return Artifact(Path(output), manifest)


def _build(backend, graph: Graph, target, tuning_db: str | None):
    """(executable, tuning report or None): with ``tuning_db`` its records are applied."""
    if not tuning_db:
        return backend.build(graph, target), None
    from qcompile.backends.llvm.tuning import build_tuned

    try:
        return build_tuned(graph, target, tuning_db)
    except FileNotFoundError as err:
        raise InputError(str(err)) from None


# ---------------------------------------------------------------------------- compile cache stages
def _cache_session(setting, example_inputs) -> CacheSession:
    """The compile cache of ``setting`` (see :func:`compile`); none for a torch module (its
    example inputs are not part of any key)."""
    return CacheSession(None if example_inputs is not None else open_cache(setting))


def _build_payload(backend, graph: Graph, target, config: CompileConfig, stage: Path, session: CacheSession):
    """Build and export into ``stage``, or copy the "build" cache entry's files there.

    Returns (payload file names, manifest ``device`` section, tuning report or None)."""
    document = partial(stages.build_document, session.keys.get("front"), config, target)
    cached = session.fetch("build", document, stages.read_build)
    if cached is not None:
        entry, built = cached
        for name in built["payload"]:
            (stage / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(entry / name, stage / name)
        return built["payload"], built["device"], built["tuning"]
    executable, tuning = _build(backend, graph, target, config.tuning_db)
    payload, device = _export(backend, config, executable, stage)
    session.keep("build", stages.build_files(stage, payload, device, tuning))
    return payload, device, tuning


def _reference_outputs(float_graph: Graph, graph: Graph, feeds: dict, target, session: CacheSession):
    """:func:`layer_report` of the verify step, or the "reference" cache entry's copy of it."""
    if "front" in session.keys:
        cached = session.fetch("reference", stages.reference_document(session.keys["front"], target, feeds),
                               stages.read_reference)
        if cached is not None:
            return cached
    layers, ref_out, fq_out = layer_report(float_graph, graph, feeds)
    session.keep("reference", stages.reference_files(layers, ref_out, fq_out))
    return layers, ref_out, fq_out


def tune(model, config: CompileConfig | None = None, *, trials: int, db=None, example_inputs=None,
         calib_inputs: dict | None = None, progress: bool = True, rpc: str | None = None,
         rpc_key: str | None = None, cache=None, **overrides) -> dict:
    """Tune the functions of ``model`` that have no hand schedule with MetaSchedule.

    Runs compile's import and passes (same ``config``), then
    :func:`qcompile.backends.llvm.tuning.tune` with ``trials`` trials per function. ``db``: the
    database directory (default: ``~/.cache/qcompile/tuning/<target hash>``). Returns its
    summary; compile with ``tuning_db=<that directory>`` to use the records.
    ``rpc`` ("HOST:PORT" of a TVM RPC tracker) and ``rpc_key``: measure on the servers
    registered there with that key (:mod:`qcompile.backends.rpc`); needed for target arm64.
    ``cache``: as for :func:`compile` (the graphs after the passes are shared with it).
    """
    config = _resolve_config(config, overrides)
    if config.target != "llvm" and not (config.target == "arm64" and rpc):
        raise InputError(f"tune supports --target llvm, or arm64 with --rpc HOST:PORT --key K (got '{config.target}')")
    if not isinstance(trials, int) or trials < 1:
        raise InputError(f"--trials must be a positive integer (got {trials!r})")
    if rpc_key and not rpc:
        raise InputError("--key applies with --rpc HOST:PORT (the RPC tracker)")
    _import_tvm()
    from qcompile.backends import rpc as rpc_farm
    from qcompile.backends.llvm import tuning

    farm = rpc_farm.connect_farm(rpc, rpc_key) if rpc else None  # fail fast, before the passes
    session = _cache_session(cache, example_inputs)
    _, graph, _, _, target = _prepare(model, config, example_inputs, calib_inputs, {}, session)
    return tuning.tune(graph, target, db or tuning.default_db_dir(target), trials, progress=progress, farm=farm)


def _profitability(graph: Graph, float_graph: Graph, target, mode: str) -> Graph:
    """Estimate each QLinear vs its float Linear; warn, and with mode "auto" keep it float."""
    from qcompile.backends.profitability import apply_fallback

    return apply_fallback(graph, float_graph, target, mode)[0]


def _gemv_dispatch(graph: Graph, target, mode: str) -> Graph:
    """Mark each batch-1 QLinear for the LUT or the dequant GEMV (backends.lut_lowering)."""
    from qcompile.backends.lut_lowering import choose_gemv_kernels

    return choose_gemv_kernels(graph, target, mode)[0]


def _make_target(backend, config: CompileConfig):
    if config.target == "arm64":
        return backend.arm64_target(config.target_cpu, config.num_threads)
    return backend.host_target(config.num_threads)


def _can_run_here(backend, config: CompileConfig) -> bool:
    return config.target != "arm64" or backend.qemu_available()


def _export(backend, config: CompileConfig, executable, stage: Path) -> tuple[list[str], dict]:
    """Write the target's payload into ``stage``: (file names, manifest ``device`` section or {})."""
    if config.target == "arm64":
        return backend.package(executable, stage, LIBRARY, config.target_cpu)
    backend.export_library(executable, stage / LIBRARY)
    return [LIBRARY], {}


def _accuracy(ref_out, fq_out, got, synthetic: bool) -> dict:
    from .metrics import compare

    acc = {"inputs": "synthetic" if synthetic else "user"}
    for name in ref_out:
        acc[name] = {
            "compiled_vs_float": compare(ref_out[name], got[name]),
            "fake_quant_vs_float": compare(ref_out[name], fq_out[name]),
            "compiled_vs_fake_quant": compare(fq_out[name], got[name]),
        }
    return acc


def _sizes(float_graph: Graph, graph: Graph) -> dict:
    fp32 = float_graph.weight_bytes()
    packed = graph.weight_bytes()
    return {"sizes": {"weights_fp32_bytes": fp32, "weights_bytes": packed,
                      "weights_ratio": round(packed / fp32, 4) if fp32 else 1.0}}


def _io_spec(graph: Graph, names) -> list[dict]:
    return [{"name": n, "shape": list(graph.type_of(n).shape), "dtype": graph.type_of(n).dtype} for n in names]


def _manifest(graph, config, model_sha, accuracy, report, stage, payload) -> dict:
    _import_tvm()
    import tvm

    return {
        "format_version": artifact.FORMAT_VERSION,
        "qcompile_version": __version__,
        "tvm_version": tvm.__version__,
        "source_model_sha256": model_sha,
        "target": config.target,
        "config": config.to_json(),
        "recipe": report["recipe"],
        "inputs": _io_spec(graph, graph.inputs),
        "outputs": _io_spec(graph, graph.outputs),
        "library": LIBRARY,
        "files": artifact.file_entries(stage, [*payload, "report.json"]),
        "sizes": report["sizes"],
        "accuracy": accuracy,
    }


# ---------------------------------------------------------------------------- load
class CompiledModel:
    """A built model library, callable with numpy arrays.

    ``target`` "llvm" loads it in this process; "arm64" runs the artifact's runner under qemu.
    """

    def __init__(self, library: Path, input_names, output_names, num_threads=None, target: str = "llvm"):
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        _import_tvm()
        if target == "arm64":
            from qcompile.backends.arm64 import open_module

            self._module = open_module(library, self.input_names, self.output_names, num_threads)
        else:
            from qcompile.backends.runtime import HostModule

            self._module = HostModule(str(library), self.input_names, self.output_names, num_threads=num_threads)

    def run(self, feeds: dict) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise InputError(f"missing input(s): {', '.join(missing)} (model inputs: {', '.join(self.input_names)})")
        return self._module({n: np.ascontiguousarray(feeds[n]) for n in self.input_names})

    def __call__(self, *args, **kwargs):
        feeds = dict(zip(self.input_names, args))
        feeds.update(kwargs)
        outs = self.run(feeds)
        values = [outs[n] for n in self.output_names]
        return values[0] if len(values) == 1 else tuple(values)


class Artifact:
    def __init__(self, path: Path, manifest: dict):
        self.path = Path(path)
        self.manifest = manifest

    def load(self, num_threads=None) -> CompiledModel:
        return load(self.path, num_threads=num_threads)

    def __repr__(self):
        return f"Artifact('{self.path}', target={self.manifest['target']})"


def load(path, num_threads=None) -> CompiledModel:
    """Verify the artifact's hashes, then load its library; returns a numpy callable."""
    manifest = artifact.verify(path)
    names = lambda key: [io["name"] for io in manifest[key]]  # noqa: E731
    model = CompiledModel(Path(path) / manifest["library"], names("inputs"), names("outputs"), num_threads,
                          target=manifest.get("target", "llvm"))
    model.manifest = manifest
    return model
