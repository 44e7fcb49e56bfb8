"""The latency benchmark's library half: one timed unit (greedy-decode the fixed prompt to exactly
``latency.max_new_tokens`` tokens with a variant loaded), its rounds timed with a plain clock, and their summary
recorded with the latency gate. ``Sweep.decode_call``, ``Sweep.earlier_latency``, ``Sweep.measure_latency`` and
``Sweep.record_latency`` are these functions on the sweep; the benchmark suite times ``decode_call`` with
pytest-benchmark instead.

A figure timed earlier on this machine under the same key (``harness.measure.reuse``) is reused once
``latency.reuse_confirm_rounds`` fresh rounds confirm it; otherwise every round is timed.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from ..report.phases import note
from ..report.provenance import device_name
from ..report.recording import record_variant
from . import reuse
from .gates import latency_gate
from .timing import summarize_samples, time_rounds

__all__ = ["decode_call", "earlier_latency", "record_latency", "measure_latency"]


def decode_call(sweep, name: str) -> Callable[[], list[list[int]]]:
    """One timed unit with ``name`` loaded, once no background build shares the machine. A recompilation inside it is
    an error."""
    from ..engines.decoding import timed_round

    sweep.wait_for_kernels()
    return timed_round(sweep.load(name).engine, sweep.latency_prompt(), sweep.profile.latency.max_new_tokens)


def _key(sweep, name: str, rounds: int) -> dict[str, Any]:
    lat = sweep.profile.latency
    return reuse.reuse_key(reuse.key_parts(sweep, "latency", variant=name, rounds=rounds,
                                           warmup_rounds=lat.warmup_rounds,
                                           adapter=reuse.adapter_identity(sweep.load(name).manifest)))


def earlier_latency(sweep, name: str, rounds: int) -> dict[str, Any] | None:
    """``name``'s latency of ``rounds`` rounds timed earlier on this machine under this session's key, to be
    confirmed by ``latency.reuse_confirm_rounds`` fresh rounds (``record_latency``) before it is reused; None: time
    every round (no such figure, ``--retime``, reuse turned off, or no more rounds than the confirmation)."""
    confirm_rounds = sweep.profile.latency.reuse_confirm_rounds
    if sweep.retime or not confirm_rounds or rounds <= confirm_rounds:  # confirming would take as long as timing
        return None
    stored, why = reuse.earlier(sweep.runs_dir, sweep.profile.name, name, "latency", _key(sweep, name, rounds))
    note("reuse", f"{name} latency: " + ("an earlier figure, to confirm" if stored else f"timed afresh: {why}"))
    return stored


def record_latency(sweep, name: str, samples: list[float], load_before: dict, load_after: dict,
                   timer: str = "pytest-benchmark", earlier: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Summarize timed rounds of ``decode_call(sweep, name)`` (p50/p95, spread, machine load) and record them. With
    ``earlier`` (``earlier_latency``), ``samples`` are its confirmation rounds: the earlier figure is recorded,
    marked reused, when they confirm it; None when they do not (then time every round)."""
    loaded = sweep.load(name)
    engine, lat = loaded.engine, sweep.profile.latency
    if earlier is not None:
        check = reuse.confirm(earlier["p50_s"], samples, lat.max_new_tokens, load_before, load_after,
                              lat.reuse_tolerance)
        note("reuse", f"{name} latency: " + ("reused, confirmed by {} fresh rounds ({:+.1%})".format(
            check["rounds"], check["off"]) if check["held"] else f"timed afresh: {check['why_not']}"))
        if not check["held"]:
            return None
        figures = {k: v for k, v in earlier.items() if k not in ("provenance", "failures", "reused")}
        figures["reused"] = {**check, "session": sweep.recorder.session_id}
        provenance = earlier["provenance"]  # the run that timed the rounds
    else:
        figures = {**summarize_samples(samples, lat.max_new_tokens, load_before, load_after),
                   "warmup_rounds": lat.warmup_rounds, "prompt_id": sweep.latency_example().id,
                   "engine": engine.name, "engine_note": engine.note, "compiled": engine.compiled,
                   "first_call_s": dict(engine.compile_s), "compile_cache": sweep.state.compile_cache,
                   "timer": timer, "reuse_key": _key(sweep, name, len(samples))}
        provenance = None
    gate = latency_gate(sweep.profile, name, figures["p50_s"], device_name())
    figures["failures"] = gate["failures"]
    record_variant(sweep.recorder, loaded)
    sweep.recorder.record(name, "latency", figures, provenance=provenance, engine=engine.name)
    sweep.recorder.record(name, "gates", {"latency": gate}, engine=engine.name)
    return figures


def measure_latency(sweep, name: str, rounds: int | None = None, reuse_earlier: bool = True) -> dict[str, Any]:
    """``decode_call`` timed with a plain clock, after ``latency.warmup_rounds`` untimed calls; an earlier figure
    under the same key is reused when fresh rounds confirm it (``reuse_earlier=False``: time every round)."""
    lat = sweep.profile.latency
    rounds = rounds or lat.rounds
    call = decode_call(sweep, name)
    earlier = earlier_latency(sweep, name, rounds) if reuse_earlier else None
    for _ in range(lat.warmup_rounds):
        call()
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    timer = "harness perf_counter" + (f" (xdist {worker}, GPU {os.environ.get('CUDA_VISIBLE_DEVICES')})"
                                      if worker else "")
    if earlier is not None:
        figures = record_latency(sweep, name, *time_rounds(call, lat.reuse_confirm_rounds), timer=timer,
                                 earlier=earlier)
        if figures is not None:
            return figures
    return record_latency(sweep, name, *time_rounds(call, rounds), timer=timer)

