"""Accuracy metrics between a reference and a test output (numpy)."""

from __future__ import annotations

import numpy as np

__all__ = ["compare", "mean_cosine", "sqnr_db", "max_rel_error"]


def _rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x.reshape(x.shape[0], -1) if x.ndim > 1 else x.reshape(1, -1)


def mean_cosine(ref: np.ndarray, test: np.ndarray) -> float:
    """Mean over the leading axis of the cosine similarity of the flattened rows."""
    a, b = _rows(ref), _rows(test)
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.mean(np.where(den > 0, num / np.maximum(den, 1e-300), 1.0)))


def sqnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    ref = np.asarray(ref, dtype=np.float64)
    noise = np.sum((ref - np.asarray(test, dtype=np.float64)) ** 2)
    return float("inf") if noise == 0 else float(10 * np.log10(np.sum(ref**2) / noise))


def max_rel_error(ref: np.ndarray, test: np.ndarray) -> float:
    """max |ref - test| / max |ref| (0 when both are all zero)."""
    ref = np.asarray(ref, dtype=np.float64)
    scale = np.max(np.abs(ref)) if ref.size else 0.0
    err = np.max(np.abs(ref - np.asarray(test, dtype=np.float64))) if ref.size else 0.0
    return float(err / scale) if scale > 0 else float(err)


def compare(ref: np.ndarray, test: np.ndarray) -> dict:
    if np.issubdtype(np.asarray(ref).dtype, np.integer):
        return {"exact": bool(np.array_equal(ref, test)), "max_abs_error": float(np.max(np.abs(np.asarray(ref, np.int64) - np.asarray(test, np.int64)), initial=0))}
    return {
        "cosine": round(mean_cosine(ref, test), 6),
        "sqnr_db": round(sqnr_db(ref, test), 2),
        "max_abs_error": float(np.max(np.abs(np.asarray(ref, np.float64) - test), initial=0)),
        "max_rel_error": max_rel_error(ref, test),
    }
