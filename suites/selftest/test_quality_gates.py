"""The paired ΔF1 gate (``quality_gates[].min_gain``, harness/gates.py): the lower end of the paired-bootstrap CI of
a variant's F1 minus the baseline's must reach the threshold. An adapter no better than no adapter fails it however
high its absolute F1; a variant with no paired baseline fails it rather than passing unchecked. The real-weights
mutation (an untrained adapter) is in test_real_weights.py."""

from __future__ import annotations

import pytest

from harness.config.profiles import load_profile
from harness.measure.evaluate import compare_to_baseline
from harness.measure.gates import quality_failures, quantized_quality_failures

PROFILE = "smollm2-135m"  # min_gain on train, beside absolute EM/F1 gates
CFG = load_profile(PROFILE).eval


def _rows(f1s: list[float]) -> list[dict]:
    return [{"id": f"train-{i:03d}", "f1": f} for i, f in enumerate(f1s)]


def _summary(variant_f1: list[float], baseline_f1: list[float]) -> dict:
    mean = sum(variant_f1) / len(variant_f1)
    return {"em": mean, "em_ci": [mean, mean], "f1": mean, "f1_ci": [mean, mean],
            **compare_to_baseline(_rows(variant_f1), _rows(baseline_f1), CFG)}


def _gain_failures(summary: dict) -> list[str]:
    return [f for f in quality_failures(load_profile(PROFILE), "r16", {"train": summary}) if "min_gain" in f]


def test_a_learned_adapter_passes_the_gain_gate():
    assert _gain_failures(_summary([1.0] * 20, [0.05] * 19 + [0.0])) == []


@pytest.mark.parametrize("variant_f1, baseline_f1", [
    pytest.param([0.3] * 20, [0.3] * 20, id="equal-to-the-base-model"),
    pytest.param([1.0] * 10 + [0.0] * 10, [0.0] * 10 + [1.0] * 10, id="better-on-half-worse-on-half"),
])
def test_an_adapter_no_better_than_no_adapter_fails_the_gain_gate(variant_f1, baseline_f1):
    """Each passes an absolute min-F1 gate set below its F1, so only the paired gain can catch it."""
    (failure,) = _gain_failures(_summary(variant_f1, baseline_f1))
    assert "quality_gates[4].min_gain 0.7" in failure and PROFILE in failure and "paired 95% CI" in failure


def test_a_variant_without_a_paired_baseline_fails_the_gain_gate_saying_why():
    note = "ΔF1 n/a: the baseline's predictions cover 3 of these 20 examples; evaluate the baseline on this data"
    (failure,) = _gain_failures({"em": 1.0, "em_ci": [1, 1], "f1": 1.0, "f1_ci": [1, 1],
                                 "f1_delta_vs_baseline_note": note})
    assert "has no paired ΔF1 to check" in failure and note in failure


def test_a_nan_gain_fails():
    summary = {**_summary([1.0] * 20, [0.0] * 20), "f1_delta_vs_baseline_ci": [float("nan"), 1.0]}
    assert len(_gain_failures(summary)) == 1


def _cost(engine_f1: list[float], merged_f1: list[float]) -> dict:
    """``EngineComparison.quality``'s summary for one split, built the way it builds it (paired per example)."""
    mean = sum(engine_f1) / len(engine_f1)
    paired = {k.replace("_vs_baseline", "_vs_merged"): v
              for k, v in compare_to_baseline(_rows(engine_f1), _rows(merged_f1), CFG).items()}
    same = sum(a == b for a, b in zip(engine_f1, merged_f1, strict=True)) / len(engine_f1)
    return {"engine": "merged-int4", "f1": mean, "f1_merged": sum(merged_f1) / len(merged_f1),
            "identical_predictions": same, **paired}


def test_a_quantized_engine_that_answers_nothing_right_fails_its_loss_gate():
    """Mutation: the H200 run at c8dd8a0, where merged-int4 scored F1 0.0 against merged's 1.0 on r16's train split
    (results/h200/smollm2-135m-bf16/c8dd8a0/): the cost was reported and passed; the gate fails it, naming the key."""
    profile = load_profile("smollm2-135m-bf16")
    broken = {"r16": {"train": _cost([0.0] * 20, [1.0] * 20)}}
    failures = quantized_quality_failures(profile, broken)
    assert len(failures) == 1 and "merged-int4 on r16/train" in failures[0]
    assert "inference.quantized_max_f1_loss 0.5" in failures[0] and "smollm2-135m-bf16.yaml" in failures[0]


def test_a_small_or_uncertain_quantized_loss_passes_and_no_limit_gates_nothing():
    profile = load_profile("smollm2-135m-bf16")
    small = {"r16": {"train": _cost([1.0] * 18 + [0.5, 0.0], [1.0] * 20)},  # lost one answer and a half
             "baseline": {"test": _cost([0.0] * 5, [0.06] * 5)}}
    assert quantized_quality_failures(profile, small) == []
    broken = {"r16": {"train": _cost([0.0] * 20, [1.0] * 20)}}
    assert quantized_quality_failures(load_profile("tiny"), broken) == []  # tiny sets no limit: reported only
