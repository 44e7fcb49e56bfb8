"""Gates: the profile's thresholds applied to what the sweep measured. Each returns a list of failure messages
that name the figure, its value (and CI), the threshold and the YAML key, so a failing run says what to look at.

An empty list is a pass. The benchmark suites assert on these lists; the card shows which gates each variant passed.
"""

from __future__ import annotations

from typing import Any

from .config import Profile

__all__ = ["quality_failures", "quality_gate_count", "vram_failures", "vram_gate_count", "speed_failures",
           "gate_status"]


def quality_gate_count(profile: Profile, variant: str) -> int:
    return sum(variant in gate.variants for gate in profile.quality_gates)


def vram_gate_count(profile: Profile, variant: str, measured: dict[str, float | None]) -> int:
    """Ceilings that apply to ``variant`` and have a measured peak to hold against (none on a CPU)."""
    return sum(variant in profile.vram_ceilings_gib.get(phase, {}) and peak is not None
               for phase, peak in measured.items())


def quality_failures(profile: Profile, variant: str, summaries: dict[str, dict[str, Any]]) -> list[str]:
    """Every ``quality_gates`` entry that names ``variant``, against its split's EM/F1 summary."""
    failures = []
    for i, gate in enumerate(profile.quality_gates):
        if variant not in gate.variants:
            continue
        s = summaries.get(gate.split)
        if s is None:
            failures.append(f"{variant}: quality_gates[{i}] is on split {gate.split!r}, which the profile does not "
                            f"evaluate; add it to data.eval_splits in {profile.source_file}")
            continue
        value, (lo, hi) = s[gate.metric], s[f"{gate.metric}_ci"]
        where = f"{variant} {gate.metric.upper()} on {gate.split} = {value:.3f} (95% CI [{lo:.2f}, {hi:.2f}])"
        if gate.min is not None and value < gate.min:
            failures.append(f"{where} is below quality_gates[{i}].min {gate.min} ({profile.source_file})")
        if gate.max is not None and value > gate.max:
            failures.append(f"{where} is above quality_gates[{i}].max {gate.max} ({profile.source_file})")
        if gate.min_gain is not None:
            failures += _gain_failures(profile, variant, i, gate, s)
    return failures


def _gain_failures(profile: Profile, variant: str, i: int, gate, s: dict[str, Any]) -> list[str]:
    """The lower end of the paired-bootstrap CI of (variant F1 - baseline F1) must reach ``min_gain``: an adapter
    no better than no adapter fails, however high its absolute F1."""
    if "f1_delta_vs_baseline_ci" not in s:
        why = s.get("f1_delta_vs_baseline_note", "no baseline predictions were paired with this variant's")
        return [f"{variant}: quality_gates[{i}].min_gain {gate.min_gain} on {gate.split} has no paired ΔF1 to check: "
                f"{why} ({profile.source_file})"]
    delta, (lo, hi) = s["f1_delta_vs_baseline"], s["f1_delta_vs_baseline_ci"]
    if not (lo >= gate.min_gain):  # written so that NaN fails
        return [f"{variant} ΔF1 vs baseline on {gate.split} = {delta:+.3f} (paired 95% CI [{lo:+.2f}, {hi:+.2f}], "
                f"n={s.get('n_paired')}): the CI's lower end is below quality_gates[{i}].min_gain {gate.min_gain} "
                f"({profile.source_file})"]
    return []


def vram_failures(profile: Profile, variant: str, phase: str, peak_gib: float | None) -> list[str]:
    """The phase's peak (``train`` or ``inference``) against ``vram_ceilings_gib.<phase>.<variant>``."""
    ceiling = profile.vram_ceilings_gib.get(phase, {}).get(variant)
    if ceiling is None or peak_gib is None:
        return []
    if peak_gib > ceiling:
        return [f"{variant} {phase} peaked at {peak_gib:.2f} GiB allocated, over vram_ceilings_gib.{phase}.{variant} "
                f"= {ceiling} GiB ({profile.source_file})"]
    return []


def speed_failures(profile: Profile, engine: str, p50_s: float, speedup: float | None) -> list[str]:
    """The configured engine's p50 and its ratio to the seed path, against ``inference.speed_*``."""
    inf, failures = profile.inference, []
    if engine != inf.engine or engine == "seed":
        return []
    if inf.speed_max_p50_s is not None and p50_s > inf.speed_max_p50_s:
        failures.append(f"{engine} p50 {p50_s:.3f} s is over inference.speed_max_p50_s {inf.speed_max_p50_s} s "
                        f"({profile.source_file})")
    if inf.speed_min_speedup is not None:
        if speedup is None:
            failures.append(f"{engine}: no seed-path figure in this session to gate inference.speed_min_speedup "
                            f"against; run the seed engine first (inference.speed_engines)")
        elif speedup < inf.speed_min_speedup:
            failures.append(f"{engine} is {speedup:.2f}x the seed path, under inference.speed_min_speedup "
                            f"{inf.speed_min_speedup}x ({profile.source_file})")
    return failures


def gate_status(gates: dict[str, Any] | None) -> str:
    """One card cell: ``pass (2 quality, 1 vram)``, ``FAIL (quality)``, ``no gates`` or ``not run``."""
    if not gates:
        return "not run"
    kinds = {k: v for k, v in gates.items() if k != "provenance" and isinstance(v, dict)}
    failed = [k for k, v in kinds.items() if v.get("failures")]
    if failed:
        return f"FAIL ({', '.join(failed)})"
    checked = [f"{v['checked']} {k}" for k, v in kinds.items() if v.get("checked")]
    return f"pass ({', '.join(checked)})" if checked else "no gates"
