"""Accelerator memory: free it between variants, measure the peak of a phase, read what is in use now.

CUDA figures are GiB of the current device; on a CPU-only machine only the process's peak RSS is reported.
"""

from __future__ import annotations

import gc
import importlib
import resource

import torch

__all__ = ["LAZY_LIBRARIES", "free_memory", "reset_peak_memory", "peak_memory", "memory_now", "freeze_long_lived"]

_frozen = False  # whether this process froze its long-lived objects already (freeze_long_lived)
# What the harness imports only inside a test (training, the engines, compiling), imported before the freeze so that
# their objects are frozen too: 0.31 million objects on this project's CPU, 0.14 s of every full collection after a
# freeze without them (docs/performance.md, issue 18's try 23). A session that never trains pays trl's import anyway.
LAZY_LIBRARIES = ("peft", "trl", "datasets", "accelerate", "bitsandbytes", "torch._dynamo",
                  "torch._inductor.compile_fx")


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def freeze_long_lived() -> None:
    """Move every object alive now to the collector's permanent generation (``gc.freeze``), once per process, so that
    the full collections ``free_memory`` and ``reset_peak_memory`` make scan only what was made since. Call it before
    anything that will be dropped exists (the plugin: once the tests are collected, before the first runs): a frozen
    object is never collected as cyclic garbage. The imported libraries are ~0.5 million objects; on the 7B shape a
    session's 38 full collections took 19.9 s (one H100, d5b5d80, ``docs/performance.md``, issue 18). The libraries
    the harness imports later (``LAZY_LIBRARIES``) are imported first."""
    global _frozen
    if not _frozen:
        for name in LAZY_LIBRARIES:
            importlib.import_module(name)
        gc.collect()  # what is garbage already is freed, not frozen
        gc.freeze()
        _frozen = True


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
