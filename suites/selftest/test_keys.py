"""Keys and provenance: what pairs predictions, what names an adapter, which commit a figure came from, and which
harness code made it. Each test changes one input and asserts the key, stamp or mark follows it."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import types

import pytest

import harness.engines.compile_cache as compile_cache
import harness.measure.predictions as predictions
import harness.train.adapters as variants
from fixtures.user_runs import REPO, write_profile
from harness.report import provenance as artifacts
from harness.report.card_render import render_section
from harness.config.errors import ConfigError
from harness.config.profiles import config_hash, load_profile
from harness.config.preflight import check_profile_data
from harness.models.revision import pin_revision

SHA = "0123456789abcdef0123456789abcdef01234567"


def _with(fn, **changes):
    """``fn`` returning its usual dict with ``changes`` applied (another library version, say)."""
    return lambda *a, **k: {**fn(*a, **k), **changes}


@pytest.mark.parametrize("library", ["bitsandbytes", "torch", "transformers"])
def test_a_baseline_made_with_another_library_version_gets_another_eval_key(monkeypatch, library):
    """A baseline decoded by another bitsandbytes (or torch, transformers) must not be paired into ΔF1."""
    profile = load_profile("tiny")
    before = predictions.eval_key(profile, "fp")
    monkeypatch.setattr(predictions, "library_versions", _with(artifacts.library_versions, **{library: "0.0.1"}))
    assert predictions.eval_key(profile, "fp") != before


def test_a_baseline_decoded_on_another_device_gets_another_eval_key(monkeypatch):
    profile = load_profile("tiny")
    before = predictions.eval_key(profile, "fp")
    monkeypatch.setattr(predictions, "device_kind", lambda: "cuda:NVIDIA H100 80GB HBM3")
    assert predictions.eval_key(profile, "fp") != before
    assert predictions.eval_key_parts(profile, "fp")["device"] == "cuda:NVIDIA H100 80GB HBM3"


@pytest.mark.parametrize("change", ["torch", "transformers", "device", "code"])
def test_a_synthetic_checkpoint_drawn_by_other_libraries_device_or_code_gets_another_folder(monkeypatch, tmp_path,
                                                                                            change):
    """Random weights follow the generator (torch, and CUDA's differs from the CPU's), the init functions
    (transformers) and the code that writes them: a checkpoint made under any other of these is never loaded."""
    import torch

    import harness.models.base as base

    before = base.synthetic_key("tiny", 0)
    if change == "device":
        monkeypatch.setattr(base, "device", lambda: torch.device("cuda", 0))
    elif change == "code":
        edited = tmp_path / "host_copy.py"
        edited.write_bytes(base.SYNTHETIC_SOURCES[1].read_bytes() + b"# edited\n")
        monkeypatch.setattr(base, "SYNTHETIC_SOURCES", (base.SYNTHETIC_SOURCES[0], edited))
    else:
        monkeypatch.setattr(base, "library_versions", _with(artifacts.library_versions, **{change: "0.0.1"}))
    assert base.synthetic_key("tiny", 0) != before
    assert base.synthetic_key("tiny", 1) != before  # and the seed, as before


def test_stored_predictions_with_line_separators_in_their_text_read_back_whole(tmp_path):
    """Random weights decode any token, U+2028, U+0085 or a form feed among them; ``ensure_ascii=False`` leaves those in
    the JSONL, and a reader splitting on every Unicode line break (``str.splitlines``) cut a row in two on the GPU."""
    rows = [{"id": "a", "prediction": "x\u2028y\u0085z\x0cw", "em": 0.0}, {"id": "b", "prediction": "plain", "em": 1.0}]
    path = tmp_path / "predictions" / "r8.jsonl"
    path.parent.mkdir()
    predictions.write_predictions(path, rows, "k")
    assert predictions.read_rows(path) == rows and predictions.read_matching(path, "k") == rows


@pytest.mark.parametrize("library", ["accelerate", "datasets"])
def test_accelerate_and_datasets_versions_change_the_adapter_key(monkeypatch, library):
    profile = load_profile("tiny")
    train = check_profile_data(profile)["train"]
    before = config_hash(variants.artifact_key(profile, profile.variant("r8"), train))
    monkeypatch.setattr(variants, "library_versions", _with(artifacts.library_versions, **{library: "0.0.1"}))
    assert config_hash(variants.artifact_key(profile, profile.variant("r8"), train)) != before


def test_every_listed_source_exists_and_a_missing_one_is_an_error(monkeypatch, tmp_path):
    """A listed module that was renamed away would drop out of the digest, and its edits out of every key."""
    for path in variants.ADAPTER_SOURCES + predictions.EVAL_SOURCES:
        assert path.is_file(), f"{path} is listed as a key source but does not exist"
    missing = tmp_path / "tokenize_rows.py"
    monkeypatch.setattr(variants, "ADAPTER_SOURCES", variants.ADAPTER_SOURCES + (missing,))
    profile = load_profile("tiny")
    with pytest.raises(FileNotFoundError, match=r"tokenize_rows.py: listed in harness.train.adapters.ADAPTER_SOURCES"):
        variants.artifact_key(profile, profile.variant("r8"), check_profile_data(profile)["train"])


def _hub_profile(tmp_path, revision, source="mistralai/Mistral-7B-Instruct-v0.3"):
    return load_profile(write_profile(tmp_path / "p", {"model": {"source": source, "revision": revision}}))


def test_a_branch_revision_that_cannot_be_resolved_is_refused_naming_file_and_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no hub here; the cache folder is empty
    profile = _hub_profile(tmp_path, "main")
    with pytest.raises(ConfigError) as info:
        pin_revision(profile, cache_dir=tmp_path / "hf-cache")
    message = str(info.value)
    line = next(i for i, x in enumerate(open(profile.source_file, encoding="utf-8"), 1) if "revision:" in x)
    assert f"{profile.source_file}:{line}: model.revision: 'main' is a branch or tag, not a commit" in message, message
    assert "HF_HUB_OFFLINE is set" in message and "refs/main" in message and "40-hex sha" in message


def test_no_revision_on_a_hub_id_means_main_and_is_resolved_from_the_local_cache(tmp_path, monkeypatch):
    """Offline, ``from_pretrained`` loads what the cache's refs/main points at: that commit is what gets keyed."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ref = tmp_path / "hf-cache" / "models--mistralai--Mistral-7B-Instruct-v0.3" / "refs" / "main"
    ref.parent.mkdir(parents=True)
    ref.write_text(SHA)
    for revision in ("main", None):
        assert pin_revision(_hub_profile(tmp_path, revision), cache_dir=tmp_path / "hf-cache").model.revision == SHA


def test_a_commit_sha_passes_and_a_local_source_needs_a_null_revision(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert pin_revision(_hub_profile(tmp_path, SHA), cache_dir=tmp_path).model.revision == SHA
    tiny = load_profile("tiny")
    assert pin_revision(tiny) is tiny  # synthetic, revision null
    with pytest.raises(ConfigError, match=r"model.revision: 'main' is a hub revision, but model.source 'synthetic"):
        pin_revision(_hub_profile(tmp_path, "main", source="synthetic:tiny"))


def test_a_real_git_checkout_wins_over_qlora_git_sha_and_both_are_recorded(monkeypatch):
    """A stale $QLORA_GIT_SHA in a shell must not relabel a run of the working tree (it can never say -dirty)."""
    if not (REPO / ".git").exists():
        pytest.skip("a copy of the tree without .git: the declared sha is all there is (next test)")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    monkeypatch.setenv(artifacts.SHA_ENV, "feedface")
    assert artifacts.git_sha().removesuffix("-dirty") == head
    stamp = artifacts.git_provenance()
    assert stamp["git_sha"].startswith(head) and stamp["git_sha_declared"] == "feedface"
    assert artifacts.provenance()["git_sha_declared"] == "feedface"


def test_without_git_the_declared_sha_is_used(monkeypatch, tmp_path):
    monkeypatch.setattr(artifacts, "_REPO_ROOT", tmp_path)  # a copy of the tree without .git (the GPU machine)
    monkeypatch.setenv(artifacts.SHA_ENV, "feedface")
    assert artifacts.git_sha() == "feedface" and artifacts.git_provenance() == {"git_sha": "feedface"}


def test_a_declared_sha_that_is_no_commit_is_unknown_and_recorded_as_declared(monkeypatch, tmp_path):
    """A placeholder left in the GPU command (``QLORA_GIT_SHA=SHA``, 2026-12-05) must not label a run as a commit:
    the run says ``unknown`` and keeps what was declared beside it. Mutation: taking any declared string fails."""
    monkeypatch.setattr(artifacts, "_REPO_ROOT", tmp_path)
    for bad in ("SHA", "<full sha>", "257f5bf!", "abc"):
        monkeypatch.setenv(artifacts.SHA_ENV, bad)
        assert artifacts.git_provenance() == {"git_sha": "unknown", "git_sha_declared": bad}
    monkeypatch.setenv(artifacts.SHA_ENV, "257f5bf")
    assert artifacts.git_sha() == "257f5bf"


def test_a_section_made_by_other_harness_code_is_marked_stale():
    """Same config and data, but the section's code digest is not the results file's current one: †, with why."""
    prov = {"config_hash": "c", "data_fingerprint": "fp"}
    results = {"profile": "tiny", "variant_order": ["r8", "r16"], "eval_splits": ["validation"], "show_quality": True,
               "config_hash": "c", "data_fingerprint": "fp", "code_digest": "new0000000000000", "variants": {
                   "r8": {"quality": {"validation": {"n": 5, "em": 0.5, "f1": 0.5},
                                      "provenance": {**prov, "code_digest": "old0000000000000"}}},
                   "r16": {"quality": {"validation": {"n": 5, "em": 0.25, "f1": 0.25},
                                       "provenance": {**prov, "code_digest": "new0000000000000"}}}}}
    text = render_section(results)
    assert "0.500†" in text and "0.250†" not in text and "0.250" in text
    assert "`r8` quality: made by harness code `old0000000000000`, not the current `new0000000000000`" in text


def test_a_variant_whose_sections_older_code_made_gets_one_note_naming_them():
    """Every section of a variant made by the same older code and config: one † line a reason, naming the sections,
    instead of one a section. Mutation: a note per section again makes two lines for each reason."""
    old = {"config_hash": "0ld0c0nf1g00", "data_fingerprint": "fp", "code_digest": "old0000000000000"}
    results = {"profile": "tiny", "variant_order": ["r8"], "eval_splits": ["validation"], "show_quality": True,
               "config_hash": "c", "data_fingerprint": "fp", "code_digest": "new0000000000000", "variants": {
                   "r8": {"quality": {"validation": {"n": 5, "em": 0.5, "f1": 0.5}, "provenance": old},
                          "latency": {"p50_s": 1.0, "p95_s": 1.2, "provenance": old}}}}
    text = render_section(results)
    assert "0.500†" in text and "1.000s†" in text
    notes = [line for line in text.splitlines() if line.startswith("- † `r8`")]
    assert notes == ["- † `r8` quality, latency: made by harness code `old0000000000000`, not the current "
                     "`new0000000000000`. Re-run `-k r8` to refresh them.",
                     "- † `r8` quality, latency: measured under config `0ld0c0nf1g00`, data `fp`; the profile or its "
                     "data changed since. Re-run `-k r8` to refresh them."]


def test_a_block_rendered_after_the_code_changed_marks_what_older_code_made(tmp_path):
    """Re-rendering a block (``python -m harness.report.card``, or another profile's run writing the card) holds its
    sections to the code that renders it: a results file whose sections and latest run both carry an older digest
    gets †, and the same file stamped with the current digest gets none."""
    from harness.report.card import update_card
    from harness.report.results import code_digest

    prov = {"config_hash": "c", "data_fingerprint": "fp"}

    def results(digest):
        return {"profile": "tiny", "variant_order": ["r16"], "eval_splits": ["validation"], "show_quality": True,
                "config_hash": "c", "data_fingerprint": "fp", "code_digest": digest, "variants": {
                    "r16": {"quality": {"validation": {"n": 5, "em": 0.25, "f1": 0.25},
                                        "provenance": {**prov, "code_digest": digest}}}}}

    card = tmp_path / "MODEL_CARD.md"
    update_card(card, results("old0000000000000"))
    text = card.read_text(encoding="utf-8")
    assert "0.250†" in text and f"made by harness code `old0000000000000`, not the current `{code_digest()}`" in text
    update_card(card, results(code_digest()))
    assert "†" not in card.read_text(encoding="utf-8")


def test_the_card_command_marks_figures_made_under_a_config_the_profile_no_longer_has(tmp_path):
    """``python -m harness.report.card`` re-renders a block from its results file alone, whose latest run carries the
    same old config hash as its figures: they are held to the profile's config and data as they are now (†), and the
    same file stamped with the current ones renders without a mark."""
    from harness.config.preflight import prepare_profile
    from harness.report import card as card_command
    from harness.report.results import card_results_path, code_digest

    profile, _, fingerprint = prepare_profile(load_profile("tiny"))

    def results(config):
        stamp = {"config_hash": config, "data_fingerprint": fingerprint, "code_digest": code_digest()}
        return {"profile": "tiny", "variant_order": ["r16"], "eval_splits": ["validation"], "show_quality": True,
                **stamp, "variants": {"r16": {"quality": {"validation": {
                    "n": 5, "em": 0.25, "f1": 0.25, "em_ci": [0.0, 0.6], "f1_ci": [0.0, 0.6]}, "provenance": stamp}}}}

    card = tmp_path / "MODEL_CARD.md"
    results_file = card_results_path(card, "tiny")
    results_file.parent.mkdir()
    results_file.write_text(json.dumps(results("0ld0c0nf1g00")), encoding="utf-8")
    card_command.main(["tiny", "--card", str(card)])
    text = card.read_text(encoding="utf-8")
    assert "0.250†" in text and "measured under config `0ld0c0nf1g00`" in text
    results_file.write_text(json.dumps(results(config_hash(profile))), encoding="utf-8")
    card_command.main(["tiny", "--card", str(card)])
    assert "†" not in card.read_text(encoding="utf-8")


def test_every_stamp_carries_the_code_digest():
    from harness.report.results import ResultsRecorder, code_digest

    recorder = ResultsRecorder(load_profile("tiny"), "fp")
    assert recorder.stamp()["code_digest"] == code_digest() and len(code_digest()) == 16


# -- inductor's compiled artifacts, kept in runs/_compile/ (harness.engines.compile_cache) ----------------------------

def _key(profile):
    return compile_cache.cache_key(compile_cache.key_parts(profile))


@pytest.mark.parametrize("change", ["code", "torch", "triton", "transformers", "device", "config"])
def test_the_compile_cache_key_follows_code_libraries_device_and_config(monkeypatch, tmp_path, change):
    """Artifacts compiled by other harness code, another torch or Triton, for another GPU or another profile config
    must never be loaded: each changes the key."""
    profile = load_profile("tiny")
    before = _key(profile)
    if change == "code":  # an edit to any harness module
        edited = tmp_path / "decoding.py"
        edited.write_text("# an edited decode step\n")
        monkeypatch.setattr(compile_cache, "SOURCES", compile_cache.SOURCES + (edited,))
    elif change in ("torch", "transformers"):
        monkeypatch.setattr(compile_cache, "library_versions", _with(artifacts.library_versions, **{change: "0.0.1"}))
    elif change == "triton":
        monkeypatch.setitem(sys.modules, "triton", types.SimpleNamespace(__version__="0.0.1"))
    elif change == "device":
        monkeypatch.setattr(compile_cache, "device_kind", lambda: "cuda:NVIDIA H100 80GB HBM3")
    else:
        profile = load_profile("smollm2-135m")
    assert _key(profile) != before


def test_compiled_artifacts_round_trip_under_their_key_and_never_load_under_another(monkeypatch, tmp_path):
    """A real compile (inductor on the CPU) is kept and loaded back, labelled with who saved it. Mutations: the same
    file under another torch version, and a file whose bytes are not the ones its description hashed, are not
    loaded; a session that compiled nothing beyond what it loaded writes nothing."""
    import torch

    profile, runs = load_profile("tiny"), tmp_path / "runs"
    step = torch.compile(lambda x: torch.nn.functional.silu(x) * 2, fullgraph=True)
    step(torch.randn(4, 8))
    assert compile_cache.keep(runs, profile, {"loaded": False}, "session-a")
    bin_path, meta_path = compile_cache.paths(runs, profile, _key(profile))
    assert bin_path.is_file() and json.loads(meta_path.read_text())["saved"]["session"] == "session-a"

    label = compile_cache.restore(runs, profile)
    assert label["loaded"] and label["key"] == _key(profile)[:16] and label["saved"]["session"] == "session-a"
    assert label["artifacts"].get("inductor", 0) >= 1
    assert not compile_cache.keep(runs, profile, label, "session-b")  # nothing new: the file stays session-a's
    assert json.loads(meta_path.read_text())["saved"]["session"] == "session-a"

    with monkeypatch.context() as m:
        m.setattr(compile_cache, "library_versions", _with(artifacts.library_versions, torch="0.0.1"))
        assert compile_cache.restore(runs, profile) == {"key": _key(profile)[:16], "loaded": False}
    meta = json.loads(meta_path.read_text())  # a writer killed between the two renames: the description is another's
    meta_path.write_text(json.dumps({**meta, "sha256": "0" * 64}))
    assert not compile_cache.restore(runs, profile)["loaded"]


def test_the_card_says_when_first_calls_loaded_compiled_artifacts():
    label = {"key": "0123456789abcdef", "loaded": True, "artifacts": {"inductor": 3},
             "saved": {"session": "s", "git_sha": SHA, "time": "2026-12-03T16:00:00Z"}}
    speed = {"merged": {"p50_s": 0.6, "p95_s": 0.61, "compiled": True, "first_call_s": {"1x256": 4.7},
                        "compile_cache": label, "rounds": 10}}
    results = {"profile": "tiny", "variant_order": ["r16"], "eval_splits": ["validation"], "show_quality": True,
               "variants": {"r16": {"speed": speed}}}
    text = render_section(results)
    assert ("First calls with inductor's compiled artifacts loaded from `runs/_compile/` (key `0123456789abcdef`, "
            "saved 2026-12-03T16:00:00Z by git `0123456789ab`)") in text
    speed["merged"]["compile_cache"] = {**label, "loaded": False}
    assert "runs/_compile" not in render_section(results)
