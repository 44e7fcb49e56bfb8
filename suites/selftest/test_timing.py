"""The marks (‡) judge the machine while the rounds ran, not the harness's own work just before them, and say
whether it was busy or the rounds spread on their own."""

from __future__ import annotations

import time

from harness.measure.timing import doubt, machine_load, others_cores, summarize_samples

STEADY = [1.00, 1.01, 0.99, 1.00, 1.02]  # rounds that agree: IQR/median 0.01


def _reading(clock_s: float, machine_cpu_s: float, own_cpu_s: float, load1: float, cpus: int = 2) -> dict:
    return {"load1": load1, "cpus": cpus, "machine_cpu_s": machine_cpu_s, "own_cpu_s": own_cpu_s, "clock_s": clock_s}


def test_a_quiet_two_core_machine_right_after_training_gets_no_busy_mark():
    """The seen case: training had just kept both cores busy, so the trailing 1-minute load read 2.4 on 2 cores;
    during the rounds every busy CPU second on the machine was the timed code's own. A rule that reads the load
    average marks this ‡ (it did, for every smollm2-135m latency); the machine was quiet."""
    before = _reading(100.0, 5000.0, 900.0, load1=2.4)
    after = _reading(105.0, 5009.5, 909.5, load1=2.3)  # 9.5 CPU s in 5 s: ours, on both cores
    figures = summarize_samples(STEADY, 128, before, after)
    assert figures["busy"] is False and figures["busy_reason"] is None, figures["busy_reason"]
    assert figures["others_cores"] == 0.0


def test_other_processes_on_the_cores_while_the_rounds_ran_mark_the_figure_busy():
    before = _reading(100.0, 5000.0, 900.0, load1=0.1)  # the load average has not caught up yet
    after = _reading(105.0, 5014.0, 906.0, load1=0.9)  # others: 14 - 6 = 8 CPU s in 5 s = 1.6 cores
    figures = summarize_samples(STEADY, 128, before, after)
    assert figures["busy"] and figures["busy_reason"] == "other processes kept 1.6 of 2 cores busy"


def test_one_background_core_on_a_large_host_is_not_busy_but_a_quarter_of_it_is():
    before = _reading(0.0, 0.0, 0.0, load1=1.0, cpus=16)
    assert not summarize_samples(STEADY, 128, before, _reading(10.0, 20.0, 10.0, load1=1.0, cpus=16))["busy"]
    assert summarize_samples(STEADY, 128, before, _reading(10.0, 50.0, 10.0, load1=1.0, cpus=16))["busy"]


def test_disagreeing_rounds_on_an_idle_machine_are_unsteady_not_busy_and_the_mark_says_which():
    """The seed path on one H200 spread by 14% and 29% with other processes on 0.01 cores (issue 18's try 25): the
    mark says the rounds spread, not that the machine was busy; with other processes' load it says busy."""
    before, after = _reading(0.0, 0.0, 0.0, 0.0), _reading(5.0, 5.0, 5.0, 0.0)
    idle = summarize_samples([1.0, 1.5, 0.8, 1.9, 1.0], 128, before, after)
    assert idle["unsteady"] and not idle["busy"] and idle["unsteady_reason"] == "IQR/median 0.50 > 0.1"
    assert doubt(idle) == "its rounds spread (IQR/median 0.50 > 0.1) while other processes kept 0.0 cores busy"
    loaded = summarize_samples([1.0, 1.5, 0.8, 1.9, 1.0], 128, before, _reading(5.0, 14.0, 5.0, 0.0))
    assert loaded["busy"] and loaded["unsteady"]
    assert doubt(loaded) == ("timed on a busy machine (other processes kept 1.8 of 2 cores busy); its rounds spread "
                             "(IQR/median 0.50 > 0.1)")
    assert doubt(summarize_samples(STEADY, 128, before, after)) is None
    # no CPU counters (no /proc): nothing tells a spread from other processes' load, so it is busy, never reused
    blind = {**before, "machine_cpu_s": float("nan")}
    unknown = summarize_samples([1.0, 1.5, 0.8, 1.9, 1.0], 128, blind, {**after, "machine_cpu_s": float("nan")})
    assert unknown["busy"] and unknown["busy_reason"] == "IQR/median 0.50 > 0.1, no CPU counters"
    assert not summarize_samples(STEADY, 128, blind, {**after, "machine_cpu_s": float("nan")})["busy"]


def test_the_machine_counter_includes_this_process_so_subtracting_it_leaves_the_others():
    """Real counters around real work of this process: the machine's busy seconds include ours (same unit, same
    clock), so ``others_cores`` removes our own work rather than reading it as another process's."""
    before = machine_load()
    end = time.process_time() + 0.5
    while time.process_time() < end:  # 0.5 s of this process's CPU
        pass
    after = machine_load()
    own = after["own_cpu_s"] - before["own_cpu_s"]
    machine = after["machine_cpu_s"] - before["machine_cpu_s"]
    assert own >= 0.45 and machine >= own - 0.05, (own, machine)  # clock ticks are 10 ms
    others = others_cores(before, after)
    # the two counters tick apart (10 ms): machine - own can read a tick below 0, which others_cores clamps to 0
    assert others is not None and others <= max(machine - own, 0.0) / (after["clock_s"] - before["clock_s"]) + 1e-9


def test_a_reading_without_cpu_counters_is_judged_by_the_spread_alone():
    """Readings from before these counters (or without /proc) give no others figure; the load average alone no
    longer marks a figure busy."""
    old_before, old_after = {"load1": 3.0, "cpus": 2}, {"load1": 3.0, "cpus": 2}
    figures = summarize_samples(STEADY, 128, old_before, old_after)
    assert figures["others_cores"] is None and not figures["busy"]
