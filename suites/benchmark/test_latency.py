"""Latency of greedy generation: pytest-benchmark times one library call (``Sweep.decode_call``) in pedantic mode;
the library summarizes the rounds (p50/p95, spread, machine load) and records them.

Under pytest-xdist pytest-benchmark disables itself (workers would share one machine's cores, and it gathers no
worker statistics). When every worker has a GPU of its own (the plugin pins one per worker), the rounds are timed by
the library's own loop around the same call (``Sweep.measure_latency``), and the figures say so (``timer``).

Groups are per profile, so ``--benchmark-autosave`` then ``--benchmark-compare --benchmark-compare-fail=median:10%``
is a regression gate across runs on the same machine.
"""

from __future__ import annotations

import pytest

from harness.measure.timing import machine_load, own_gpu

pytestmark = [pytest.mark.slow, pytest.mark.benchmark]


def test_generate_latency(benchmark, sweep, loaded, variant_name, pytestconfig):
    lat = sweep.profile.latency
    call = sweep.decode_call(variant_name)
    benchmark.group = f"latency-{sweep.profile.name}"
    before = machine_load()
    out = benchmark.pedantic(call, rounds=pytestconfig.getoption("latency_runs") or lat.rounds,
                             warmup_rounds=lat.warmup_rounds, iterations=1)
    assert len(out[0]) == lat.max_new_tokens, "every round must decode the same number of tokens"
    if benchmark.disabled and not own_gpu():
        pytest.skip("benchmarks disabled (--benchmark-disable, or xdist workers sharing a device): no latency figures")
    if benchmark.disabled:  # xdist, one GPU per worker: pytest-benchmark refuses to time, the library's clock does
        figures = sweep.measure_latency(variant_name, pytestconfig.getoption("latency_runs") or lat.rounds)
    else:
        figures = sweep.record_latency(variant_name, list(benchmark.stats.stats.data), before, machine_load())
    benchmark.extra_info.update({k: v for k, v in figures.items() if k != "samples_s"})
    assert 0 < figures["p50_s"] <= figures["p95_s"]
    assert not figures["failures"], "\n".join(figures["failures"])  # latency.max_p50_s for this device
