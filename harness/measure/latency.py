"""The latency benchmark's library half: one timed unit (greedy-decode the fixed prompt to exactly
``latency.max_new_tokens`` tokens with a variant loaded), its rounds timed with a plain clock, and their summary
recorded with the latency gate. ``Sweep.decode_call``, ``Sweep.measure_latency`` and ``Sweep.record_latency`` are
these functions on the sweep; the benchmark suite times ``decode_call`` with pytest-benchmark instead.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

from ..report.provenance import device_name
from ..report.recording import record_variant
from .gates import latency_gate
from .timing import machine_load, summarize_samples

__all__ = ["decode_call", "record_latency", "measure_latency"]


def decode_call(sweep, name: str) -> Callable[[], list[list[int]]]:
    """One timed unit with ``name`` loaded, once no background build shares the machine. A recompilation inside it is
    an error."""
    from ..engines.decoding import timed_round

    sweep.wait_for_kernels()
    return timed_round(sweep.load(name).engine, sweep.latency_prompt(), sweep.profile.latency.max_new_tokens)


def record_latency(sweep, name: str, samples: list[float], load_before: dict, load_after: dict,
                   timer: str = "pytest-benchmark") -> dict[str, Any]:
    """Summarize timed rounds of ``decode_call(sweep, name)`` (p50/p95, spread, machine load) and record them."""
    loaded = sweep.load(name)
    engine, lat = loaded.engine, sweep.profile.latency
    figures = {**summarize_samples(samples, lat.max_new_tokens, load_before, load_after),
               "warmup_rounds": lat.warmup_rounds, "prompt_id": sweep.latency_example().id,
               "engine": engine.name, "engine_note": engine.note, "compiled": engine.compiled,
               "first_call_s": dict(engine.compile_s), "compile_cache": sweep.state.compile_cache,
               "timer": timer}
    gate = latency_gate(sweep.profile, name, figures["p50_s"], device_name())
    figures["failures"] = gate["failures"]
    record_variant(sweep.recorder, loaded)
    sweep.recorder.record(name, "latency", figures, engine=engine.name)
    sweep.recorder.record(name, "gates", {"latency": gate}, engine=engine.name)
    return figures


def measure_latency(sweep, name: str, rounds: int | None = None) -> dict[str, Any]:
    """``decode_call`` timed with a plain clock, after ``latency.warmup_rounds`` untimed calls."""
    call = decode_call(sweep, name)
    for _ in range(sweep.profile.latency.warmup_rounds):
        call()
    before, samples = machine_load(), []
    for _ in range(rounds or sweep.profile.latency.rounds):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    timer = "harness perf_counter" + (f" (xdist {worker}, GPU {os.environ.get('CUDA_VISIBLE_DEVICES')})"
                                      if worker else "")
    return record_latency(sweep, name, samples, before, machine_load(), timer=timer)
