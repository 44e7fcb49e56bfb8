"""The plugin through pytester: how a variant's out-of-memory ends its tests and no other variant's, and a gpu gate
run that measured nothing fails."""

from __future__ import annotations

import json
import re
import types

import pytest
import torch

from fixtures.user_runs import REPO, quick_profile

# A test body that runs out of memory for r8 only, as a latency round or a batched generate can.
OOM_IN_A_TEST_BODY = """
import torch

def test_generates(variant_name):
    if variant_name == "r8":
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB (injected)")

def test_after(variant_name):
    pass
"""


def test_oom_in_a_test_body_ends_that_variant_with_one_message_and_no_other(pytester, tmp_path):
    """The OOM fails r8's test with variant, phase, ceiling and memory (no traceback), r8's later test fails with
    the same message instead of running on a half-dead model, and every other variant passes."""
    profile = quick_profile(tmp_path / "p", {"vram_ceilings_gib": {"inference": {"r8": 3.0}}})
    pytester.makepyfile(test_oom=OOM_IN_A_TEST_BODY)
    result = pytester.runpytest("--profile", str(profile), "--runs-dir", str(tmp_path / "runs"),
                                "--card", str(tmp_path / "MODEL_CARD.md"), "-p", "no:cacheprovider")
    result.assert_outcomes(passed=6, failed=1, errors=1)
    output = result.stdout.str()
    message = ("r8: out of memory during inference (CUDA out of memory. Tried to allocate 1.00 GiB (injected)); "
               "memory at failure: ")
    result.stdout.fnmatch_lines(["*ERROR at setup of test_after[[]r8[]]*", f"{message}*",
                                 "*test_generates[[]r8[]]*", f"{message}*"])  # each section: the message alone
    assert output.count("vram_ceilings_gib.inference.r8 = 3.0 GiB") >= 2 and "Traceback" not in output
    assert not (tmp_path / "runs" / "tiny" / "results.json").exists() and not (tmp_path / "MODEL_CARD.md").exists()


# r8's second test kills the process the way a kernel's segmentation fault does: no teardown, no sessionfinish.
DIES_NATIVELY = """
import os

from harness.plugin import SWEEP_KEY

def test_measures(pytestconfig, variant_name):
    pytestconfig.stash[SWEEP_KEY].recorder.record(variant_name, "latency", {"p50_s": 0.5, "p95_s": 0.6})

def test_dies(variant_name):
    if variant_name == "r8":
        os.abort()
"""


def test_a_session_that_dies_natively_keeps_what_it_measured_in_its_progress_file(pytester, tmp_path):
    """The H200 run at b0afe53 lost 31 passed tests' figures to a segmentation fault in a kernel: results.json and the
    card are written at the session's end, which never came. Each test's figures now reach a progress file first;
    results.json and the card stay untouched (mutation: without the plugin's teardown hook there is no file)."""
    runs = tmp_path / "runs"
    pytester.makepyfile(test_dies=DIES_NATIVELY)
    result = pytester.runpytest_subprocess("--profile", str(quick_profile(tmp_path / "p")), "--runs-dir", str(runs),
                                           "--card", str(tmp_path / "MODEL_CARD.md"), "-p", "no:cacheprovider")
    assert result.ret not in (0, 1), result.stdout.str()  # killed by SIGABRT, not a test failure
    (progress,) = (runs / "tiny").glob("progress-*.json")
    measured = json.loads(progress.read_text())["variants"]
    assert {v for v in measured if measured[v].get("latency", {}).get("p50_s") == 0.5} == {"baseline", "r8"}
    assert not (runs / "tiny" / "results.json").exists() and not (tmp_path / "MODEL_CARD.md").exists()


def test_a_session_that_ends_removes_its_progress_file(pytester, tmp_path):
    runs = tmp_path / "runs"
    pytester.makepyfile(test_ends=DIES_NATIVELY.replace("os.abort()", "pass"))
    result = pytester.runpytest("--profile", str(quick_profile(tmp_path / "p")), "--runs-dir", str(runs),
                                "--no-card", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=8)
    assert not list((runs / "tiny").glob("progress-*.json"))
    assert json.loads((runs / "tiny" / "results.json").read_text())["variants"]["r32"]["latency"]["p50_s"] == 0.5


# A test of a harness session: what was alive before the first test is frozen, and what a test drops is collected.
FREEZES = """
import gc
import weakref

import torch

from harness.measure.memory import free_memory

def test_long_lived_objects_are_frozen_and_garbage_made_since_is_collected():
    assert gc.get_freeze_count() > 100_000  # the imported libraries, at least
    cycle = [torch.zeros(1000)]
    cycle.append(cycle)  # only a full collection frees it
    tensor = weakref.ref(cycle[0])
    del cycle
    free_memory()
    assert tensor() is None


def test_the_libraries_the_harness_imports_inside_tests_were_frozen_too():
    import importlib

    before = len(gc.get_objects())
    for name in ("trl", "datasets", "peft", "torch._inductor.compile_fx"):  # training and compiling import them
        importlib.import_module(name)
    assert len(gc.get_objects()) - before < 10_000  # imported after the freeze: ~300,000 more to scan
"""


def test_a_session_freezes_what_is_alive_before_its_first_test_and_still_collects_what_tests_drop(pytester,
                                                                                                  tmp_path):
    """On the 7B shape a session's 38 full collections took 19.9 s (issue 18), most of it scanning the imported
    libraries. The plugin freezes them once the tests are collected (``memory.freeze_long_lived``); a model a test
    drops is still freed by ``free_memory`` (mutations: without the freeze, the count is 0; a freeze at every
    ``free_memory`` keeps the dropped tensor alive), and so are the libraries the harness imports only inside a test
    (mutation: no import before the freeze, and importing them later adds ~300,000 objects to every collection)."""
    pytester.makepyfile(test_freezes=FREEZES)
    result = pytester.runpytest_subprocess("--profile", str(quick_profile(tmp_path / "p")), "--runs-dir",
                                           str(tmp_path / "runs"), "--no-card", "-p", "no:cacheprovider")
    assert result.ret == 0, result.stdout.str()


# A session that starts the phase log (as loading a model does), then passes or fails.
STARTS_PHASE_LOG = """
from harness.plugin import SWEEP_KEY

def test_loads(pytestconfig):
    sweep = pytestconfig.stash[SWEEP_KEY]
    sweep.restore_compiled()
    if RECORD:
        sweep.recorder.record("r8", "latency", {"p50_s": 0.5, "p95_s": 0.6})

def test_another_sweep_takes_the_log_over(tmp_path):  # as the real-OOM test's own sweep does
    from fixtures.user_runs import quick_profile
    from harness.sweep import Sweep

    other = Sweep.prepare(quick_profile(tmp_path / "p"), runs_dir=tmp_path / "runs", card=tmp_path / "CARD.md")
    other.restore_compiled()

def test_outcome():
    assert OUTCOME
"""


@pytest.mark.parametrize(("outcome", "record", "status"), [("True", True, 0), ("False", False, 1)],
                         ids=["passed-with-figures", "failed-without"])
def test_the_phase_log_ends_with_the_sessions_exit_status_after_everything_it_wrote(pytester, tmp_path, outcome,
                                                                                    record, status):
    """The H200 runs at a627023 and 4f5eb0d passed every test and were stopped by .ci/gpu's deadline in the
    interpreter's exit (inductor's compile workers shutting down), so run.txt said rc=124 only. The phase log's last
    line now gives the session's own exit status, after the results, also when a sweep made inside a test took the log
    over, as on the H200's tiny run (mutations: without the note there is no such line; without taking the log back,
    in the save or at the end, a line goes elsewhere). Before it, what the garbage collector's full collections took
    (issue 18: time no other line shows)."""
    runs = tmp_path / "runs"
    pytester.makepyfile(test_phase=STARTS_PHASE_LOG.replace("OUTCOME", outcome).replace("RECORD", str(record)))
    result = pytester.runpytest("--profile", str(quick_profile(tmp_path / "p")), "--runs-dir", str(runs),
                                "--no-card", "-p", "no:cacheprovider")
    assert result.ret == status, result.outlines
    lines = (runs / "tiny" / "phases.log").read_text().splitlines()
    assert lines[-1].endswith(f"phase=session-end what=exitstatus={status}"), lines
    gc_line = re.search(r" phase=gc wall_s=(\d+\.\d) what=(\d+) full collections, explicit and automatic$", lines[-2])
    assert gc_line and int(gc_line[2]) >= 1, lines  # the tiny session collects before its peaks and after its models
    saved = "phase=compile-cache" in lines[-3] and lines[-3].endswith("what=save")  # the session's last write
    assert saved is record and (runs / "tiny" / "results.json").exists() is record, lines  # no figures, no save


def test_latency_runs_below_one_is_a_usage_error(pytester):
    result = pytester.runpytest("--latency-runs", "0")
    errors = [line for line in result.errlines if line.strip()]
    assert result.ret == 4 and errors == ["ERROR: --latency-runs 0: give at least 1 timed round"], errors


def test_a_gpu_gate_run_that_measured_nothing_fails_with_one_line_saying_why(pytester, tmp_path):
    """The README's gate command on a machine without CUDA: every selected test skips. pytest alone exits 0 ("39
    skipped"), so a CI gate that measured nothing would pass; the plugin makes it exit 1 with the reason."""
    result = pytester.runpytest(str(REPO / "suites" / "benchmark"), "-m", "gpu", "--profile", "synthetic-7b",
                                "--runs-dir", str(tmp_path / "runs"), "--no-card", "-p", "no:cacheprovider")
    if torch.cuda.is_available():
        pytest.skip("CUDA is here: the gpu tests run")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    outcomes = result.parseoutcomes()
    assert set(outcomes) == {"skipped"} and outcomes["skipped"] >= 30, outcomes
    lines = [x for x in result.outlines if x.startswith("qlora: the gpu gate measured nothing")]
    assert lines == [f"qlora: the gpu gate measured nothing: all {outcomes['skipped']} selected tests skipped "
                     f"(profile 'synthetic-7b' needs a CUDA GPU (requires_gpu: true in "
                     f"{REPO / 'data' / 'configs' / 'synthetic-7b.yaml'})); run it where CUDA and the model's "
                     f"weights are"], result.outlines


GPU_TESTS = """
import pytest

@pytest.mark.gpu
def test_measures():
    pass

@pytest.mark.gpu
def test_needs_weights():
    pytest.skip("no weights at /models/mistral")
"""


@pytest.mark.parametrize(("args", "ret", "says"), [
    (["-m", "gpu"], pytest.ExitCode.OK, False),  # one gpu test measured: a pass
    (["-m", "gpu", "-k", "needs_weights"], pytest.ExitCode.TESTS_FAILED, True),  # all skipped: fails, with why
    (["-m", "not gpu", "-k", "needs_weights"], pytest.ExitCode.NO_TESTS_COLLECTED, False),  # not a gate run
    (["-k", "needs_weights"], pytest.ExitCode.OK, False),  # no -m gpu: skips are ordinary
], ids=["one-measured", "all-skipped", "not-gpu", "no-marker"])
def test_only_a_gpu_run_whose_every_test_skipped_fails(pytester, tmp_path, args, ret, says):
    pytester.makepyfile(test_gate=GPU_TESTS)
    result = pytester.runpytest(*args, "--profile", str(quick_profile(tmp_path / "p")), "--runs-dir",
                                str(tmp_path / "runs"), "--no-card", "-p", "no:cacheprovider")
    assert result.ret == ret
    line = "qlora: the gpu gate measured nothing: all 1 selected tests skipped (no weights at /models/mistral); run " \
           "it where CUDA and the model's weights are"
    assert (line in result.outlines) is says, result.outlines


# Another project's test: it passes only when the qlora plugin registered none of its markers there.
UNRELATED_PROJECT_TEST = """
def test_its_own_work(pytestconfig):
    markers = " ".join(pytestconfig.getini("markers"))
    assert "qlora_variant" not in markers and "gpu:" not in markers
"""


def _snapshot(folder) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if "__pycache__" not in p.parts}


def test_another_projects_run_is_untouched(pytester, monkeypatch):
    """With qlora-bench installed, a project that is not the harness's and gives no qlora option runs as if it were
    not: no profile prepared (Sweep.prepare would raise here), no re-exec, no qlora output, no file written."""
    from harness.sweep import Sweep

    def refuse(*args, **kwargs):
        raise AssertionError("the plugin woke up in another project")
    monkeypatch.setattr(Sweep, "prepare", classmethod(refuse))
    monkeypatch.setattr("os.execv", refuse)
    pytester.makeini("[pytest]\naddopts = --strict-markers\n")
    pytester.makepyfile(test_theirs=UNRELATED_PROJECT_TEST)
    before = _snapshot(pytester.path)
    # pytest-benchmark (installed with our [test] extra) makes .benchmarks/ in every project, ours or not
    result = pytester.runpytest("-p", "no:cacheprovider", "-p", "no:benchmark")
    result.assert_outcomes(passed=1)
    ours = [line for line in result.outlines if "qlora" in line.lower() and not line.startswith("plugins:")]
    assert not ours and not result.errlines, (ours, result.errlines)
    assert _snapshot(pytester.path) == before


def test_a_qlora_option_wakes_the_plugin_in_any_folder(pytester):
    """The other side of the test above: the same kind of folder, with --profile, gets the harness (a bad profile
    name is its usage error), so the inert plugin is inert because nobody asked, not because it is broken."""
    result = pytester.runpytest("--profile", "no-such-profile", "-p", "no:cacheprovider")
    assert result.ret == 4 and "no-such-profile" in result.stderr.str()


def test_a_copy_installed_without_e_says_to_use_e(pytester, monkeypatch, tmp_path):
    """``pip install .`` ships the package without data/configs; asked to run, it says so in one line."""
    monkeypatch.setattr("harness.config.profiles.CONFIG_DIR", tmp_path / "site-packages" / "data" / "configs")
    result = pytester.runpytest("--profile", "tiny", "-p", "no:cacheprovider")
    errors = [line for line in result.errlines if line.strip()]
    assert result.ret == 4 and len(errors) == 1 and errors[0].endswith("run: pip install -e ."), errors


def test_benchmark_json_names_the_declared_commit_where_the_tree_has_no_git(pytestconfig, monkeypatch, tmp_path):
    """pytest-benchmark reads its commit from git; on the GPU machine's copy of the tree it saved ``"id": "unknown"``
    in every ``benchmark.json`` under results/h200. The plugin names the commit the run's other figures name
    (``$QLORA_GIT_SHA``) and says where it came from; a commit git gave is left alone."""
    from harness import plugin
    from harness.report import provenance

    registered = pytestconfig.pluginmanager.hook.pytest_benchmark_update_commit_info.get_hookimpls()
    assert any(impl.plugin is plugin for impl in registered)
    monkeypatch.setattr(provenance, "_REPO_ROOT", tmp_path)  # a copy of the tree without .git
    monkeypatch.setenv("QLORA_GIT_SHA", "a" * 40)
    config = types.SimpleNamespace(stash={plugin.SWEEP_KEY: object()})
    missing = {"id": "unknown", "dirty": False, "error": "CalledProcessError(128, 'not a git repository')"}
    plugin.pytest_benchmark_update_commit_info(config=config, commit_info=missing)
    assert missing["id"] == "a" * 40 and not missing["dirty"] and "QLORA_GIT_SHA" in missing["id_from"]
    found = {"id": "b" * 40, "dirty": True}
    plugin.pytest_benchmark_update_commit_info(config=config, commit_info=found)
    assert found == {"id": "b" * 40, "dirty": True}
