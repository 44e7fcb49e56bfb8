"""Timed figures: percentiles, their spread, and the machine's load while they were taken.

A latency measured on a busy machine is not the code's latency. Every timed figure records its spread (IQR over
median) and the 1-minute load average before and after the rounds; ``busy`` is set when the spread or the load
says the machine was shared, and the card marks such a figure instead of presenting it as the code's speed.
"""

from __future__ import annotations

import os
import statistics
from typing import Any

import numpy as np

__all__ = ["machine_load", "summarize_samples", "own_gpu", "NOISY_SPREAD"]

NOISY_SPREAD = 0.10  # IQR / median above this: the rounds disagree by more than 10%, so the machine was not quiet


def machine_load() -> dict[str, float]:
    """The 1-minute load average and the number of cores (a load above the cores means runnable work waited)."""
    try:
        load1 = os.getloadavg()[0]
    except (OSError, AttributeError):  # not on every platform
        load1 = float("nan")
    return {"load1": round(load1, 2), "cpus": os.cpu_count() or 1}


def summarize_samples(samples: list[float], new_tokens: int, load_before: dict[str, float],
                      load_after: dict[str, float]) -> dict[str, Any]:
    """p50/p95/mean, tokens/s, IQR/median and whether the machine looked busy, from per-round seconds."""
    if not samples:
        raise ValueError("no timed rounds to summarize; run at least one round")
    p25, p50, p75, p95 = (float(q) for q in np.percentile(samples, [25, 50, 75, 95]))
    spread = (p75 - p25) / p50 if p50 > 0 else 0.0
    loads = [x["load1"] for x in (load_before, load_after) if x["load1"] == x["load1"]]  # drop NaN
    overloaded = any(load > load_before["cpus"] for load in loads)
    reasons = []
    if spread > NOISY_SPREAD:
        reasons.append(f"IQR/median {spread:.2f} > {NOISY_SPREAD}")
    if overloaded:
        reasons.append(f"load {max(loads):.1f} on {load_before['cpus']} cores")
    return {
        "p50_s": p50, "p95_s": p95, "mean_s": statistics.fmean(samples),
        "rounds": len(samples), "new_tokens": new_tokens, "tokens_per_s": new_tokens / p50 if p50 else None,
        "iqr_over_median": spread, "load_before": load_before, "load_after": load_after,
        "busy": bool(reasons), "busy_reason": "; ".join(reasons) or None, "samples_s": list(samples),
    }


def own_gpu() -> bool:
    """An xdist worker that the plugin pinned to one GPU of its own (``CUDA_VISIBLE_DEVICES`` of one device)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    return bool(os.environ.get("PYTEST_XDIST_WORKER")) and visible != "" and "," not in visible
