"""The pytest plugin (registered as ``qlora`` through the ``pytest11`` entry point): options, the session's
``Sweep``, variant parametrization and markers, out-of-memory handling, and at session end the results file, the
card and a summary table.

Inert until asked: installed, the entry point is loaded by every project's pytest; only the harness's own checkout
as rootdir, or a qlora option on the command line, wakes it (``_wanted``). Otherwise it registers its options and
nothing else: no profile, no markers, no re-exec, no output, no file.

This is the only module that knows pytest; everything it calls is plain library code (``harness.sweep``). It
knows a per-variant test by its ``qlora_variant`` marker (set when ``variant_name`` is parametrized) and an engine
comparison by the ``qlora_speed`` marker, never by fixture names.
"""

from __future__ import annotations

import os
import re
import sys
from collections import Counter
from pathlib import Path

import pytest

from .config.errors import InputError
from .config.profiles import available_profiles
from .report.phases import end_session, milestone
from .train.oom import VariantOutOfMemory, is_out_of_memory

__all__ = ["SWEEP_KEY", "MARKERS", "end_variant", "variant_of"]

SWEEP_KEY = pytest.StashKey["object"]()
_ENDED_KEY = pytest.StashKey[dict]()  # variant -> why its remaining tests do not run (out of memory)
_SESSION_OPTION, _GPU_OPTION = "qlora_session", "qlora_gpu"

MARKERS = (
    "gpu: needs a CUDA GPU (VRAM ceilings, the synthetic-7b and mistral-7b profiles); skips without one",
    "slow: trains or generates with a model",
    "invariants: hypothesis property tests of metrics and prompt format",
    "benchmark: latency measured with pytest-benchmark",
    "qlora_variant(name): set by the plugin on every test parametrized over the profile's variants",
    "qlora_speed: compares the inference engines on inference.speed_variant",
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("qlora", "QLoRA benchmark harness")
    group.addoption("--profile", default=None,
                    help=f"profile to run: a name from data/configs ({', '.join(available_profiles())}) or the path "
                         f"of a YAML file (default: tiny, or $QLORA_PROFILE)")
    group.addoption("--runs-dir", default=None, type=Path,
                    help="where adapters, manifests, predictions and results.json go (default: the project's runs/)")
    group.addoption("--card", default=None, type=Path,
                    help="model card to update between its results markers (default: the project's MODEL_CARD.md)")
    group.addoption("--retrain", action="store_true", default=None,  # None: not given (see _wanted)
                    help="train every selected variant again, once, even when a matching artifact exists")
    group.addoption("--retime", action="store_true", default=None,
                    help="time every latency and engine round, even where a figure timed earlier on this machine "
                         "under the same key would be reused once fresh rounds confirm it (harness/measure/reuse.py)")
    group.addoption("--latency-runs", type=int, default=None,
                    help="timed rounds per variant in the latency suite (default: the profile's latency.rounds)")
    group.addoption("--no-card", action="store_true", default=None,
                    help="record results in runs/ but do not touch the model card")
    group.addoption("--quality-compare", default=None, type=Path, metavar="RUNS_DIR",
                    help="a saved runs dir (e.g. a copy of runs/ from the last good run): each variant's predictions "
                         "are paired with the saved ones (same eval key) and fail when the paired ΔF1 CI lies wholly "
                         "below -eval.max_f1_regression")


_VALUE_OPTIONS = ("--profile", "--runs-dir", "--card", "--latency-runs", "--quality-compare")
_OPTION_DESTS = ("profile", "runs_dir", "card", "retrain", "retime", "latency_runs", "no_card", "quality_compare")


def _wanted(config: pytest.Config) -> bool:
    """The plugin wakes for the harness's own project, or when a qlora option asks for it; every other project's
    pytest run, which loads its entry point too, stays untouched (no profile read, re-exec, marker, output or file)."""
    from .report.provenance import PROJECT_ROOT

    return (config.rootpath.resolve() == PROJECT_ROOT or _is_harness_checkout(config.rootpath)
            or any(config.getoption(dest) is not None for dest in _OPTION_DESTS))


def _is_harness_checkout(path: Path) -> bool:
    pyproject = path / "pyproject.toml"
    return pyproject.is_file() and re.search(r'^name\s*=\s*"qlora-bench"', pyproject.read_text(encoding="utf-8"),
                                             re.MULTILINE) is not None


def _check_installed_from(config: pytest.Config) -> None:
    """The profiles, data, runs/ and card live in the checkout installed from; ``pip install .``'s copy has none."""
    from .report.provenance import PROJECT_ROOT
    from .config.profiles import CONFIG_DIR

    if not CONFIG_DIR.is_dir():
        raise pytest.UsageError(
            f"qlora-bench is installed without -e: its package in {PROJECT_ROOT / 'harness'} has no data/configs, "
            f"data or runs/. From the project's checkout run: pip install -e .")
    if _is_harness_checkout(config.rootpath) and config.rootpath.resolve() != PROJECT_ROOT:
        raise pytest.UsageError(
            f"this checkout ({config.rootpath}) is not the one qlora-bench is imported from ({PROJECT_ROOT}): "
            f"run pip install -e . in it, or start pytest as python -m pytest from it")


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config, parser, args) -> None:
    """``--profile /abs/my.yaml`` (a space, not ``=``): pytest sets its rootdir before this plugin is loaded, so it
    took the path for a test path, lost pytest.ini (markers, warning policy, testpaths) and collected from the
    path's folder. Start again with ``--profile=/abs/my.yaml``, which it reads correctly (same for our other
    options that take a value)."""
    from .report.provenance import PROJECT_ROOT

    argv = list(early_config.invocation_params.args)  # the re-exec below needs a qlora option in argv: inert otherwise
    if (sys.argv[1:] != argv or early_config.inipath == PROJECT_ROOT / "pytest.ini"
            or not (PROJECT_ROOT / "pytest.ini").exists()):
        return
    fixed, i = [], 0
    while i < len(argv):
        if argv[i] in _VALUE_OPTIONS and i + 1 < len(argv):
            fixed.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            fixed.append(argv[i])
            i += 1
    if fixed != argv:
        capture = early_config.pluginmanager.getplugin("capturemanager")
        if capture is not None:  # fd 1 and 2 point at pytest's capture files until this is undone
            capture.stop_global_capturing()
        sys.stdout.flush()
        os.chdir(early_config.invocation_params.dir)
        os.execv(sys.executable, [sys.executable, "-m", "pytest", *fixed])


def pytest_configure(config: pytest.Config) -> None:
    if not _wanted(config):
        return
    milestone("configure")
    _check_installed_from(config)
    from .sweep import Sweep

    for line in MARKERS:
        config.addinivalue_line("markers", line)
    _pin_worker_gpu(config)
    if (rounds := config.getoption("latency_runs")) is not None and rounds < 1:
        raise pytest.UsageError(f"--latency-runs {rounds}: give at least 1 timed round")
    here = config.invocation_params.dir
    runs, card = config.getoption("runs_dir"), config.getoption("card")
    profile = config.getoption("profile") or os.environ.get("QLORA_PROFILE", "tiny")  # read once awake, never before
    try:  # a bad profile or dataset is one error before any test runs, and nothing is written
        sweep = Sweep.prepare(profile, runs_dir=runs and here / runs, card=card and here / card,
                              retrain=bool(config.getoption("retrain")), retime=bool(config.getoption("retime")),
                              session_id=getattr(config, "workerinput", {}).get(_SESSION_OPTION))
    except InputError as e:
        raise pytest.UsageError(str(e)) from None
    sweep.saved_runs_dir = (saved := config.getoption("quality_compare")) and here / saved
    config.stash[SWEEP_KEY] = sweep
    config.stash[_ENDED_KEY] = {}
    if _GPU_SELECTED.search(config.option.markexpr or "") and not hasattr(config, "workerinput"):
        config.pluginmanager.register(MeasuredNothing(), "qlora-measured-nothing")


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:
    """xdist: every worker stamps its figures with the controller's session id, so the controller can tell them
    from older ones when it writes the card; with several GPUs, worker N gets GPU N mod count to itself."""
    if SWEEP_KEY not in node.config.stash:
        return
    node.workerinput[_SESSION_OPTION] = node.config.stash[SWEEP_KEY].recorder.session_id
    import torch

    gpus = torch.cuda.device_count()  # the controller never runs CUDA work itself
    if gpus > 1:
        index = int(str(node.workerinput.get("workerid", "gw0")).removeprefix("gw"))
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if os.environ.get("CUDA_VISIBLE_DEVICES") \
            else [str(i) for i in range(gpus)]
        node.workerinput[_GPU_OPTION] = visible[index % len(visible)]


def _pin_worker_gpu(config: pytest.Config) -> None:
    """Before anything in this worker touches CUDA: see only the GPU the controller gave it."""
    gpu = getattr(config, "workerinput", {}).get(_GPU_OPTION)
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize ``variant_name`` over the profile's variants, ids baseline/r8/r16/r32 for ``-k``; each carries
    the ``qlora_variant`` marker."""
    if SWEEP_KEY not in metafunc.config.stash:
        return
    sweep = metafunc.config.stash[SWEEP_KEY]
    if "variant_name" in metafunc.fixturenames:
        names = list(sweep.profile.variants)
        metafunc.parametrize("variant_name", [pytest.param(n, id=n, marks=pytest.mark.qlora_variant(n))
                                              for n in names], scope="session")
    if "engine_name" in metafunc.fixturenames:
        names = list(sweep.profile.inference.speed_engines)
        metafunc.parametrize("engine_name", names, ids=names)


def variant_of(item: pytest.Item) -> str | None:
    mark = item.get_closest_marker("qlora_variant")
    return mark.args[0] if mark else None


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On a GPU profile every variant and engine test is a gpu test, so ``-m gpu`` selects the whole sweep. Under
    xdist every test of a variant is one ``xdist_group``: ``--dist loadgroup`` gives a variant to one worker (GPU)."""
    if SWEEP_KEY not in config.stash:
        return
    profile = config.stash[SWEEP_KEY].profile
    if getattr(config.option, "numprocesses", None):
        for item in items:
            if variant_of(item):
                item.add_marker(pytest.mark.xdist_group(name=f"variant-{variant_of(item)}"))
    if not profile.requires_gpu:
        return
    import torch

    no_cuda = None if torch.cuda.is_available() else pytest.mark.skip(
        reason=f"profile {profile.name!r} needs a CUDA GPU (requires_gpu: true in {profile.source_file})")
    for item in items:
        if variant_of(item) or item.get_closest_marker("qlora_speed"):
            item.add_marker(pytest.mark.gpu)
            if no_cuda:
                item.add_marker(no_cuda)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Before any test runs: tell the sweep which variants this run selected (after -k/-m), which starts the kernels'
    build (``train_selected`` trains them all before any model loads); then freeze what is alive
    (``memory.freeze_long_lived``: its imports take seconds, which the build overlaps)."""
    if SWEEP_KEY not in session.config.stash:
        return
    from .measure.memory import freeze_long_lived

    milestone("collected")
    sweep = session.config.stash[SWEEP_KEY]
    wanted = {variant_of(item) for item in session.items} - {None}
    if any(item.get_closest_marker("qlora_speed") for item in session.items):
        wanted.add(sweep.profile.inference.speed_variant)
    # xdist: a worker runs an unknown share; it trains what it runs
    sweep.select(() if hasattr(session.config, "workerinput") else wanted)
    freeze_long_lived()


def end_variant(config: pytest.Config, variant: str, message: str) -> None:
    """Fail the variant's remaining tests with ``message``; drop what the session recorded for it, so its row keeps
    its last complete figures rather than half of them stamped with this run's provenance."""
    config.stash[_ENDED_KEY].setdefault(variant, message)
    sweep = config.stash[SWEEP_KEY]
    sweep.recorder.discard(variant)
    sweep.release()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    message = item.config.stash[_ENDED_KEY].get(variant_of(item)) if _ENDED_KEY in item.config.stash else None
    if message:
        pytest.fail(message, pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef, request):
    """A VariantOutOfMemory raised while a fixture loads or scores a variant ends that variant, with its message."""
    try:
        return (yield)
    except VariantOutOfMemory as error:
        message, e = str(error), error
    item = getattr(request, "_pyfuncitem", None)  # the test this fixture is being set up for
    end_variant(request.config, (variant_of(item) if item else None) or e.variant, message)
    raise pytest.fail.Exception(message, pytrace=False) from None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    """A CUDA OOM raised by a test body (a latency round, a batched generate) ends its variant like a fixture's."""
    variant = variant_of(item)
    try:
        return (yield)
    except Exception as e:
        if variant is None or not isinstance(e, VariantOutOfMemory) and not is_out_of_memory(e):
            raise
        from .measure.memory import memory_now
        from .train.oom import describe_oom

        sweep = item.config.stash[SWEEP_KEY]
        message = str(e) if isinstance(e, VariantOutOfMemory) else describe_oom(sweep.profile, variant, "inference",
                                                                                 memory_now(), str(e))
    end_variant(item.config, variant, message)
    pytest.fail(message, pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem):
    """After each test, what the session measured so far goes to disk (``Sweep.save_progress``): a process that dies
    natively later, or a run interrupted by its deadline, keeps it."""
    try:
        return (yield)
    finally:
        if SWEEP_KEY in item.config.stash:
            item.config.stash[SWEEP_KEY].save_progress()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Save the session's figures; then end a started phase log with the exit status (``MeasuredNothing``'s hook runs
    first): ``.ci/gpu``'s ``session_rc``, which tells a deadline in the interpreter's exit from one in a test."""
    config = session.config
    if SWEEP_KEY not in config.stash:
        return
    sweep = config.stash[SWEEP_KEY]
    if exitstatus != pytest.ExitCode.INTERRUPTED:  # a Ctrl-C leaves results.json and the card in their last good state
        sweep.close()
        worker = hasattr(config, "workerinput")
        if sweep.recorder:
            sweep.save(card=not worker and not config.getoption("no_card"))
        elif not worker and not config.getoption("no_card") and getattr(config.option, "numprocesses", None):
            _card_from_workers(sweep)
    if sweep.state.compile_cache is not None:
        sweep.own_phase_log()  # a sweep made inside a test (the real-OOM test's) may have taken the log over
        end_session(int(session.exitstatus))


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_commit_info(config, commit_info: dict) -> None:
    """pytest-benchmark reads its commit from git, which the GPU machine's copy of the tree lacks: its
    ``benchmark.json`` then says ``"id": "unknown"``. Name the commit every other figure of the run names
    (``provenance.git_sha``: there ``$QLORA_GIT_SHA``), and say so; a commit git gave is left as it is."""
    if SWEEP_KEY not in config.stash or commit_info.get("id") not in ("unknown", "unversioned"):
        return
    from .report.provenance import git_sha

    sha = git_sha()
    if sha != "unknown":
        commit_info.update(id=sha.removesuffix("-dirty"), dirty=sha.endswith("-dirty"),
                           id_from="the harness's provenance ($QLORA_GIT_SHA or .git_sha): no usable .git here")


_GPU_SELECTED = re.compile(r"(?<!not )\bgpu\b")  # -m gpu, -m "gpu and not slow"; not -m "not gpu"


class MeasuredNothing:
    """``-m gpu`` is the gate run: when every test it selected skipped (no CUDA, no weights), it measured nothing,
    and it exits 1 with one line saying why, instead of pytest's 0 for a run of skips."""

    def __init__(self):
        self.outcomes: dict[str, str] = {}
        self.reasons: Counter[str] = Counter()
        self.line: str | None = None

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.failed:
            self.outcomes[report.nodeid] = "failed"
        elif report.skipped:
            self.outcomes.setdefault(report.nodeid, "skipped")
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            self.reasons[reason.removeprefix("Skipped: ")] += 1
        elif report.when == "call":
            self.outcomes[report.nodeid] = "passed"

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if session.exitstatus != pytest.ExitCode.OK or not self.outcomes:
            return
        if all(outcome == "skipped" for outcome in self.outcomes.values()):
            why = self.reasons.most_common(1)[0][0] if self.reasons else "skipped"
            self.line = (f"qlora: the gpu gate measured nothing: all {len(self.outcomes)} selected tests skipped "
                         f"({why}); run it where CUDA and the model's weights are")
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.line:
            terminalreporter.write_line(self.line, red=True, bold=True)


def _card_from_workers(sweep) -> None:
    """xdist controller: the workers saved their figures to runs/; put this session's into the card."""
    from .report.results import load_results, results_path, session_sections

    figures = session_sections(load_results(results_path(sweep.runs_dir, sweep.profile.name)),
                               sweep.recorder.session_id)
    if figures:
        sweep.write_card(figures)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if SWEEP_KEY not in config.stash or hasattr(config, "workerinput"):
        return
    from .report.card_render import results_table
    from .report.results import load_results, results_path, session_sections

    sweep = config.stash[SWEEP_KEY]
    path = results_path(sweep.runs_dir, sweep.profile.name)
    results = load_results(path)
    mine = session_sections(results, sweep.recorder.session_id)
    if not mine:
        return
    terminalreporter.section(f"qlora results: profile {sweep.profile.name} (this session's rows)")
    terminalreporter.write_line(results_table({**results, "variants": {k: results["variants"][k] for k in mine}},
                                              padded=True))
    terminalreporter.write_line(f"results: {path}")
