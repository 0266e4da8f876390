"""Timing helpers for benchmarks (never used by tests to assert speed).

Contenders are timed in blocks, one contender at a time, with a pause between blocks:
onnxruntime's and TVM's thread pools spin after each call and steal cores from whatever
runs next, so interleaving calls measures the interference, not the contenders.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

__all__ = ["median_ms", "time_contenders"]


def median_ms(fn: Callable[[], object], repeats: int = 30, warmup: int = 5) -> float:
    """Median wall time of ``fn()`` in milliseconds, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def time_contenders(contenders: dict, repeats: int, rounds: int, pause_s: float = 0.2) -> dict:
    """label -> best block median (ms) over ``rounds`` rounds of one block per contender."""
    best = {label: float("inf") for label in contenders}
    for _ in range(rounds):
        for label, fn in contenders.items():
            time.sleep(pause_s)  # let the previous contender's spinning threads go idle
            best[label] = min(best[label], median_ms(fn, repeats))
    return best
