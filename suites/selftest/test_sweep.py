"""The sweep owned by the library: nothing stale (adapter keys cover the code, ΔF1 pairs only a matching baseline),
the card keeps what a run did not measure, fixtures stay thin, and the library's shape (no cycles, small modules)."""

from __future__ import annotations

import ast
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import harness.models.nf4_store as nf4_store
import harness.train.adapters as adapters
from fixtures.user_runs import REPO, quick_profile, write_profile
from harness.config.preflight import check_profile_data
from harness.config.profiles import config_hash, load_profile
from harness.report.atomic import atomic_write_text
from harness.report.card import write_card
from harness.report.card_render import fmt_ratio, render_section
from harness.report.provenance import PROJECT_ROOT
from harness.sweep import Sweep

HARNESS = REPO / "harness"


def test_editing_a_line_of_the_training_code_changes_the_adapter_key(tmp_path, monkeypatch):
    """An adapter trained by old code must not be reused after the training code changed."""
    profile = load_profile("tiny")
    splits = check_profile_data(profile)
    before = config_hash(adapters.artifact_key(profile, profile.variant("r16"), splits["train"]))
    copies = []
    for src in adapters.ADAPTER_SOURCES:
        dst = tmp_path / src.name
        text = src.read_text(encoding="utf-8")
        if src.name == "trainer.py":
            text = text.replace("wall_s = time.perf_counter() - start", "wall_s = time.perf_counter() - start  # x")
            assert text != src.read_text(encoding="utf-8"), "the edited line is gone from trainer.py"
        dst.write_text(text, encoding="utf-8")
        copies.append(dst)
    monkeypatch.setattr(adapters, "ADAPTER_SOURCES", tuple(copies))
    after = config_hash(adapters.artifact_key(profile, profile.variant("r16"), splits["train"]))
    assert after != before
    assert [p.name for p in copies][:1] == ["trainer.py"]


def _baseline_file(sweep: Sweep, eval_key: str) -> None:
    path = sweep.runs_dir / sweep.profile.name / "predictions" / "baseline.jsonl"
    rows = [{"id": e.id, "split": e.split, "f1": 0.0, "em": 0.0, "lang": e.lang}
            for s in sweep.profile.data.eval_splits for e in sweep.splits[s]]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    atomic_write_text(path.with_suffix(".key.json"), json.dumps({"eval_key": eval_key, "rows": len(rows)}))


def test_a_baseline_made_under_another_config_is_not_paired_into_delta_f1(tmp_path):
    """Stored baseline predictions are paired only when their eval key (config, data, decoding code) matches."""
    profile = quick_profile(tmp_path / "p", {"variants": ["r8"]})  # no baseline to re-evaluate: n/a with reason
    sweep = Sweep.prepare(profile, runs_dir=tmp_path / "runs", card=tmp_path / "MODEL_CARD.md")
    _baseline_file(sweep, "another-config")
    rows, note = sweep._baseline_rows()
    assert rows is None and "no baseline predictions match this config" in note
    _baseline_file(sweep, sweep.eval_key())
    rows, note = sweep._baseline_rows()
    assert note is None and sum(len(r) for r in rows.values()) == 5


def _results(profile_name: str, variants_figures: dict) -> dict:
    return {"profile": profile_name, "variant_order": list(variants_figures), "eval_splits": ["validation"],
            "show_quality": True, "variants": variants_figures}


def test_a_card_update_for_one_variant_leaves_every_other_line_byte_for_byte(tmp_path):
    """The card block is rendered from the committed results file; r16's figures change r16's lines alone."""
    profile = load_profile("tiny")
    card = tmp_path / "MODEL_CARD.md"
    card.write_text("# Card\n\n<!-- results:start -->\n<!-- results:end -->\n", encoding="utf-8")
    results_file = tmp_path / "card_assets" / "tiny-results.json"
    prov = {"git_sha": "abc", "config_hash": config_hash(profile), "time": "2026-01-01T00:00:00Z"}

    def figures(em: float) -> dict:
        return {"info": {"label": f"LoRA em{em}", "provenance": prov},
                "quality": {"validation": {"n": 5, "em": em, "f1": em, "em_ci": [0, 1], "f1_ci": [0, 1]},
                            "provenance": prov}}

    write_card(card, results_file, profile, {v: figures(0.1) for v in ("baseline", "r8", "r16", "r32")}, "fp")
    before = card.read_text(encoding="utf-8").splitlines()
    write_card(card, results_file, profile, {"r16": figures(0.9)}, "fp")
    after = card.read_text(encoding="utf-8").splitlines()
    assert [x for x in before if "r16" not in x and "em0.1" not in x] == \
           [x for x in after if "r16" not in x and "em0.9" not in x and "em0.1" not in x]
    assert sum("0.900" in x for x in after) >= 1 and len(before) == len(after)


def test_a_card_block_without_its_results_file_is_not_rewritten(tmp_path):
    """Rendering from an empty results file would drop every committed row: refuse, name the file, write nothing."""
    profile = load_profile("tiny")
    card = tmp_path / "MODEL_CARD.md"
    text = "# Card\n<!-- results:start -->\n<!-- results:tiny:start -->\nrows\n<!-- results:tiny:end -->\n" \
           "<!-- results:end -->\n"
    card.write_text(text, encoding="utf-8")
    from harness.report.card import CardError

    with pytest.raises(CardError, match="tiny-results.json is missing"):
        write_card(card, tmp_path / "card_assets" / "tiny-results.json", profile, {"r16": {}}, "fp")
    assert card.read_text(encoding="utf-8") == text


def test_stale_and_busy_figures_are_marked_where_they_stand():
    """A figure measured under another config is marked †, one timed on a busy machine ‡, each with its reason."""
    prov_old = {"config_hash": "old", "data_fingerprint": "fp"}
    results = {**_results("tiny", {"r8": {
        "quality": {"validation": {"n": 5, "em": 0.5, "f1": 0.5}, "provenance": prov_old},
        "latency": {"p50_s": 1.0, "p95_s": 1.2, "busy": True, "busy_reason": "load 3.0 on 2 cores",
                    "provenance": {"config_hash": "new", "data_fingerprint": "fp"}}}}),
        "config_hash": "new", "data_fingerprint": "fp"}
    text = render_section(results)
    assert "0.500†" in text and "1.000s‡" in text
    assert "measured under config `old`" in text and "load 3.0 on 2 cores" in text


def test_ratios_keep_two_digits_below_ten():
    assert fmt_ratio(0.95) == "0.95x" and fmt_ratio(13.94) == "13.9x" and fmt_ratio(None) == "n/a"


def test_published_files_are_readable_by_others(tmp_path):
    """mkstemp makes 0600 files: a card or results file must keep the mode a plain write gives (0644 here)."""
    path = tmp_path / "MODEL_CARD.md"
    atomic_write_text(path, "x")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_fixtures_only_map_the_library_onto_pytest_scopes():
    """No training, timing or file writing in fixtures/sweep.py: each fixture is a few lines over one library call."""
    tree = ast.parse((REPO / "fixtures" / "sweep.py").read_text(encoding="utf-8"))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported <= {"__future__", "harness.plugin"}, imported
    for fn in (n for n in tree.body if isinstance(n, ast.FunctionDef)):
        assert len(fn.body) <= 6, f"fixture {fn.name} has {len(fn.body)} statements"
        names = {n.attr if isinstance(n, ast.Attribute) else getattr(n, "id", "") for n in ast.walk(fn)}
        assert not names & {"open", "write_text", "perf_counter", "train_adapter", "ensure_adapter", "save"}, fn.name


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The harness modules ``path`` imports, lazy imports included, as dotted names."""
    name, tree = _module_name(path), ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
            out.add(target)
            out.update(f"{target}.{a.name}" for a in node.names)  # ``from . import schema``
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("harness"):
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("harness"))
    return out


def test_harness_has_no_import_cycle_and_small_modules_with_all():
    """Every import, lazy ones included, forms no cycle; each module stays under 400 lines and has an __all__, and
    so does every package's __init__.py."""
    modules = {_module_name(p): p for p in HARNESS.rglob("*.py")}
    graph = {m: _imports(p) & set(modules) - {m} for m, p in modules.items()}

    def visit(node, stack):
        if node in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(node):] + [node]))
        for nxt in graph[node]:
            visit(nxt, stack + [node])

    for m in graph:
        visit(m, [])
    assert "harness.config.profiles" in graph["harness.sweep"], "the import graph lost the subpackages"
    for m, p in modules.items():
        text = p.read_text(encoding="utf-8")
        assert len(text.splitlines()) <= 400, f"{p.relative_to(REPO)} has {len(text.splitlines())} lines"
        assert "__all__" in text, f"{p.relative_to(REPO)} has no __all__"


def test_the_harness_layout_follows_the_data_path_and_the_code_digests_name_real_files():
    """The subpackages along the data path, only the recipe and the plugin at the top, and every file an adapter
    key or an eval key digests exists (a renamed module must not silently drop out of the key)."""
    from harness.measure.predictions import EVAL_SOURCES

    packages = {p.parent.name for p in HARNESS.glob("*/__init__.py")}
    assert packages == {"config", "data", "models", "train", "engines", "measure", "report", "bench"}, packages
    assert {p.name for p in HARNESS.glob("*.py")} == {"__init__.py", "sweep.py", "sweep_state.py", "plugin.py"}
    for src in (*adapters.ADAPTER_SOURCES, *EVAL_SOURCES):
        assert src.is_file() and HARNESS in src.parents, src


def test_nothing_trains_inside_load_or_evaluate(tmp_path):
    """Training is its own phase: loading or evaluating a variant that was never trained says to train it, and
    has written nothing (a ``load`` that trained as a side effect would pass a weaker test that only checks the
    result)."""
    profile = quick_profile(tmp_path / "p", {"variants": ["r8"]})
    sweep = Sweep.prepare(profile, runs_dir=tmp_path / "runs", card=tmp_path / "MODEL_CARD.md")
    for call in (sweep.load, sweep.evaluate, sweep.parity):
        with pytest.raises(RuntimeError, match=r"call sweep\.train\('r8'\)"):
            call("r8")
    assert not (tmp_path / "runs").exists()


def test_a_profile_outside_the_project_writes_into_the_project(tmp_path):
    """Your own data: a profile anywhere on disk files its runs and card under the project, not beside the YAML."""
    profile = write_profile(tmp_path / "elsewhere", {"name": "my-data"})
    sweep = Sweep.prepare(profile)
    assert sweep.runs_dir == PROJECT_ROOT / "runs" and sweep.card == PROJECT_ROOT / "MODEL_CARD.md"


@pytest.mark.parametrize("form", ["space", "equals"])
def test_profile_path_with_a_space_or_equals_keeps_pytest_ini(tmp_path, form):
    """``--profile /abs/my.yaml``: pytest would take the YAML for a test path and drop pytest.ini (markers,
    warnings, testpaths); the plugin restarts it with ``--profile=``. Only the benchmark suites are collected."""
    profile = write_profile(tmp_path / "elsewhere", {"name": "my-data"})
    args = ["--profile", str(profile)] if form == "space" else [f"--profile={profile}"]
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args, "--co", "-q"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    collected = [line for line in done.stdout.splitlines() if "::" in line]
    assert collected and all(line.startswith("suites/benchmark/") for line in collected), done.stdout[-2000:]
    assert "PytestUnknownMarkWarning" not in done.stdout


@pytest.mark.slow
def test_a_session_logs_where_its_seconds_went(tmp_path):
    """``runs/<profile>/phases.log`` takes apart what ``--durations`` shows as one setup: the compile cache's load, the
    synthetic weights drawn (no checkpoint written), the base loaded to train on, the training, the merged base, its
    compiles, each merge, with wall times; a phase that raised says so. (A log that named phases without their times,
    or dropped a failed one, would mislead the next person looking for a GPU run's seconds.)"""
    from harness.report.phases import timed

    profile = quick_profile(tmp_path / "p", {"variants": ["baseline", "r8"]})
    sweep = Sweep.prepare(profile, runs_dir=tmp_path / "runs", card=None)
    sweep.train("r8")
    sweep.load("r8")
    with pytest.raises(KeyError), timed("merge", "a phase that raises"):
        raise KeyError("x")
    log = tmp_path / "runs" / sweep.profile.name / "phases.log"
    lines = log.read_text().splitlines()
    written = len(lines)
    notes = [line.split(" what=", 1)[1] for line in lines if " wall_s=" not in line]  # decisions, no time of their own
    q = sweep.profile.quantization
    nf4 = nf4_store.folder(Path("."), config_hash(nf4_store.key_parts(sweep.profile.model, q, "cpu")))
    assert notes == [f"none (key {sweep.state.compile_cache['key']})", f"quantized and kept as {nf4.name}"], lines
    # phase=startup is the process's first line, so it is here only when this test logs first (test_reuse holds it)
    lines = [line for line in lines if " wall_s=" in line and " phase=startup " not in line]
    fields = [dict(kv.split("=", 1) for kv in line.split(" what=")[0].split()[1:]) for line in lines]
    whats = [line.split(" what=", 1)[1] for line in lines]
    assert [f["phase"] for f in fields] == ["compile-cache", "synthetic-weights", "model-load", "train", "engine-build",
                                           "compile", "merge", "merge"], lines
    assert all(float(f["wall_s"]) >= 0 and int(f["pid"]) == os.getpid() for f in fields), lines
    assert whats[3] == whats[6] == "r8" and fields[-1]["failed"] == "KeyError", lines
    assert "failed" not in fields[6] and whats[1].endswith(": random weights drawn, no checkpoint written"), lines
    Sweep.prepare(profile, runs_dir=tmp_path / "other", card=None).restore_compiled()  # a later sweep owns the log
    with timed("merge", "after"):
        pass
    assert len(log.read_text().splitlines()) == written  # the "after" line went to the later sweep's log


@pytest.mark.slow
def test_no_round_is_timed_while_the_kernel_build_runs(tmp_path, monkeypatch):
    """The latency benchmark's timed unit and the engine comparison start only once ``merged-int4``'s background kernel
    build (a compiler on every core) has ended: a round timed beside it times the compiler too. Seen on an H200: a
    cold run whose setup the compile cache had shortened timed the baseline's 50 rounds on 13 of 16 busy cores. The
    build is kernel_build's own background start, with a one-second stand-in for the compiler (this machine has no
    CUDA)."""
    import time

    from harness.engines import kernel_build

    profile = quick_profile(tmp_path / "p", {"variants": ["baseline", "r16"]})
    sweep = Sweep.prepare(profile, runs_dir=tmp_path / "runs", card=None)
    sweep.train("r16")
    ended: list[float] = []
    for name, start in (("decode_call", lambda: sweep.decode_call("r16")), ("compare_engines", sweep.compare_engines)):
        ended.clear()
        with monkeypatch.context() as m:  # only the start sees CUDA: the sweep runs on this machine's CPU
            m.setattr(kernel_build.torch.cuda, "is_available", lambda: True)
            kernel_build.build_in_background(lambda cache_dir: (time.sleep(1.0), ended.append(time.monotonic())),
                                             tmp_path / "kernels")
        assert kernel_build.background_build_running()
        start()
        assert ended, f"{name} returned while the build was still running"
    log = (tmp_path / "runs" / sweep.profile.name / "phases.log").read_text()
    assert log.count("phase=kernels") == 2, log


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a thread's own nice value is Linux's")
def test_the_kernel_build_yields_the_cores_to_the_session(tmp_path, monkeypatch):
    """The background build and the compiler processes it starts run ``BUILD_NICENESS`` below the session, which
    keeps its own priority: at the same priority the compiler on every core slowed the trainings beside it (trl's
    trainer took 4.5 s to build instead of 1.0 on an H100)."""
    from harness.engines import kernel_build

    seen: dict[str, int] = {}

    def build(cache_dir):
        seen["thread"] = os.getpriority(os.PRIO_PROCESS, 0)
        child = subprocess.run([sys.executable, "-c", "import os; print(os.nice(0))"], capture_output=True, text=True)
        seen["compiler"] = int(child.stdout)

    session = os.nice(0)
    with monkeypatch.context() as m:
        m.setattr(kernel_build.torch.cuda, "is_available", lambda: True)
        kernel_build.build_in_background(build, tmp_path / "kernels")
    kernel_build.wait_for_background_build()
    lowered = min(session + kernel_build.BUILD_NICENESS, 19)
    assert seen == {"thread": lowered, "compiler": lowered}, seen
    assert os.nice(0) == session  # the session's own priority is unchanged


def test_selecting_variants_starts_the_kernel_build_before_the_first_test(tmp_path, monkeypatch):
    """The plugin selects the run's variants once tests are collected, and that starts the engines' kernel build, so
    it runs beside the freeze's imports and the setup: started at the first training instead, a cold H100 run whose
    setup took 47 s waited 5.4 s for it before its first timed round (420ba55). Selecting none (an xdist worker)
    leaves the build to ``train_selected``; a second start for the same folder in one process starts nothing; AWQ's
    library builds only where ``merged-int4`` is timed."""
    from harness.engines import builds, kernel_build

    started: list[tuple[str, Path]] = []
    monkeypatch.setattr(kernel_build, "build_in_background", lambda build, folder: started.append((build.__module__,
                                                                                                    folder)))
    monkeypatch.setattr(builds, "_started", set())
    runs = tmp_path / "runs"
    sweep = Sweep.prepare(quick_profile(tmp_path / "p", {"variants": ["baseline", "r16"]}), runs_dir=runs, card=None)
    sweep.select(())
    assert started == []
    sweep.select(["r16"])
    assert started == [("harness.engines.gemv", runs / "_kernels")]
    builds.start_engine_builds(["seed", "merged", "merged-int4"], runs / "_kernels")
    assert [module for module, _ in started] == ["harness.engines.gemv", "harness.engines.awq_kernels"]
