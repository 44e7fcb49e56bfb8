"""Latency, speed and VRAM gates held to committed GPU figures: each passes on what was measured and fails when its
limit is set just past it, so a first run on a new runner can fail (no saved benchmark is needed). A GPU the profile
has no limit for is reported, never passed silently."""

from __future__ import annotations

import dataclasses
import json

import pytest

from fixtures.user_runs import REPO, write_profile
from harness.report.card_render import render_section
from harness.config.errors import ConfigError
from harness.config.profiles import load_profile
from harness.measure.gates import (device_key, gate_status, latency_failures, speed_failures, unchecked_ceilings,
                           vram_failures)

H100, H200, A100 = "NVIDIA H100 80GB HBM3", "NVIDIA H200", "NVIDIA A100-SXM4-80GB"


def _variants(run: str) -> dict:
    return json.loads((REPO / "results" / run / "results.json").read_text(encoding="utf-8"))["variants"]


# The committed cold runs of synthetic-7b (merged engine, 128 tokens) at the engine's current code: eight H100s
# (46101af; 63a31d2 and 86b428c an hour apart, the second on a slow host; fc0b811, 5a961e1, ca6d6d0, 420ba55 and
# a8f1743) and two H200s (2f7e11b, e67b793).
H100_SHAS = ("46101af", "63a31d2", "86b428c", "fc0b811", "5a961e1", "ca6d6d0", "420ba55", "a8f1743")
H100_RUNS = [_variants(f"h100/synthetic-7b/{sha}-cold") for sha in H100_SHAS]
H100_RUN = H100_RUNS[0]
H200_RUNS = [_variants(f"h200/synthetic-7b/{sha}-cold") for sha in ("2f7e11b", "e67b793")]
H200_RUN = H200_RUNS[0]
H200_P50_S = H200_RUN["r16"]["latency"]["p50_s"]  # 0.560 s
H200_SPEED = H200_RUN["r16"]["speed"]["merged"]  # 0.555 s, 18.3x the seed path
H200_VRAM_GIB = H200_RUN["r16"]["memory"]["inference_peak_allocated_gib"]  # 13.96 GiB


def _with(profile, section: str, **changes):
    return dataclasses.replace(profile, **{section: dataclasses.replace(getattr(profile, section), **changes)})


@pytest.mark.parametrize(("name", "key"), [(H100, "H100"), (H200, "H200"), ("NVIDIA H100 PCIe", "H100"),
                                           ("NVIDIA H100 NVL", "H100 NVL"), (A100, None),
                                           ("cpu (x86_64, 2 cores)", "cpu")])
def test_a_device_key_matches_the_words_of_the_device_name(name, key):
    assert device_key(["H200", "H100", "H100 NVL", "cpu"], name) == key


def test_two_equally_specific_matching_keys_are_an_error():
    with pytest.raises(ValueError, match="matches both"):
        device_key(["H100", "80GB"], H100)


def test_the_vram_gate_passes_the_measured_peak_and_fails_a_ceiling_under_it():
    profile = load_profile("synthetic-7b")
    peak = H100_RUN["r16"]["memory"]["inference_peak_allocated_gib"]  # 13.96 GiB
    assert vram_failures(profile, "r16", "inference", peak, H100) == []
    assert vram_failures(profile, "r16", "inference", H200_VRAM_GIB, H200) == []
    tight = dataclasses.replace(profile, vram_ceilings_gib={"inference": {"r16": {"H100": 13.5}}})
    [failure] = vram_failures(tight, "r16", "inference", peak, H100)
    assert "r16 inference peaked at 13.96 GiB allocated, over vram_ceilings_gib.inference.r16 [H100] = 13.5" in failure
    train_peak = H100_RUN["r16"]["training"]["train_peak_allocated_gib"]
    assert vram_failures(profile, "r16", "train", train_peak, H100) == []
    assert vram_failures(dataclasses.replace(profile, vram_ceilings_gib={"train": {"r16": 4.0}}), "r16", "train",
                         train_peak, H100)  # a plain number holds on every device


def test_the_latency_gate_passes_the_measured_p50_and_fails_a_ceiling_under_it():
    profile = load_profile("synthetic-7b")
    p50 = H100_RUN["r16"]["latency"]["p50_s"]  # 0.693 s
    assert latency_failures(profile, "r16", p50, H100) == []
    assert latency_failures(profile, "r16", H200_P50_S, H200) == []
    runs = [(run, H100) for run in H100_RUNS] + [(run, H200) for run in H200_RUNS]
    for run, device in runs:  # a 10% slowdown of any variant of any run fails on a first run
        for name, figures in run.items():
            assert latency_failures(profile, name, figures["latency"]["p50_s"], device) == []
            assert latency_failures(profile, name, figures["latency"]["p50_s"] * 1.1, device) != [], (name, device)
    assert latency_failures(profile, "r16", p50, H200) != []  # the H100's speed on an H200 is a regression
    tight = _with(profile, "latency", max_p50_s={"H100": 0.65})
    [failure] = latency_failures(tight, "r16", p50, H100)
    assert f"r16 latency p50 0.693 s on {H100} is over latency.max_p50_s [H100] 0.65 s" in failure


def test_the_speed_gates_pass_the_measured_ratio_and_fail_a_ratio_above_it():
    profile = load_profile("synthetic-7b")
    merged = H100_RUN["r16"]["speed"]["merged"]  # 0.693 s, 10.09x the seed path
    assert speed_failures(profile, "merged", merged["p50_s"], merged["speedup_vs_seed"], H100) == []
    assert speed_failures(profile, "merged", H200_SPEED["p50_s"], H200_SPEED["speedup_vs_seed"], H200) == []
    assert speed_failures(profile, "merged", H200_SPEED["p50_s"] * 1.1, H200_SPEED["speedup_vs_seed"] / 1.1, H200)
    for run, device in [(run, H100) for run in H100_RUNS] + [(run, H200) for run in H200_RUNS]:
        fig = run["r16"]["speed"]["merged"]
        assert speed_failures(profile, "merged", fig["p50_s"], fig["speedup_vs_seed"], device) == []
        assert speed_failures(profile, "merged", fig["p50_s"] * 1.1, fig["speedup_vs_seed"], device) != []
    tight = _with(profile, "inference", speed_min_speedup={"H100": 16})
    [failure] = speed_failures(tight, "merged", merged["p50_s"], merged["speedup_vs_seed"], H100)
    assert f"merged is 10.09x the seed path on {H100}, under inference.speed_min_speedup [H100] 16" in failure
    slow = _with(profile, "inference", speed_max_p50_s={"H100": 0.65})
    assert "over inference.speed_max_p50_s [H100] 0.65 s" in speed_failures(slow, "merged", merged["p50_s"],
                                                                           merged["speedup_vs_seed"], H100)[0]


def test_a_gpu_without_a_limit_is_not_gated_and_the_card_says_so():
    """An A100 runs the 7B profile: no figure is gated, and each unchecked limit is named in the gates cell and
    in a footnote, so the card never shows a bare 'pass'."""
    profile = load_profile("synthetic-7b")
    assert latency_failures(profile, "r16", 5.0, A100) == []
    assert vram_failures(profile, "r16", "inference", 99.0, A100) == []
    notes = {kind: unchecked_ceilings(profile, kind, A100, "r16") for kind in ("latency", "vram", "speed")}
    assert notes["latency"] == [f"latency.max_p50_s has no limit for {A100!r} (set for H200, H100): not gated on this "
                                f"device; add its measured figure to the profile"]
    assert len(notes["vram"]) == 2 and len(notes["speed"]) == 2
    assert unchecked_ceilings(profile, "latency", H200) == []
    gates = {"quality": {"checked": 0, "failures": []}, "latency": {"checked": 0, "failures": [],
                                                                     "unchecked": notes["latency"]}}
    assert gate_status(gates) == "no gates; no latency limit for this device"
    results = {"profile": "synthetic-7b", "variant_order": ["r16"], "eval_splits": ["validation"],
               "show_quality": False, "variants": {"r16": {"gates": gates}}}
    assert f"- `r16` gates: latency.max_p50_s has no limit for {A100!r}" in render_section(results)


@pytest.mark.parametrize(("overrides", "expected"), [
    ({"latency": {"max_p50_s": {"H100": -1}}}, "latency.max_p50_s.H100: -1.0 is out of range; must be > 0.0"),
    ({"inference": {"speed_min_speedup": {}}}, "inference.speed_min_speedup: an empty mapping gates nothing"),
    ({"vram_ceilings_gib": {"inference": {"r8": {"H100": "lots"}}}},
     "vram_ceilings_gib.inference.r8.H100: expected a positive, finite number of GiB, got 'lots'"),
], ids=["negative-latency", "empty-mapping", "vram-string"])
def test_per_device_limits_are_validated_naming_file_line_and_device(tmp_path, overrides, expected):
    with pytest.raises(ConfigError) as info:
        load_profile(write_profile(tmp_path / "p", overrides))
    assert expected in str(info.value) and "profile.yaml:" in str(info.value), str(info.value)


@pytest.mark.slow
def test_the_latency_suite_fails_a_ceiling_under_the_measured_p50_on_this_machine(tmp_path):
    """End to end on the CPU: the benchmark's latency test, baseline of tiny, with ``latency.max_p50_s`` for ``cpu``
    set far under any real p50, fails naming the key; the gates cell records the failure."""
    from fixtures.user_runs import quick_profile, run_pytest
    from harness.report.results import load_results

    profile = quick_profile(tmp_path / "p", {"variants": ["baseline"], "latency": {"max_p50_s": {"cpu": 1e-6}}})
    runs = tmp_path / "runs"
    result = run_pytest(profile, runs, tmp_path / "MODEL_CARD.md", str(REPO / "suites/benchmark/test_latency.py"),
                        "--no-card")
    assert result.returncode == pytest.ExitCode.TESTS_FAILED, result.stdout[-3000:]
    assert "is over latency.max_p50_s [cpu] 1e-06 s" in result.stdout, result.stdout[-3000:]
    gates = load_results(runs / "tiny" / "results.json")["variants"]["baseline"]["gates"]
    assert gates["latency"]["checked"] == 1 and gate_status(gates) == "FAIL (latency)"
