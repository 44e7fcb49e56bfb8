"""Bootstrap confidence intervals: seeded, percentile method, for means of per-example scores."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["bootstrap_ci", "paired_bootstrap"]


def bootstrap_ci(scores: Sequence[float], resamples: int = 1000, confidence: float = 0.95,
                 seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the mean and its percentile bootstrap CI. With one example the CI is the point."""
    x = np.asarray(scores, dtype=float)
    if x.size == 0:
        raise ValueError("no scores to bootstrap; the split is empty")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(x.mean()), float(lo), float(hi)


def paired_bootstrap(a: Sequence[float], b: Sequence[float], resamples: int = 1000, confidence: float = 0.95,
                     seed: int = 0) -> tuple[float, float, float]:
    """(mean difference a - b, low, high), resampling examples jointly so each keeps its pair."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired scores differ in length: {a.size} vs {b.size}; score the same examples")
    return bootstrap_ci(a - b, resamples, confidence, seed)
