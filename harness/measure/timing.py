"""Timed figures: percentiles, their spread, and the machine's load while they were taken.

A latency measured on a busy machine is not the code's latency. Every timed figure records its spread (IQR over
median) and the machine's CPU time before and after the rounds. ``busy`` is set when other processes kept a share of
the cores busy while they ran, or when the rounds disagree (the spread) on a machine with no CPU counters to say
whether they did; ``unsteady`` whenever the rounds disagree. A host-bound engine spreads by itself on some hosts: the
seed path on one H200, 14% and 29% in two runs with other processes on 0.01 cores (issue 18's try 25). The card marks
either (‡) with its reasons and the other processes' cores instead of presenting the figure as the code's steady
speed; a busy figure is never reused, an unsteady one on a measured, not busy machine is (``reuse.earlier``).

The 1-minute load average is recorded but does not judge: it trails by a minute, so right after the harness's own
training it reads "2.0 on 2 cores" on a machine that is now quiet. What judges is the CPU time of the whole machine
(``/proc/stat``) minus this process's own (every thread), over the rounds alone: the work of other processes.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

import numpy as np

__all__ = ["machine_load", "others_cores", "summarize_samples", "doubt", "time_rounds", "own_gpu", "NOISY_SPREAD",
           "BUSY_OTHER_SHARE"]

NOISY_SPREAD = 0.10  # IQR / median above this: the rounds disagree by more than 10% (unsteady)
# Other processes busy on at least this share of the cores (and at least one core) while the rounds ran: they took
# CPU time the timed code could have needed (its host loop, its CPU kernels).
BUSY_OTHER_SHARE = 0.25


def machine_load() -> dict[str, float]:
    """A reading to take before and after timed rounds: the machine's busy CPU seconds (all processes), this
    process's CPU seconds, a monotonic clock, the core count, and the 1-minute load average (for the record)."""
    try:
        load1 = os.getloadavg()[0]
    except (OSError, AttributeError):  # not on every platform
        load1 = float("nan")
    own = os.times()
    return {"load1": round(load1, 2), "cpus": os.cpu_count() or 1, "machine_cpu_s": _machine_busy_cpu_s(),
            "own_cpu_s": own.user + own.system, "clock_s": time.monotonic()}


def _machine_busy_cpu_s() -> float:
    """Busy CPU seconds of every process since boot (``/proc/stat``: user, nice, system, irq, softirq, steal); NaN
    where there is no /proc (a spread then marks the figure busy: nothing tells it from other processes' load)."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return float("nan")
    busy = sum(fields[i] for i in (0, 1, 2, 5, 6, 7) if i < len(fields))  # not idle (3) or iowait (4)
    return busy / os.sysconf("SC_CLK_TCK")


def others_cores(before: dict[str, float], after: dict[str, float]) -> float | None:
    """Cores that other processes kept busy, on average, between two readings (None without the CPU counters)."""
    keys = ("machine_cpu_s", "own_cpu_s", "clock_s")
    if not all(k in before and k in after for k in keys) or before["machine_cpu_s"] != before["machine_cpu_s"]:
        return None  # a reading from before these counters, or no /proc
    wall = after["clock_s"] - before["clock_s"]
    if wall <= 0:
        return None
    others = (after["machine_cpu_s"] - before["machine_cpu_s"]) - (after["own_cpu_s"] - before["own_cpu_s"])
    return max(others, 0.0) / wall


def summarize_samples(samples: list[float], new_tokens: int, load_before: dict[str, float],
                      load_after: dict[str, float]) -> dict[str, Any]:
    """p50/p95/mean, tokens/s, IQR/median, whether the machine was busy and whether the rounds were unsteady, from
    per-round seconds."""
    if not samples:
        raise ValueError("no timed rounds to summarize; run at least one round")
    p25, p50, p75, p95 = (float(q) for q in np.percentile(samples, [25, 50, 75, 95]))
    spread = (p75 - p25) / p50 if p50 > 0 else 0.0
    cpus = load_before["cpus"]
    others = others_cores(load_before, load_after)
    unsteady = spread > NOISY_SPREAD
    busy_reason = None
    if others is None and unsteady:  # no CPU counters: nothing tells the spread from other processes' load
        busy_reason = f"IQR/median {spread:.2f} > {NOISY_SPREAD}, no CPU counters"
    elif others is not None and others >= max(1.0, BUSY_OTHER_SHARE * cpus):
        busy_reason = f"other processes kept {others:.1f} of {cpus} cores busy"
    return {
        "p50_s": p50, "p95_s": p95, "mean_s": statistics.fmean(samples),
        "rounds": len(samples), "new_tokens": new_tokens, "tokens_per_s": new_tokens / p50 if p50 else None,
        "iqr_over_median": spread, "load_before": load_before, "load_after": load_after,
        "others_cores": None if others is None else round(others, 2),
        "busy": busy_reason is not None, "busy_reason": busy_reason, "unsteady": unsteady,
        "unsteady_reason": f"IQR/median {spread:.2f} > {NOISY_SPREAD}" if unsteady else None,
        "samples_s": list(samples),
    }


def doubt(figure: dict[str, Any]) -> str | None:
    """Why a timed figure (``summarize_samples``') is not the code's steady speed, or None: the card's ‡."""
    spread = f"its rounds spread ({figure.get('unsteady_reason')})" if figure.get("unsteady") else ""
    if figure.get("busy"):
        return f"timed on a busy machine ({figure.get('busy_reason')})" + (f"; {spread}" if spread else "")
    if spread:
        return f"{spread} while other processes kept {figure.get('others_cores')} cores busy"
    return None


def time_rounds(call, rounds: int) -> tuple[list[float], dict[str, float], dict[str, float]]:
    """``rounds`` calls of ``call``, each timed with a plain clock: (seconds per round, machine load before, after)."""
    before, samples = machine_load(), []
    for _ in range(rounds):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return samples, before, machine_load()


def own_gpu() -> bool:
    """An xdist worker that the plugin pinned to one GPU of its own (``CUDA_VISIBLE_DEVICES`` of one device)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    return bool(os.environ.get("PYTEST_XDIST_WORKER")) and visible != "" and "," not in visible
