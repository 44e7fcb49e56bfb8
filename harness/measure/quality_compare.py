"""Quality against a saved run: the analogue of pytest-benchmark's ``--benchmark-compare`` for EM/F1.

``--quality-compare=RUNS_DIR`` names a saved runs dir (a copy of ``runs/`` from the last good run). Each evaluated
variant's per-example rows are paired with ``RUNS_DIR/<profile>/predictions/<variant>.jsonl`` on the same examples,
and the paired-bootstrap CI of F1 (this run - saved) is held to ``eval.max_f1_regression``: the variant fails when
the whole CI lies below ``-max_f1_regression``, i.e. when the drop is larger than the margin beyond doubt.

The saved rows must carry this run's eval key (config, data, decoding code, library versions, device), so what the
comparison sees is a change in what the eval key leaves out: the adapter (training code, a retrain) and the rest of
the harness. Saved rows made under another key are refused, naming what differs; a missing file is a failure too,
since a comparison that was asked for and compared nothing must not pass.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config.profiles import config_hash
from ..config.schema import Profile
from .evaluate import compare_to_baseline
from .predictions import eval_key_parts, predictions_path, read_key_file, read_matching

__all__ = ["compare_with_saved", "regressions_against", "key_differences"]


def compare_with_saved(saved_runs_dir: Path, profile: Profile, variant: str, rows: dict[str, list[dict]],
                       key: str, parts: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """({split: f1_delta_vs_saved, its CI, n_paired, the saved file}, failures) for ``variant``'s ``rows``."""
    path = predictions_path(saved_runs_dir, profile, variant)
    stored = read_key_file(path)
    if stored is None or not path.is_file():
        return {}, [f"{variant}: --quality-compare found no saved predictions at {path}; copy a good run's runs/ "
                    f"there, or drop --quality-compare"]
    if stored.get("eval_key") != key:
        return {}, [f"{variant}: the saved predictions {path} were made under another eval key (differs: "
                    f"{key_differences(stored.get('parts') or {}, parts)}), so they cannot be paired with this run's; "
                    f"save a run made with this config, data, code, libraries and device"]
    saved = read_matching(path, key)
    if saved is None:
        return {}, [f"{variant}: the saved predictions {path} are incomplete (fewer rows than their key file says)"]
    margin, out, failures = profile.eval.max_f1_regression, {}, []
    for split, mine in rows.items():
        paired = compare_to_baseline(mine, [r for r in saved if r.get("split") == split], profile.eval)
        if "f1_delta_vs_baseline" not in paired:
            failures.append(f"{variant} on {split}: {paired['f1_delta_vs_baseline_note']} (saved run {path})")
            continue
        delta, (lo, hi) = paired["f1_delta_vs_baseline"], paired["f1_delta_vs_baseline_ci"]
        out[split] = {"f1_delta_vs_saved": delta, "f1_delta_vs_saved_ci": [lo, hi],
                      "n_paired_saved": paired["n_paired"], "saved_predictions": str(path)}
        if hi < -margin:
            failures.append(f"{variant} F1 on {split} fell by {-delta:.3f} against the saved run {path} (paired 95% CI "
                            f"[{lo:+.3f}, {hi:+.3f}], wholly below -eval.max_f1_regression = -{margin} in "
                            f"{profile.source_file})")
    return out, failures


def regressions_against(saved_runs_dir: Path, profile: Profile, variant: str, scores: dict[str, Any],
                        data_fingerprint: str) -> list[str]:
    """``compare_with_saved`` for a variant's ``SplitScores`` under this run's eval key: each split's summary gains
    its ΔF1 vs the saved run; returns the failures."""
    parts = eval_key_parts(profile, data_fingerprint)
    deltas, failures = compare_with_saved(saved_runs_dir, profile, variant, {k: v.rows for k, v in scores.items()},
                                          config_hash(parts), parts)
    for split, figures in deltas.items():
        scores[split].summary.update(figures)
    return failures


def key_differences(saved: dict[str, Any], now: dict[str, Any]) -> str:
    """The eval-key parts that differ, e.g. ``versions.bitsandbytes 0.49.0 -> 0.50.2, device``."""
    if not saved:
        return "the saved key file predates the key's parts; re-save it with this harness"
    out = []
    for part in sorted(set(saved) | set(now)):
        a, b = saved.get(part), now.get(part)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{part}.{k} {a.get(k)} -> {b.get(k)}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            out.append(f"{part} {a} -> {b}" if part in ("device",) else part)
    return ", ".join(out) or "nothing in the recorded parts (the key's recipe changed)"
