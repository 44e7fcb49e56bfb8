"""The pytest plugin (registered as ``qlora`` through the ``pytest11`` entry point): options, variant
parametrization, and at session end the merged results file, the card and a summary table.

This is the only module that knows pytest; everything it calls is plain library code.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from .config import ConfigError, load_profile
from .data import DataError
from .inputs import check_profile_data
from .results import ResultsRecorder, load_results, results_path

PROFILE_KEY = pytest.StashKey["object"]()
RECORDER_KEY = pytest.StashKey["ResultsRecorder"]()
SPLITS_KEY = pytest.StashKey[dict]()
_STARTED_KEY = pytest.StashKey[float]()
_ENDED_KEY = pytest.StashKey[dict]()  # variant -> why its remaining tests do not run (out of memory)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("qlora", "QLoRA benchmark harness")
    group.addoption("--profile", default=os.environ.get("QLORA_PROFILE", "tiny"),
                    help="profile to run: a name from data/configs (tiny, synthetic-7b, mistral-7b) or a YAML path "
                         "(default: tiny, or $QLORA_PROFILE)")
    group.addoption("--runs-dir", default="runs", type=Path,
                    help="where adapters, manifests, predictions and results.json go (default: runs)")
    group.addoption("--card", default="MODEL_CARD.md", type=Path,
                    help="model card to update between its results markers (default: MODEL_CARD.md)")
    group.addoption("--retrain", action="store_true", default=False,
                    help="train every selected variant again even when a matching artifact exists")
    group.addoption("--latency-runs", type=int, default=None,
                    help="timed rounds per variant in the latency suite (default: the profile's latency.rounds)")
    group.addoption("--no-card", action="store_true", default=False,
                    help="collect results but do not touch the model card")


def pytest_configure(config: pytest.Config) -> None:
    # A bad profile or dataset is one error before any test runs, and nothing is written.
    try:
        profile = load_profile(config.getoption("profile"))
        config.stash[SPLITS_KEY] = check_profile_data(profile)
    except (ConfigError, DataError) as e:
        raise pytest.UsageError(str(e)) from None
    rounds = config.getoption("latency_runs")
    if rounds is not None and rounds < 1:
        raise pytest.UsageError(f"--latency-runs {rounds}: give at least 1 timed round")
    runs = config.getoption("runs_dir")
    if runs is not None and not Path(runs).is_absolute():
        config.option.runs_dir = Path(config.rootpath) / runs
    card = config.getoption("card")
    if card is not None and not Path(card).is_absolute():
        config.option.card = Path(config.rootpath) / card
    config.stash[PROFILE_KEY] = profile
    config.stash[RECORDER_KEY] = ResultsRecorder(profile)
    config.stash[_STARTED_KEY] = time.time()
    config.stash[_ENDED_KEY] = {}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize ``variant_name`` over the profile's variants, with ids baseline/r8/r16/r32 for ``-k``."""
    if "variant_name" in metafunc.fixturenames:
        names = list(metafunc.config.stash[PROFILE_KEY].variants)
        metafunc.parametrize("variant_name", names, ids=names, scope="session")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On a GPU profile every variant test is a gpu test: ``-m gpu`` selects the whole sweep."""
    profile = config.stash[PROFILE_KEY]
    if not profile.requires_gpu:
        return
    import torch

    no_cuda = None if torch.cuda.is_available() else pytest.mark.skip(
        reason=f"profile {profile.name!r} needs a CUDA GPU (requires_gpu: true in {profile.source_file})")
    for item in items:
        if {"variant_name", "engines"} & set(getattr(item, "fixturenames", ())):  # per-variant and speed tests
            item.add_marker(pytest.mark.gpu)
            if no_cuda:
                item.add_marker(no_cuda)


def _variant_of(item: pytest.Item) -> str | None:
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("variant_name") if callspec else None


def end_variant(config: pytest.Config, variant: str, message: str) -> None:
    """Fail the variant's remaining tests with ``message`` (it ran out of memory); the other variants still run.

    What the session recorded for it is dropped: its row in results.json keeps its last complete figures rather
    than half of them stamped with this run's provenance.
    """
    config.stash[_ENDED_KEY].setdefault(variant, message)
    config.stash[RECORDER_KEY].discard(variant)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    message = item.config.stash[_ENDED_KEY].get(_variant_of(item)) if _ENDED_KEY in item.config.stash else None
    if message:
        pytest.fail(message, pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    """A CUDA OOM raised by a test body (e.g. a latency round) ends its variant like one raised by a fixture."""
    variant = _variant_of(item)
    try:
        return (yield)
    except Exception as e:
        torch = sys.modules.get("torch")
        if variant is None or torch is None or not isinstance(e, torch.cuda.OutOfMemoryError):
            raise
        from .oom import describe_oom, memory_now

        message = describe_oom(item.config.stash[PROFILE_KEY], variant, "inference", memory_now(), str(e))
    loaded = item.funcargs.get("loaded_variant") if hasattr(item, "funcargs") else None
    if loaded is not None:  # the fixture holds the model and its decoder: drop them so the memory can go
        loaded.model = None
        if hasattr(loaded, "engine"):
            loaded.engine = None
    from .models import free_model

    free_model()
    end_variant(item.config, variant, message)
    pytest.fail(message, pytrace=False)


def _is_xdist_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    if PROFILE_KEY not in config.stash or exitstatus == pytest.ExitCode.INTERRUPTED:
        return  # a Ctrl-C leaves results.json and the card in their last good state
    recorder = config.stash[RECORDER_KEY]
    runs_dir = config.getoption("runs_dir")
    if recorder:
        recorder.save(runs_dir)
    if _is_xdist_worker(config) or config.getoption("no_card"):
        return
    path = results_path(runs_dir, config.stash[PROFILE_KEY].name)
    if path.exists() and path.stat().st_mtime >= config.stash[_STARTED_KEY]:
        _write_card(config, load_results(path))


def _write_card(config: pytest.Config, results: dict) -> None:
    from .card import update_card
    from .plots import write_plots

    card = Path(config.getoption("card"))
    assets = card.parent / "card_assets"
    plots = write_plots(results, assets, link_prefix=os.path.relpath(assets, card.parent))
    profile = config.stash[PROFILE_KEY]
    results["max_new_tokens"] = profile.eval.max_new_tokens
    base = None if profile.model.source.startswith("synthetic:") else profile.model.source
    update_card(card, results, plots, base_model=base)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if PROFILE_KEY not in config.stash or _is_xdist_worker(config):
        return
    path = results_path(config.getoption("runs_dir"), config.stash[PROFILE_KEY].name)
    if not path.exists() or path.stat().st_mtime < config.stash[_STARTED_KEY]:
        return
    from .card import results_table

    terminalreporter.section(f"qlora results: profile {config.stash[PROFILE_KEY].name}")
    terminalreporter.write_line(results_table(load_results(path)))
    terminalreporter.write_line(f"results: {path}")
