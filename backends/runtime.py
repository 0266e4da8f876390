"""Run a built ``model.so`` with numpy arrays on the host.

Threads: TVM's CPU thread pool is created the first time a parallel kernel runs, and it
reads ``TVM_NUM_THREADS`` then (its own default is half the cores on x86). ``HostModule``
therefore sets ``TVM_NUM_THREADS`` (``num_threads``, default ``os.cpu_count()``) in the
environment before the first run, and also calls ``runtime.config_threadpool`` so the size
is right even when another module already started the pool in this process. The pool is
per process: the last ``HostModule`` created decides its size.

The library's ``main`` returns a tuple of the graph outputs in order (see
:mod:`qcompile.backends.relax_lowering`); callers get a dict name -> array.
"""

from __future__ import annotations

import os

import numpy as np

from qcompile.errors import InputError

__all__ = ["HostModule", "set_num_threads"]


def set_num_threads(num_threads: int | None = None) -> int:
    """Size TVM's CPU thread pool; returns the thread count used."""
    import tvm

    count = int(num_threads or os.cpu_count() or 1)
    os.environ["TVM_NUM_THREADS"] = str(count)
    config = tvm.get_global_func("runtime.config_threadpool", allow_missing=True)
    if config is not None:
        config(0, count)
    return count


class HostModule:
    """A loaded ``model.so``: ``module({name: array}) -> {name: array}``."""

    def __init__(self, path, input_names, output_names, num_threads=None):
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self.num_threads = set_num_threads(num_threads)
        import tvm
        from tvm import relax

        self._tvm = tvm
        self._lib = tvm.runtime.load_module(os.fspath(path))
        self._vm = relax.VirtualMachine(self._lib, tvm.cpu())
        self._main = self._vm["main"]

    def __call__(self, feeds: dict) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise InputError(f"missing input(s): {', '.join(missing)}")
        args = [self._tvm.runtime.tensor(np.ascontiguousarray(feeds[n])) for n in self.input_names]
        outs = self._main(*args)
        return {name: outs[i].numpy() for i, name in enumerate(self.output_names)}

    def profile(self, feeds: dict, repeat: int = 5) -> list[dict]:
        """Per-kernel wall time over ``repeat`` runs, through the VM's call instrumentation.

        Returns rows ``{"kernel", "calls", "ms", "best_ms"}``, most expensive first: calls
        and mean milliseconds per run, and the per-run time had every call taken its best
        time (robust to other processes stealing the cores). This TVM version has no VM
        profiler; the hook adds a few microseconds per call.
        """
        import time

        from tvm import relax

        vm = relax.VirtualMachine(self._lib, self._tvm.cpu())
        args = [self._tvm.runtime.tensor(np.ascontiguousarray(feeds[n])) for n in self.input_names]
        times: dict[str, list[float]] = {}
        started: list[float] = []

        def instrument(func, symbol, before_run, ret_value, *call_args):
            if before_run:
                started.append(time.perf_counter())
            else:
                times.setdefault(symbol, []).append(time.perf_counter() - started.pop())
            return 0

        vm["main"](*args)  # warm up before instrumenting
        vm.set_instrument(instrument)
        for _ in range(repeat):
            vm["main"](*args)
        rows = []
        for name, ts in times.items():
            calls = len(ts) // repeat
            # calls of one symbol recur in the same order each run: best time per call site
            best = np.min(np.reshape(ts[: calls * repeat], (repeat, calls)), axis=0).sum() if calls else 0.0
            rows.append({"kernel": name, "calls": calls, "ms": 1e3 * sum(ts) / repeat, "best_ms": 1e3 * best})
        return sorted(rows, key=lambda r: -r["best_ms"])
