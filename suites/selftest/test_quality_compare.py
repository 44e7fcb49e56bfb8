"""``--quality-compare``: a variant's predictions paired with a saved run's under the same eval key; a drop beyond
``eval.max_f1_regression`` fails, a comparison that cannot pair fails with what differs, an equal run passes."""

from __future__ import annotations

import json

import pytest

from fixtures.user_runs import REPO, quick_profile, run_pytest
from harness.report.atomic import atomic_write_text
from harness.measure.predictions import read_rows
from harness.measure.quality_compare import compare_with_saved
from harness.sweep import Sweep


def _sweep(tmp_path, margin: float = 0.05) -> Sweep:
    profile = quick_profile(tmp_path / "p", {"variants": ["baseline"], "eval": {"max_f1_regression": margin}})
    return Sweep.prepare(profile, runs_dir=tmp_path / "runs", card=tmp_path / "MODEL_CARD.md")


def _rows(sweep: Sweep, f1: float) -> dict[str, list[dict]]:
    return {s: [{"id": e.id, "split": s, "f1": f1, "em": f1, "lang": e.lang} for e in sweep.splits[s]]
            for s in sweep.profile.data.eval_splits}


def _save(sweep: Sweep, saved_dir, rows: dict[str, list[dict]], key: str, parts: dict) -> None:
    path = saved_dir / sweep.profile.name / "predictions" / "baseline.jsonl"
    flat = [r for split_rows in rows.values() for r in split_rows]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in flat))
    atomic_write_text(path.with_suffix(".key.json"), json.dumps({"eval_key": key, "rows": len(flat), "parts": parts}))


def _compare(sweep: Sweep, saved_dir, rows):
    from harness.measure.predictions import eval_key_parts

    return compare_with_saved(saved_dir, sweep.profile, "baseline", rows, sweep.eval_key(),
                              eval_key_parts(sweep.profile, sweep.recorder.data_fingerprint))


def test_a_drop_beyond_the_margin_fails_and_an_equal_run_passes(tmp_path):
    from harness.measure.predictions import eval_key_parts

    sweep = _sweep(tmp_path)
    parts = eval_key_parts(sweep.profile, sweep.recorder.data_fingerprint)
    _save(sweep, tmp_path / "saved", _rows(sweep, 0.8), sweep.eval_key(), parts)
    deltas, failures = _compare(sweep, tmp_path / "saved", _rows(sweep, 0.8))
    assert failures == [] and deltas["validation"]["f1_delta_vs_saved"] == 0.0
    deltas, failures = _compare(sweep, tmp_path / "saved", _rows(sweep, 0.7))  # -0.1: beyond the 0.05 margin
    assert deltas["validation"]["f1_delta_vs_saved_ci"] == pytest.approx([-0.1, -0.1])
    assert len(failures) == 1 and "baseline F1 on validation fell by 0.100 against the saved run" in failures[0]
    assert "wholly below -eval.max_f1_regression = -0.05" in failures[0]
    _, failures = _compare(sweep, tmp_path / "saved", _rows(sweep, 0.77))  # -0.03: within the margin
    assert failures == []


def test_saved_predictions_under_another_eval_key_are_refused_naming_what_differs(tmp_path):
    from harness.measure.predictions import eval_key_parts

    sweep = _sweep(tmp_path)
    parts = eval_key_parts(sweep.profile, sweep.recorder.data_fingerprint)
    other = {**parts, "versions": {**parts["versions"], "bitsandbytes": "0.0.1"}, "device": "cuda:NVIDIA H100"}
    _save(sweep, tmp_path / "saved", _rows(sweep, 0.8), "another-key", other)
    _, [failure] = _compare(sweep, tmp_path / "saved", _rows(sweep, 0.8))
    assert "made under another eval key (differs: device cuda:NVIDIA H100 -> cpu, versions.bitsandbytes 0.0.1 ->" \
           in failure, failure
    _, [failure] = _compare(sweep, tmp_path / "nothing-saved", _rows(sweep, 0.8))
    assert "--quality-compare found no saved predictions at" in failure


@pytest.mark.slow
def test_quality_compare_through_the_plugin_passes_a_rerun_and_fails_a_worse_one(tmp_path):
    """Real decoding (tiny, baseline): a first run saves predictions; the same run compared with it passes; the
    same predictions compared with a saved copy whose every F1 is 1.0 fail the quality gate test, naming why."""
    profile = quick_profile(tmp_path / "p", {"variants": ["baseline"]})
    suite = str(REPO / "suites" / "benchmark" / "test_quality.py")

    def run(runs, *extra):  # a subprocess: the model is built and decoded as in a user's run
        return run_pytest(profile, runs, tmp_path / "MODEL_CARD.md", suite, "-k", "test_quality_gates", "--no-card",
                          *extra)

    first = run(tmp_path / "first")
    assert first.returncode == 0 and "1 passed" in first.stdout, first.stdout[-2000:]
    second = run(tmp_path / "second", f"--quality-compare={tmp_path / 'first'}")
    assert second.returncode == 0 and "1 passed" in second.stdout, second.stdout[-2000:]
    saved = tmp_path / "first" / "tiny" / "predictions" / "baseline.jsonl"
    rows = [{**r, "f1": 1.0} for r in read_rows(saved)]
    saved.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    third = run(tmp_path / "third", f"--quality-compare={tmp_path / 'first'}")
    assert third.returncode == pytest.ExitCode.TESTS_FAILED and "1 failed" in third.stdout, third.stdout[-2000:]
    assert "baseline F1 on validation fell by" in third.stdout and "against the saved run" in third.stdout
