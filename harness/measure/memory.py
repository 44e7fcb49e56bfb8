"""Accelerator memory: free it between variants, measure the peak of a phase, read what is in use now.

CUDA figures are GiB of the current device; on a CPU-only machine only the process's peak RSS is reported.
"""

from __future__ import annotations

import gc
import resource

import torch

__all__ = ["free_memory", "reset_peak_memory", "peak_memory", "memory_now"]


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def free_memory() -> None:
    """Collect cyclic garbage (a dropped model) and return cached CUDA memory, so the next variant starts empty."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def reset_peak_memory() -> None:
    """Start a peak measurement from live tensors only: collect cyclic garbage (a freed model) first."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_memory() -> dict[str, float]:
    """CUDA peak allocated/reserved (GiB) since the last reset; on CPU, the process's peak RSS (GiB)."""
    out = {"peak_rss_gib": _peak_rss_gib()}
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        out["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    return out


def memory_now() -> dict[str, float]:
    """Memory in use right now, in GiB: CUDA allocated/reserved/peak/total, or the process's peak RSS on CPU."""
    out = {"peak_rss_gib": _peak_rss_gib()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["allocated_gib"] = torch.cuda.memory_allocated() / 2**30
        out["reserved_gib"] = torch.cuda.memory_reserved() / 2**30
        out["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["total_gib"] = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30
    return out
