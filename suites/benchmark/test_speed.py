"""Engines compared in one session (``harness.engines.compare``): the seed path (NF4 + unmerged adapter, HF generate)
against the fast paths, on the same machine, variant (``inference.speed_variant``) and prompt.

Group ``speed``: pytest-benchmark times one library call per engine; ``extra_info`` carries p50/p95, the first call
(compile) time, the peak VRAM and the ratio to the seed path. ``merged``, the profile's engine, is not timed twice: when
the speed variant's latency test timed the same call earlier in the session, its rounds are ``merged``'s here
(``EngineComparison.from_latency``; the card names them). A comparison recorded earlier on this machine under the
same key is reused whole once fresh rounds of ``merged`` confirm it (``EngineComparison.reused``): its engines are
then neither built nor timed, and pytest-benchmark has no rounds for them. The parity tests hold each fast engine's
greedy tokens and logits against the seed path's on every evaluation prompt (``inference.parity_*`` in the profile).
"""

from __future__ import annotations

import pytest

from harness.measure.gates import quantized_quality_failures
from harness.measure.parity import parity_failures
from harness.measure.timing import machine_load

pytestmark = [pytest.mark.slow, pytest.mark.benchmark, pytest.mark.qlora_speed]


@pytest.mark.filterwarnings("ignore:Benchmark fixture was not used")  # a reused or shared figure times no round here
def test_engine_speed(benchmark, engine_name, engine_comparison, profile):
    """128 greedy tokens of the speed variant, per engine; the seed path runs first and sets the ratio's base."""
    if not benchmark.disabled and engine_comparison.reused():  # confirmed by fresh rounds of merged: nothing timed
        figures = engine_comparison.record_reused(engine_name)
    else:  # merged: the speed variant's latency rounds, when that test timed them in this session
        figures = engine_comparison.from_latency(engine_name)
    if figures is not None:
        benchmark.extra_info.update({k: v for k, v in figures.items() if k != "samples_s"})
        assert not figures["failures"], "\n".join(figures["failures"])
        return
    call = engine_comparison.call(engine_name)
    benchmark.group = "speed"
    before = machine_load()
    inf = profile.inference
    rounds = inf.speed_seed_rounds if engine_name == "seed" and inf.speed_seed_rounds else inf.speed_rounds
    out = benchmark.pedantic(call, rounds=rounds, warmup_rounds=1, iterations=1)
    assert len(out[0]) == profile.latency.max_new_tokens
    if benchmark.disabled:
        pytest.skip("benchmarks disabled (--benchmark-disable or xdist): no speed figures")
    figures = engine_comparison.record(engine_name, list(benchmark.stats.stats.data), before, machine_load())
    benchmark.extra_info.update({k: v for k, v in figures.items() if k != "samples_s"})
    assert not figures["failures"], "\n".join(figures["failures"])  # inference.speed_* for this device


@pytest.mark.parametrize("candidate", ["merged", "nf4-compiled"])
def test_engine_matches_seed(engine_comparison, profile, candidate):
    """A fast engine reproduces the seed path's greedy tokens (and logits, teacher-forced) on every eval prompt."""
    if candidate not in profile.inference.speed_engines:
        pytest.skip(f"{profile.source_file}: {candidate} is not in inference.speed_engines")
    failures = parity_failures(engine_comparison.parity(candidate), profile.inference)
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("quantized", ["merged-int8", "merged-int4"])
def test_quantized_engine_quality_cost_is_measured(engine_comparison, profile, quantized):
    """What a quantized engine's speed costs: its EM/F1 against the merged engine, for every variant on every
    evaluation split, paired per example; gated by ``inference.quantized_max_f1_loss`` where the profile sets one
    (the trade-off the user accepts). Only real weights make it mean anything."""
    if quantized not in profile.inference.speed_engines:
        pytest.skip(f"{profile.source_file}: {quantized} is not in inference.speed_engines")
    if profile.weights != "real":
        pytest.skip(f"{profile.name}: random weights, so a quality difference would mean nothing")
    result = engine_comparison.quality(quantized)
    assert set(result) == set(profile.variants)
    for variant, per_split in result.items():
        for split, q in per_split.items():
            assert q["n"] == q["n_paired"] == len(engine_comparison.sweep.splits[split]), (variant, split)
            assert 0.0 <= q["identical_predictions"] <= 1.0 and 0.0 <= q["token_agreement"] <= 1.0, (variant, split)
    failures = quantized_quality_failures(profile, result)
    assert not failures, "\n".join(failures)
