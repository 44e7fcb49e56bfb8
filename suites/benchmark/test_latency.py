"""Latency of greedy generation, measured by pytest-benchmark (pedantic mode), p50/p95 in extra_info.

Groups are per profile, so ``--benchmark-autosave`` then ``--benchmark-compare --benchmark-compare-fail=median:10%``
is a regression gate across runs on the same machine.
"""

from __future__ import annotations

import statistics

import pytest
import torch

from harness.prompt import encode_prompt
from harness.stats import percentile

pytestmark = [pytest.mark.slow, pytest.mark.benchmark]




def test_generate_latency(benchmark, loaded_variant, profile, splits, recorder, pytestconfig):
    lat = profile.latency
    rounds = pytestconfig.getoption("latency_runs") or lat.rounds
    by_id = {e.id: e for split in splits.values() for e in split}
    example = by_id.get(lat.prompt_id) or splits["validation"][0]
    prompt = encode_prompt(loaded_variant.tokenizer, example.instruction, example.input)
    engine = loaded_variant.engine
    on_gpu = torch.cuda.is_available()

    def generate_once():
        out = engine.generate([prompt], lat.max_new_tokens, batch_size=1, fixed_length=True)
        if on_gpu:
            torch.cuda.synchronize()  # the timed call ends when the GPU is done, not when kernels are queued
        return out

    benchmark.group = f"latency-{profile.name}"
    out = benchmark.pedantic(generate_once, rounds=rounds, warmup_rounds=lat.warmup_rounds, iterations=1)
    assert len(out[0]) == lat.max_new_tokens, "every round must decode the same number of tokens"
    if benchmark.disabled:
        pytest.skip("benchmarks disabled (--benchmark-disable): no latency figures")
    samples = list(benchmark.stats.stats.data)
    p50, p95 = percentile(samples, 50), percentile(samples, 95)
    figures = {
        "p50_s": p50, "p95_s": p95, "mean_s": statistics.fmean(samples), "rounds": len(samples),
        "warmup_rounds": lat.warmup_rounds, "new_tokens": lat.max_new_tokens,
        "tokens_per_s": lat.max_new_tokens / p50, "prompt_id": example.id, "samples_s": samples,
        "engine": engine.name, "engine_note": engine.note, "compiled": engine.compiled,
        "first_call_s": dict(engine.compile_s),  # per shape: the first call, compile included (not in the rounds)
    }
    benchmark.extra_info.update({k: v for k, v in figures.items() if k != "samples_s"})
    recorder.record(loaded_variant.variant.name, "latency", figures)
    assert p50 <= p95
