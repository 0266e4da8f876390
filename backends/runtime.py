"""Run a built ``model.so`` with numpy arrays on the host.

Threads: TVM's CPU thread pool is created the first time a parallel kernel runs in the
process; it reads ``TVM_NUM_THREADS`` then (its own default is half the cores on x86)
and can never grow past that size afterwards, only use fewer workers.
:func:`set_num_threads` therefore (1) sets ``TVM_NUM_THREADS`` to at least
``os.cpu_count()`` so a pool created later has every core, and (2) calls
``runtime.config_threadpool`` to use exactly the requested number of workers
(``num_threads``, default ``os.cpu_count()``). The pool is per process: the last
``HostModule`` created decides how many workers run. A pool that an earlier TVM user of
the process started with fewer threads stays that small.

The library's ``main`` returns a tuple of the graph outputs in order (see
:mod:`qcompile.backends.relax_lowering`); callers get a dict name -> array.
"""

from __future__ import annotations

import os

import numpy as np

from qcompile.errors import InputError

__all__ = ["HostModule", "set_num_threads"]

_AFFINITY_BIG = 1  # threading::ThreadGroup::kBig, the mode the pool starts in


def set_num_threads(num_threads: int | None = None) -> int:
    """Use ``num_threads`` workers (default: every core) in TVM's CPU pool; returns it."""
    import tvm

    cores = os.cpu_count() or 1
    count = int(num_threads or cores)
    if count < 1:
        raise InputError(f"num_threads must be >= 1, got {num_threads}")
    os.environ["TVM_NUM_THREADS"] = str(max(count, cores))
    config = tvm.get_global_func("runtime.config_threadpool", allow_missing=True)
    if config is not None:
        config(_AFFINITY_BIG, count)
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
