"""Reliability, end to end, run the way a user runs the harness: ``pytest --profile <yaml>`` in a subprocess, on a
tiny profile that trains in seconds (``fixtures.user_runs.QUICK``), with a temporary runs dir and card.

Each test names the protection it proves and is written to fail against a harness without it: a run killed while
training, two xdist workers, three runs against one hand-written card, out of memory, and Ctrl-C.
"""

from __future__ import annotations

import calendar
import json
import re
import signal
import subprocess
import sys
import textwrap
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from fixtures.user_runs import REPO, quick_profile, run_pytest, snapshot, start_pytest, train_log, user_env
from harness.report.card import END, START, main as card_main
from harness.report.card_render import results_table
from harness.report.results import card_results_path, load_results

pytestmark = pytest.mark.slow



def _read_until(proc: subprocess.Popen, seen, timeout_s: float = 300) -> list[str]:
    """Read the run's output until a line satisfies ``seen``; return the lines read. Fails if the run ends first."""
    lines, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        lines.append(line)
        if seen(line):
            return lines
    proc.kill()
    raise AssertionError("the run ended or timed out before the expected line:\n" + "".join(lines[-40:]))


def _artifacts(runs_dir: Path, variant: str) -> list[str]:
    """Names under runs/tiny/ that belong to ``variant``'s artifacts: final dirs and hidden temp dirs."""
    folder = runs_dir / "tiny"
    return sorted(p.name for p in folder.iterdir() if re.match(rf"^(\.tmp-)?{variant}-[0-9a-f]{{12}}", p.name))


def _events(runs_dir: Path) -> list[str]:
    return [event for _, _, event, _ in train_log(runs_dir)]


# ---------------------------------------------------------------------------------------------------------------
# 2. A killed training run


def test_killed_training_run_leaves_no_partial_artifact_and_the_next_run_retrains(tmp_path):
    """SIGKILL after the first optimizer step: the half-written adapter exists only under a hidden temp name, so no
    reader can load it; the next run retrains (no 'reuse' first) and leaves exactly one complete artifact. Writing
    in place would leave a partial ``r8-<hash>`` dir; not sweeping would leave the ``.tmp-`` dir behind."""
    profile = quick_profile(tmp_path / "p", {"training": {"logging_steps": 1}})  # a loss line after every step
    runs, card = tmp_path / "runs", tmp_path / "MODEL_CARD.md"
    selection = ("suites/benchmark/test_quality.py", "-k", "r8 and predictions")

    proc = start_pytest(profile, runs, card, *selection, "-s")  # -s: the trainer's loss lines reach us
    try:
        _read_until(proc, lambda line: "'loss'" in line)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert _events(runs) == ["train-start"], "the kill must land mid-training, after train-start, before train-done"
    (partial,) = _artifacts(runs, "r8")
    assert partial.startswith(".tmp-r8-"), f"a killed run left {partial!r} under its final name"
    assert not card.exists() and not (runs / "tiny" / "results.json").exists()

    second = run_pytest(profile, runs, card, *selection)
    assert second.returncode == 0, second.stdout[-3000:]
    events = _events(runs)
    assert events[:3] == ["train-start", "train-start", "train-done"], events  # retrained; reused nothing first
    (final,) = _artifacts(runs, "r8")  # one artifact, and the temp dir of the killed run is gone
    assert final == train_log(runs)[1][3]
    manifest = json.loads((runs / "tiny" / final / "manifest.json").read_text())
    assert manifest["complete"] is True and manifest["optimizer_steps"] == manifest["planned_optimizer_steps"]
    assert (runs / "tiny" / final / "adapter" / "adapter_model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------------------------
# 3. Concurrent workers (pytest-xdist)


def _utc(stamp: str) -> float:
    return calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ"))


def test_two_xdist_workers_needing_one_variant_train_it_exactly_once(tmp_path):
    """Two tests of r8 go to the two workers (xdist hands 2 tests to 2 workers one each); both need r8's adapter.
    The artifact lock makes one train and the other wait and reuse: one train-start, and the reuse is logged by
    the other worker after the manifest says training finished. Without the lock both would train."""
    profile = quick_profile(tmp_path / "p")
    runs, card = tmp_path / "runs", tmp_path / "MODEL_CARD.md"
    result = run_pytest(profile, runs, card, "-n", "2", "suites/benchmark/test_quality.py",
                        "suites/benchmark/test_latency.py",
                        "-k", "r8 and (predictions or latency)")
    assert result.returncode == 0, result.stdout[-3000:]
    log = train_log(runs)
    assert len({pid for _, pid, _, _ in log}) == 2, f"both workers must have needed r8: {log}"
    assert [event for _, _, event, _ in log] == ["train-start", "train-done", "reuse"], log
    (_, trainer, _, artifact), _, (reused_at, reuser, _, reused) = log
    assert reuser != trainer and reused == artifact
    manifest = json.loads((runs / "tiny" / artifact / "manifest.json").read_text())
    assert time.mktime(time.strptime(reused_at, "%Y-%m-%dT%H:%M:%S")) >= _utc(manifest["train_finished"])
    assert _artifacts(runs, "r8") == [artifact]


def test_xdist_workers_needing_different_variants_train_at_the_same_time(tmp_path):
    """r8 on one worker, r16 on the other: the lock is per artifact key, so both train at once (both train-starts
    come before either train-done, and the manifests' training intervals overlap). One global lock would
    serialize them: start, done, start, done."""
    profile = quick_profile(tmp_path / "p")
    runs, card = tmp_path / "runs", tmp_path / "MODEL_CARD.md"
    result = run_pytest(profile, runs, card, "-n", "2", "suites/benchmark/test_latency.py", "-k", "r8 or r16")
    assert result.returncode == 0, result.stdout[-3000:]
    log = train_log(runs)
    assert [event for _, _, event, _ in log][:4] == ["train-start", "train-start", "train-done", "train-done"], log
    assert len({pid for _, pid, event, _ in log if event == "train-start"}) == 2, log
    (r8,), (r16,) = _artifacts(runs, "r8"), _artifacts(runs, "r16")
    m8, m16 = (json.loads((runs / "tiny" / a / "manifest.json").read_text()) for a in (r8, r16))
    assert m8["train_started"] <= m16["train_finished"] and m16["train_started"] <= m8["train_finished"]


# ---------------------------------------------------------------------------------------------------------------
# 4. The card is preserved across runs; 6. Ctrl-C leaves the last good state

USER_CARD = """\
---
license: apache-2.0
language: [fr, en]
my_team: search-quality
widget:
- text: "Que signifie ARR ?"
---

# Our QLoRA adapters

Written by hand: keep this paragraph  
exactly as it is (trailing spaces, a\ttab, « guillemets », 🚀).

<!-- a comment of ours -->

## Results

<!-- results:start -->
<!-- results:end -->

## Notes after the results

| ours | table |
|------|-------|
| 1    | 2     |

Last line, no newline after it"""
USER_KEYS = {"license": "apache-2.0", "language": ["fr", "en"], "my_team": "search-quality",
             "widget": [{"text": "Que signifie ARR ?"}]}
SELECT = ("suites/benchmark/test_quality.py", "suites/benchmark/test_latency.py")


def _outside(card_text: str) -> tuple[str, str]:
    """The card's body before our region and after it (the front matter is YAML, compared by key)."""
    body = card_text.split("\n---\n", 1)[1]
    return body[:body.index(START)], body[body.index(END) + len(END):]


def _front_matter(card_text: str) -> dict:
    return yaml.safe_load(card_text.split("\n---\n", 1)[0].removeprefix("---\n"))


def _rows(card_text: str) -> dict[str, str]:
    """The results table rows in the card, by their first cell (the variant label: Baseline, LoRA r8/a16, ...)."""
    region = card_text[card_text.index(START):card_text.index(END)]
    cells = [(line.split("|")[1].strip(), line) for line in region.splitlines() if line.startswith("| ")]
    return {label: line for label, line in cells if label == "Baseline" or label.startswith("LoRA ")}


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory):
    """``-k r16``, then ``-k r8``, then every variant, against one hand-written card; the card after each run."""
    tmp = tmp_path_factory.mktemp("card_runs")
    profile = quick_profile(tmp / "p", {"variants": ["baseline", "r8", "r16"]})
    runs, card = tmp / "runs", tmp / "card" / "MODEL_CARD.md"
    card.parent.mkdir()
    card.write_bytes(USER_CARD.encode("utf-8"))
    cards, results = [], []
    for selection in ("r16 and not batched", "r8 and not batched", "not batched"):
        done = run_pytest(profile, runs, card, *SELECT, "-k", selection)
        assert done.returncode == 0, done.stdout[-3000:]
        cards.append(card.read_bytes().decode("utf-8"))
        results.append(load_results(runs / "tiny" / "results.json"))
    return {"profile": profile, "runs": runs, "card": card, "cards": cards, "results": results}


def test_card_keeps_user_text_and_keys_and_shows_every_variant_latest(three_runs):
    """Text outside the markers survives byte for byte and user front-matter keys survive every run; after
    ``-k r8`` the r16 row from the first run is still there, unchanged; after the full run every variant has a row
    and the table is the one rendered from the final results.json (each variant's latest figures)."""
    cards, results = three_runs["cards"], three_runs["results"]
    for text in cards:
        assert _outside(text) == _outside(USER_CARD)
        front = _front_matter(text)
        assert {k: front.get(k) for k in USER_KEYS} == USER_KEYS
        assert "model-index" not in front  # random weights never score the model on the Hub (test_card.py)
    first, second, third = (_rows(text) for text in cards)
    assert list(first) == ["LoRA r16/a32"]
    assert list(second) == ["LoRA r8/a16", "LoRA r16/a32"] and second["LoRA r16/a32"] == first["LoRA r16/a32"]
    assert list(third) == ["Baseline", "LoRA r8/a16", "LoRA r16/a32"]
    card_results = load_results(card_results_path(three_runs["card"], "tiny"))
    assert results_table(card_results) in cards[2]
    r16_first, r16_last = (r["variants"]["r16"]["latency"]["provenance"]["session"] for r in (results[0], results[2]))
    assert r16_last != r16_first, "the full run re-measured r16: its row must carry the new figures"


def test_a_partial_run_on_a_fresh_clone_keeps_every_other_line_of_the_card(three_runs, tmp_path):
    """A fresh clone has the committed card and its results file, and no runs/: ``-k r8`` retrains r8 and must
    leave every line that is not r8's byte for byte (baseline and r16 rows, detail and provenance lines)."""
    clone_card = tmp_path / "card" / "MODEL_CARD.md"
    clone_card.parent.mkdir()
    clone_card.write_bytes(three_runs["card"].read_bytes())
    (clone_card.parent / "card_assets").mkdir()
    results_file = card_results_path(three_runs["card"], "tiny")
    # r8's latency marked as timed on a busy machine, its card block rendered again: r8's ‡ is then the only
    # footnote, which the partial run drops unless r8 is timed busy again (the case that once failed this test)
    committed = json.loads(results_file.read_text(encoding="utf-8"))
    committed["variants"]["r8"]["latency"].update(busy=True, busy_reason="marked by the test")
    card_results_path(clone_card, "tiny").write_text(json.dumps(committed), encoding="utf-8")
    card_main([str(three_runs["profile"]), "--card", str(clone_card)])
    before = clone_card.read_text(encoding="utf-8").splitlines()
    assert any(line.startswith("- ‡ `r8` latency") for line in before)
    done = run_pytest(three_runs["profile"], tmp_path / "fresh-runs", clone_card, *SELECT, "-k", "r8 and not batched")
    assert done.returncode == 0, done.stdout[-3000:]
    after = clone_card.read_text(encoding="utf-8").splitlines()
    assert _not_r8s(before) == _not_r8s(after)
    assert before != after, "r8's own lines must carry the new figures"


def _not_r8s(lines: list[str]) -> list[str]:
    """The card's lines that are not r8's. r8 may gain or lose a ‡ footnote (its rounds timed on a busy machine);
    when that footnote is the only one, the blank line that opens the footnote block goes with it, so a run of blank
    lines counts as one (it once failed a run whose r8 lost its only footnote)."""
    out = []
    for line in lines:
        if "r8" not in line and not (line == "" and out and out[-1] == ""):
            out.append(line)
    return out


def _summary_labels(output: str) -> list[str]:
    """The first cell of each row of the terminal summary's table (padded by tabulate)."""
    lines = output[output.index("qlora results: profile"):].splitlines()
    return [line.split("|")[1].strip() for line in lines[1:] if line.startswith("| ") and "---" not in line][1:]


def test_full_run_then_k_r16_then_the_card_command_keep_every_other_line_byte_for_byte(tmp_path):
    """The full run, then ``-k r16``, then ``python -m harness.report.card <profile>``: every card line that is not
    r16's keeps its bytes (the Gates cells once flipped to ``pass (2 parity, 1 quality)`` after ``-k r16``, and the
    seed row moved in the engines table), the card command re-renders the same bytes (it once changed r16's cell),
    and the terminal summary lists its rows in the card's order."""
    # a quality gate beside the parity gates, so a Gates cell has two kinds whose order can flip (validation F1 of
    # tiny's memorised answers stays far below 0.99; a bound of 1.0 would be refused as one that cannot fail)
    gate = {"variants": ["baseline", "r8", "r16", "r32"], "split": "validation", "metric": "f1", "max": 0.99}
    profile = quick_profile(tmp_path / "p", {"quality_gates": [gate]})
    runs, card = tmp_path / "runs", tmp_path / "card" / "MODEL_CARD.md"
    card.parent.mkdir()
    card.write_bytes(USER_CARD.encode("utf-8"))
    full = run_pytest(profile, runs, card)
    assert full.returncode == 0, full.stdout[-3000:]
    after_full = card.read_text(encoding="utf-8")
    assert _summary_labels(full.stdout) == list(_rows(after_full)), full.stdout[-3000:]
    assert "| `seed` |" in after_full and "pass (1 quality, 2 parity)" in after_full
    partial = run_pytest(profile, runs, card, "-k", "r16")
    assert partial.returncode == 0, partial.stdout[-3000:]
    after_r16 = card.read_bytes()
    rendered = subprocess.run([sys.executable, "-m", "harness.report.card", str(profile), "--card", str(card)],
                              cwd=REPO, capture_output=True, text=True, env=user_env())
    assert rendered.returncode == 0, rendered.stdout + rendered.stderr
    assert card.read_bytes() == after_r16
    # blank lines aside: the one before the footnotes comes and goes with r16's own footnote (‡ when its rounds met a
    # busy moment of a shared CI machine)
    not_r16 = lambda text: [line for line in text.splitlines() if "r16" not in line and line]  # noqa: E731
    assert not_r16(after_r16.decode("utf-8")) == not_r16(after_full)
    assert after_r16.decode("utf-8") != after_full, "r16's own lines must carry the new figures"


def test_retrain_trains_each_selected_variant_exactly_once(three_runs, tmp_path):
    """``--retrain`` with the merged engine, r16's adapter already on disk: the pre-train pass and the variant's load
    must not both train it (one new train-start line in train.log)."""
    runs = three_runs["runs"]
    seen = len(train_log(runs))
    done = run_pytest(three_runs["profile"], runs, tmp_path / "MODEL_CARD.md", *SELECT, "-k", "r16 and not batched",
                      "--retrain", "--no-card")
    assert done.returncode == 0, done.stdout[-3000:]
    starts = [artifact for _, _, event, artifact in train_log(runs)[seen:] if event == "train-start"]
    assert len(starts) == 1 and starts[0].startswith("r16-"), train_log(runs)


# Loaded with -p into the interrupted run: it only observes, writing a file when a test body starts.
CALL_OBSERVER = textwrap.dedent('''
    import os
    from pathlib import Path


    def pytest_runtest_call(item):
        Path(os.environ["QLORA_TEST_CALL_STARTED"]).write_text(item.nodeid)
''')


def test_ctrl_c_during_latency_leaves_results_and_card_in_their_last_good_state(three_runs, tmp_path,
                                                                                  monkeypatch):
    """SIGINT two seconds into the latency benchmark (100000 rounds; the full traceback shows it landed there):
    results.json and the card keep their bytes. Without the early return on an interrupted session, the figures
    the fixtures had already recorded would be merged and the card rewritten (its 'Updated ...' changes)."""
    profile, runs, card = three_runs["profile"], three_runs["runs"], three_runs["card"]
    results_json = runs / "tiny" / "results.json"
    before = snapshot(results_json, card)
    (tmp_path / "call_observer.py").write_text(CALL_OBSERVER)
    started = tmp_path / "call-started"
    monkeypatch.setenv("QLORA_TEST_CALL_STARTED", str(started))
    proc = start_pytest(profile, runs, card, "suites/benchmark/test_latency.py", "-k", "r8", "--full-trace",
                        "--latency-runs", "100000", "-p", "call_observer", pythonpath=tmp_path)
    try:
        deadline = time.monotonic() + 300
        while not started.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(2)
    finally:
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=300)  # a loaded 2-core CI machine shuts down slowly
    assert started.read_text() == "suites/benchmark/test_latency.py::test_generate_latency[r8]", output[-3000:]
    assert proc.returncode == pytest.ExitCode.INTERRUPTED, output[-3000:]
    assert "KeyboardInterrupt" in output and "pedantic" in output, "the interrupt must land in the benchmark"
    assert snapshot(results_json, card) == before


# ---------------------------------------------------------------------------------------------------------------
# 5. Out of memory

# Loaded with -p into the subprocess: raises a real torch.cuda.OutOfMemoryError as the model's forward starts, where
# an allocation fails on a GPU: in r16's training after two forward passes, and in baseline's inference. A global
# forward pre-hook, because trl rebinds the model's forward during training (a class-level patch is bypassed).
OOM_INJECTION = textwrap.dedent('''
    import pytest
    import torch
    from transformers import MistralForCausalLM

    import harness.engines.merged
    import harness.train.trainer
    from harness.engines.fused import FusedDecoder

    state = {"training": None, "forwards": 0, "item_variant": None, "warming": False}
    real_train_adapter = harness.train.trainer.train_adapter
    real_warmup = harness.engines.merged.MergedBase.warmup


    def warmup(self, *args, **kwargs):  # the shared base compiles its shapes: not the baseline's own generation
        state["warming"] = True
        try:
            return real_warmup(self, *args, **kwargs)
        finally:
            state["warming"] = False


    def fail_like_a_full_gpu(module, args):
        if not isinstance(module, (MistralForCausalLM, FusedDecoder)):  # the merged engine runs FusedDecoder
            return
        state["forwards"] += 1
        if (state["training"] == "r16" and state["forwards"] > 2) or (
                state["training"] is None and state["item_variant"] == "baseline" and not torch.is_grad_enabled()
                and not state["warming"]):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")


    def train_adapter(profile, variant, *args, **kwargs):
        state["training"], state["forwards"] = variant.name, 0
        try:
            return real_train_adapter(profile, variant, *args, **kwargs)
        finally:
            state["training"] = None


    torch.nn.modules.module.register_module_forward_pre_hook(fail_like_a_full_gpu)
    harness.train.trainer.train_adapter = train_adapter
    harness.engines.merged.MergedBase.warmup = warmup


    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(item):
        callspec = getattr(item, "callspec", None)
        state["item_variant"] = callspec.params.get("variant_name") if callspec else None
''')


def _outcomes(junit: Path) -> dict[str, tuple[str, str]]:
    """test name -> (passed | failure | error | skipped, message) from a JUnit XML report."""
    out = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        bad = [child for child in case if child.tag in ("failure", "error", "skipped")]
        out[case.get("name")] = (bad[0].tag, bad[0].get("message", "") + (bad[0].text or "")) if bad else \
            ("passed", "")
    return out


def test_out_of_memory_ends_only_that_variant_with_a_message_naming_variant_phase_ceiling_and_memory(tmp_path):
    """r16 runs out of memory while training and baseline while generating; each of their tests ends with one
    message (variant, phase, the profile's ceiling, memory at failure), no traceback; r8, which comes after them,
    trains and passes. Without the guard the raw OOM would error every test of r16 with a torch traceback."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "oom_injection.py").write_text(OOM_INJECTION)
    ceilings = {"train": {"r16": 1.5}, "inference": {"baseline": 0.5}}
    profile = quick_profile(tmp_path / "p", {"variants": ["r16", "baseline", "r8"], "vram_ceilings_gib": ceilings})
    runs, card, junit = tmp_path / "runs", tmp_path / "MODEL_CARD.md", tmp_path / "junit.xml"
    result = run_pytest(profile, runs, card, *SELECT, "-k", "not batched", "-p", "oom_injection",
                        f"--junitxml={junit}", pythonpath=plugins)
    assert result.returncode == pytest.ExitCode.TESTS_FAILED, result.stdout[-3000:]
    outcomes = _outcomes(junit)
    by_variant = {v: {name: o for name, o in outcomes.items() if name.endswith(f"[{v}]")}
                  for v in ("r16", "baseline", "r8")}
    assert all(len(tests) >= 4 for tests in by_variant.values()), outcomes  # quality (3) and latency (1) each
    expected = {"r16": ("train", "vram_ceilings_gib.train.r16 = 1.5 GiB"),
                "baseline": ("inference", "vram_ceilings_gib.inference.baseline = 0.5 GiB")}
    for variant, (phase, ceiling) in expected.items():
        for name, (outcome, message) in by_variant[variant].items():
            assert outcome in ("failure", "error"), (name, outcome)
            assert f"{variant}: out of memory during {phase} (CUDA out of memory. Tried to allocate 2.00 GiB " \
                   f"(injected)); memory at failure: " in message, message
            assert ceiling in message and str(profile) in message, message
            assert "Traceback" not in message and "During handling" not in message, message  # the message alone
            assert re.search(r"memory at failure: .*\d+\.\d\d GiB", message), message
    assert {outcome for outcome, _ in by_variant["r8"].values()} == {"passed"}, by_variant["r8"]
    assert list(load_results(runs / "tiny" / "results.json")["variants"]) == ["r8"]


def test_a_cuda_librarys_failed_allocation_is_an_out_of_memory_and_other_runtime_errors_are_not():
    """On the H200 (c8dd8a0, results/h200/smollm2-135m-bf16/c8dd8a0/) a full device failed r16's backward inside
    cuBLAS, as a plain RuntimeError, and the guard let it through raw. It is an OOM like torch's own; any other
    RuntimeError still passes through unchanged (mutation: a guard taking every RuntimeError for an OOM fails the second
    half)."""
    from harness.config.profiles import load_profile
    from harness.train.oom import VariantOutOfMemory, call_with_oom_guard

    profile = load_profile("tiny")

    def cublas():
        raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")

    with pytest.raises(VariantOutOfMemory, match=r"^r16: out of memory during train \(CUDA error: "
                                                 r"CUBLAS_STATUS_ALLOC_FAILED.*tiny\.yaml"):
        call_with_oom_guard(profile, "r16", "train", cublas)

    def bug():
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x8 and 16x8)")

    with pytest.raises(RuntimeError, match="shapes cannot be multiplied") as info:
        call_with_oom_guard(profile, "r16", "train", bug)
    assert not isinstance(info.value, VariantOutOfMemory)
