"""Latency of greedy generation: pytest-benchmark times one library call (``Sweep.decode_call``) in pedantic mode;
the library summarizes the rounds (p50/p95, spread, machine load) and records them.

Under pytest-xdist pytest-benchmark disables itself (workers would share one machine's cores, and it gathers no
worker statistics). When every worker has a GPU of its own (the plugin pins one per worker), the rounds are timed by
the library's own loop around the same call (``Sweep.measure_latency``), and the figures say so (``timer``).

Groups are per profile, so ``--benchmark-autosave`` then ``--benchmark-compare --benchmark-compare-fail=median:10%``
is a regression gate across runs on the same machine.

A figure timed earlier on this machine under the same key (code, libraries, config, data, adapter, machine:
``harness.measure.reuse``) is reused when ``latency.reuse_confirm_rounds`` fresh rounds, timed here by
pytest-benchmark, confirm it; when they do not, every round is timed again. ``--retime`` times every round.
"""

from __future__ import annotations

import pytest

from harness.measure.timing import machine_load, own_gpu

pytestmark = [pytest.mark.slow, pytest.mark.benchmark]


def test_generate_latency(benchmark, sweep, loaded, variant_name, pytestconfig):
    lat = sweep.profile.latency
    rounds = pytestconfig.getoption("latency_runs") or lat.rounds
    call = sweep.decode_call(variant_name)
    benchmark.group = f"latency-{sweep.profile.name}"
    earlier = None if benchmark.disabled else sweep.earlier_latency(variant_name, rounds)  # to confirm, then reuse
    before = machine_load()
    out = benchmark.pedantic(call, rounds=lat.reuse_confirm_rounds if earlier else rounds,
                             warmup_rounds=lat.warmup_rounds, iterations=1)
    assert len(out[0]) == lat.max_new_tokens, "every round must decode the same number of tokens"
    if benchmark.disabled and not own_gpu():
        pytest.skip("benchmarks disabled (--benchmark-disable, or xdist workers sharing a device): no latency figures")
    if benchmark.disabled:  # xdist, one GPU per worker: pytest-benchmark refuses to time, the library's clock does
        figures = sweep.measure_latency(variant_name, rounds)
    else:
        figures = sweep.record_latency(variant_name, list(benchmark.stats.stats.data), before, machine_load(),
                                       earlier=earlier)
        if figures is None:  # the fresh rounds did not confirm the earlier figure: every round, on the library's clock
            figures = sweep.measure_latency(variant_name, rounds, reuse_earlier=False)
    benchmark.extra_info.update({k: v for k, v in figures.items() if k != "samples_s"})
    assert 0 < figures["p50_s"] <= figures["p95_s"]
    assert not figures["failures"], "\n".join(figures["failures"])  # latency.max_p50_s for this device
