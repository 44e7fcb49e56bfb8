"""Gates: the profile's thresholds applied to what the sweep measured. Each returns a list of failure messages
that name the figure, its value (and CI), the threshold and the YAML key, so a failing run says what to look at.

An empty list is a pass. The benchmark suites assert on these lists; the card shows which gates each variant passed.

Latency, speed and VRAM limits depend on the GPU, so each may be one number (every device) or a mapping of device
to number, e.g. ``latency.max_p50_s: {H200: 0.8, H100: 1.0}``. A device key matches the device's name
(``torch.cuda.get_device_name``, or ``cpu (...)`` without CUDA) when the key's words appear in the name's words, in
order, ignoring case (words split at spaces, ``-``, ``_``, ``(``, ``)``, ``,``): ``H200`` matches ``NVIDIA H200``,
``H100`` matches ``NVIDIA H100 80GB HBM3``, ``cpu`` matches ``cpu (x86_64, 2 cores)``. Of several matching keys the
one with the most words wins (``H100 NVL`` over ``H100``). A device that no key matches is not gated: the
``*_unchecked`` functions say so, and the card shows it; it never passes silently.
"""

from __future__ import annotations

import re
from typing import Any

from ..config.schema import Profile

__all__ = ["quality_failures", "quality_gate_count", "vram_failures", "vram_gate_count", "vram_gate", "speed_failures",
           "latency_failures", "latency_gate", "quantized_quality_failures", "gate_status", "device_key", "per_device",
           "vram_ceiling", "unchecked_ceilings"]


def _words(text: str) -> list[str]:
    return [w for w in re.split(r"[\s\-_(),]+", text.lower()) if w]


def device_key(keys, device: str) -> str | None:
    """The key of ``keys`` that names ``device`` (see the module doc), or None when none does."""
    name, best = _words(device), []
    for key in keys:
        k = _words(str(key))
        if k and any(name[i:i + len(k)] == k for i in range(len(name) - len(k) + 1)):
            best.append((len(k), str(key)))
    if not best:
        return None
    best.sort(reverse=True)
    if len(best) > 1 and best[0][0] == best[1][0]:
        raise ValueError(f"device {device!r} matches both {best[0][1]!r} and {best[1][1]!r}; give one a more "
                         f"specific name (e.g. 'H100 NVL')")
    return best[0][1]


def per_device(value: Any, device: str) -> tuple[float | None, str | None]:
    """(the limit for ``device``, the matched key): a plain number holds on every device (key None)."""
    if not isinstance(value, dict):
        return value, None
    key = device_key(value, device)
    return (None, None) if key is None else (value[key], key)


def _label(key: str | None) -> str:
    return f" [{key}]" if key else ""


def _unchecked(value: Any, device: str, yaml_key: str) -> list[str]:
    if not isinstance(value, dict) or per_device(value, device)[0] is not None:
        return []
    return [f"{yaml_key} has no limit for {device!r} (set for {', '.join(map(str, value))}): not gated on this "
            f"device; add its measured figure to the profile"]


def vram_ceiling(profile: Profile, phase: str, variant: str, device: str) -> float | None:
    return per_device(profile.vram_ceilings_gib.get(phase, {}).get(variant), device)[0]


def unchecked_ceilings(profile: Profile, kind: str, device: str, variant: str | None = None) -> list[str]:
    """Per-device limits of ``kind`` (``vram``, ``latency`` or ``speed``) that have no entry for ``device``."""
    if kind == "vram":
        return [note for phase in ("train", "inference")
                for note in _unchecked(profile.vram_ceilings_gib.get(phase, {}).get(variant), device,
                                       f"vram_ceilings_gib.{phase}.{variant}")]
    if kind == "latency":
        return _unchecked(profile.latency.max_p50_s, device, "latency.max_p50_s")
    inf = profile.inference
    return (_unchecked(inf.speed_max_p50_s, device, "inference.speed_max_p50_s")
            + _unchecked(inf.speed_min_speedup, device, "inference.speed_min_speedup"))


def quality_gate_count(profile: Profile, variant: str, compared: bool = False) -> int:
    """Quality gates naming ``variant``, plus one per evaluated split when compared with a saved run."""
    return sum(variant in gate.variants for gate in profile.quality_gates) + (
        len(profile.data.eval_splits) if compared else 0)


def vram_gate_count(profile: Profile, variant: str, measured: dict[str, float | None], device: str) -> int:
    """Ceilings that apply to ``variant`` on ``device`` and have a measured peak to hold against (none on a CPU)."""
    return sum(vram_ceiling(profile, phase, variant, device) is not None and peak is not None
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


def vram_gate(profile: Profile, variant: str, measured: dict[str, float | None], failures: list[str],
              device: str) -> dict[str, Any]:
    """The ``gates`` entry of a variant's VRAM peaks: ceilings checked, failures, ceilings without ``device``."""
    return {"checked": vram_gate_count(profile, variant, measured, device), "failures": failures,
            "unchecked": unchecked_ceilings(profile, "vram", device, variant)}


def vram_failures(profile: Profile, variant: str, phase: str, peak_gib: float | None, device: str) -> list[str]:
    """The phase's peak (``train`` or ``inference``) against ``vram_ceilings_gib.<phase>.<variant>`` for ``device``."""
    ceiling, key = per_device(profile.vram_ceilings_gib.get(phase, {}).get(variant), device)
    if ceiling is None or peak_gib is None:
        return []
    if peak_gib > ceiling:
        return [f"{variant} {phase} peaked at {peak_gib:.2f} GiB allocated, over vram_ceilings_gib.{phase}.{variant}"
                f"{_label(key)} = {ceiling} GiB ({profile.source_file})"]
    return []


def latency_failures(profile: Profile, variant: str, p50_s: float, device: str) -> list[str]:
    """A variant's latency p50 (the profile's engine) against ``latency.max_p50_s`` for ``device``."""
    ceiling, key = per_device(profile.latency.max_p50_s, device)
    if ceiling is None or p50_s <= ceiling:
        return []
    return [f"{variant} latency p50 {p50_s:.3f} s on {device} is over latency.max_p50_s{_label(key)} {ceiling} s "
            f"({profile.source_file})"]


def latency_gate(profile: Profile, variant: str, p50_s: float, device: str) -> dict[str, Any]:
    """The ``gates`` entry of a latency figure: limits checked, failures, limits with no entry for ``device``."""
    return {"checked": int(per_device(profile.latency.max_p50_s, device)[0] is not None),
            "failures": latency_failures(profile, variant, p50_s, device),
            "unchecked": unchecked_ceilings(profile, "latency", device)}


def speed_failures(profile: Profile, engine: str, p50_s: float, speedup: float | None, device: str) -> list[str]:
    """The configured engine's p50 and its ratio to the seed path, against ``inference.speed_*`` for ``device``."""
    inf, failures = profile.inference, []
    if engine != inf.engine or engine == "seed":
        return []
    max_p50, key = per_device(inf.speed_max_p50_s, device)
    if max_p50 is not None and p50_s > max_p50:
        failures.append(f"{engine} p50 {p50_s:.3f} s on {device} is over inference.speed_max_p50_s{_label(key)} "
                        f"{max_p50} s ({profile.source_file})")
    min_speedup, key = per_device(inf.speed_min_speedup, device)
    if min_speedup is not None:
        if speedup is None:
            failures.append(f"{engine}: no seed-path figure in this session to gate inference.speed_min_speedup "
                            f"against; run the seed engine first (inference.speed_engines)")
        elif speedup < min_speedup:
            failures.append(f"{engine} is {speedup:.2f}x the seed path on {device}, under "
                            f"inference.speed_min_speedup{_label(key)} {min_speedup}x ({profile.source_file})")
    return failures


def quantized_quality_failures(profile: Profile, cost: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """``inference.quantized_max_f1_loss`` applied to a quantized engine's cost (``EngineComparison.quality``:
    {variant: {split: summary}}): a variant fails on a split when the upper end of the paired CI of its F1 minus the
    merged engine's is below -limit, i.e. the loss is surely larger. A NaN fails. None: not gated."""
    limit = profile.inference.quantized_max_f1_loss
    if limit is None:
        return []
    failures = []
    for variant, per_split in cost.items():
        for split, q in per_split.items():
            ci = q.get("f1_delta_vs_merged_ci")
            if ci is None:  # nothing paired: the gate cannot say the cost is small
                failures.append(f"{q['engine']} on {variant}/{split}: no paired F1 difference to hold to "
                                f"inference.quantized_max_f1_loss ({q.get('f1_delta_vs_merged_note', 'no CI')})")
                continue
            upper = ci[1]
            if not upper >= -limit:  # written so that NaN fails
                failures.append(f"{q['engine']} on {variant}/{split}: F1 {q['f1']:.3f} against merged's "
                                f"{q['f1_merged']:.3f}, paired 95% CI of the difference up to {upper:+.3f}, a loss "
                                f"surely over inference.quantized_max_f1_loss {limit:g} ({profile.source_file}; "
                                f"identical answers {q['identical_predictions']:.2f})")
    return failures


def gate_status(gates: dict[str, Any] | None) -> str:
    """One card cell: ``pass (2 quality, 1 vram)``, ``FAIL (quality)``, ``no gates`` or ``not run``; a kind whose
    per-device limit has no entry for the device adds ``no vram limit for this device``."""
    if not gates:
        return "not run"
    kinds = {k: gates[k] for k in sorted(gates, key=_gate_rank) if k != "provenance" and isinstance(gates[k], dict)}
    unchecked = [k for k, v in kinds.items() if v.get("unchecked")]
    note = f"; no {', '.join(unchecked)} limit for this device" if unchecked else ""
    failed = [k for k, v in kinds.items() if v.get("failures")]
    if failed:
        return f"FAIL ({', '.join(failed)}){note}"
    checked = [f"{v['checked']} {k}" for k, v in kinds.items() if v.get("checked")]
    return f"pass ({', '.join(checked)}{note})" if checked else ("no gates" + note)


GATE_ORDER = ("quality", "vram", "latency", "parity", "speed")  # the cell's order, whatever order a run recorded them


def _gate_rank(kind: str) -> tuple[int, str]:
    return (GATE_ORDER.index(kind) if kind in GATE_ORDER else len(GATE_ORDER), kind)
