"""The engines' CUDA libraries started building in the background as a session begins, once a process for a cache
folder: gemv.cu's for the merged engine, and AWQ's where ``merged-int4`` is among the timed engines. How a library is
built, kept and waited for is ``harness.engines.kernel_build``'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

__all__ = ["start_engine_builds"]

_started: set[tuple[str, str]] = set()  # (builder module, cache folder) started in this process


def start_engine_builds(speed_engines: Sequence[str], cache_dir: Path) -> None:
    """``kernel_build.build_in_background`` for each library the engines need, unless this process started it for
    ``cache_dir`` already."""
    from . import awq_kernels, gemv, kernel_build

    for build in (gemv.build, awq_kernels.build) if "merged-int4" in speed_engines else (gemv.build,):
        if (started := (build.__module__, str(cache_dir))) not in _started:
            _started.add(started)
            kernel_build.build_in_background(build, cache_dir)
