"""Latency of greedy generation: pytest-benchmark times one library call (``Sweep.decode_call``) in pedantic mode;
the library summarizes the rounds (p50/p95, spread, machine load) and records them.

Groups are per profile, so ``--benchmark-autosave`` then ``--benchmark-compare --benchmark-compare-fail=median:10%``
is a regression gate across runs on the same machine.
"""

from __future__ import annotations

import pytest

from harness.timing import machine_load

pytestmark = [pytest.mark.slow, pytest.mark.benchmark]


def test_generate_latency(benchmark, sweep, loaded, variant_name, pytestconfig):
    lat = sweep.profile.latency
    call = sweep.decode_call(variant_name)
    benchmark.group = f"latency-{sweep.profile.name}"
    before = machine_load()
    out = benchmark.pedantic(call, rounds=pytestconfig.getoption("latency_runs") or lat.rounds,
                             warmup_rounds=lat.warmup_rounds, iterations=1)
    assert len(out[0]) == lat.max_new_tokens, "every round must decode the same number of tokens"
    if benchmark.disabled:
        pytest.skip("benchmarks disabled (--benchmark-disable or xdist): no latency figures")
    figures = sweep.record_latency(variant_name, list(benchmark.stats.stats.data), before, machine_load())
    benchmark.extra_info.update({k: v for k, v in figures.items() if k != "samples_s"})
    assert 0 < figures["p50_s"] <= figures["p95_s"]
