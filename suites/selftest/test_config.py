"""Profile validation: every malformed YAML in suites/selftest/corpus/configs* gives one ConfigError naming file, line,
key and fix; every shipped profile loads; config_hash is stable; random mutations of a profile load or raise
ConfigError, never anything else."""

from __future__ import annotations

import copy
import dataclasses
import re
import shutil
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from harness.config.errors import ConfigError
from harness.config.profiles import CONFIG_DIR, available_profiles, config_hash, load_profile
from harness.config.schema import Profile

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
CONFIGS = CORPUS / "configs"
BADVARIANTS = CORPUS / "configs_badvariants"
DATA = HERE.parents[1] / "data" / "domain_qa"


def line_of(path: Path, pattern: str) -> int:
    """1-based number of the first line of ``path`` matching the regex ``pattern``."""
    for n, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if re.search(pattern, text):
            return n
    raise AssertionError(f"{pattern!r} not found in {path}")


# (profile, the file the error names, regex of the line it must point at (None: a whole-file problem), the key
#  (None: a syntax or file problem), the fix it must suggest)
BAD = [
    pytest.param(CONFIGS / "unknown_key.yaml", None, r"^  learnig_rate:", "training.learnig_rate",
                 "did you mean 'learning_rate'", id="unknown-key-typo"),
    pytest.param(CONFIGS / "retired_key.yaml", None, r"^  compile_layers:", "training.compile_layers",
                 "replaced by 'step' on 2026-12-02: write 'step: compiled' for true", id="retired-key-compile-layers"),
    pytest.param(CONFIGS / "unknown_top_level_key.yaml", None, r"^notes:", "notes",
                 "unknown key 'notes'; remove it", id="unknown-top-level-key"),
    pytest.param(CONFIGS / "duplicate_key.yaml", None, r"^  epochs: 2 ", "training.epochs",
                 f"duplicate key 'epochs' (first on line {line_of(CONFIGS / 'duplicate_key.yaml', r'^  epochs: 40')}); "
                 "keep one of them", id="duplicate-yaml-key"),
    pytest.param(CONFIGS / "gate_above_one.yaml", None, r"min: 1\.5", "quality_gates.0.min",
                 "1.5 is out of range; must be <= 1.0", id="gate-threshold-above-1"),
    # thresholds that no measurement could fail are no gates
    pytest.param(CONFIGS / "gate_min_zero.yaml", None, r"min: 0\.0\}", "quality_gates.0.min",
                 "min 0.0 cannot fail (em is never below 0)", id="gate-min-zero-cannot-fail"),
    pytest.param(CONFIGS / "gate_max_one.yaml", None, r"max: 1\.0\}", "quality_gates.1.max",
                 "max 1.0 cannot fail (em is never above 1)", id="gate-max-one-cannot-fail"),
    pytest.param(CONFIGS / "gain_cannot_fail.yaml", None, r"min_gain: -1\.0", "quality_gates.2.min_gain",
                 "min_gain -1.0 cannot fail", id="gain-of-minus-one-cannot-fail"),
    pytest.param(CONFIGS / "quantized_loss_cannot_fail.yaml", None, r"^  quantized_max_f1_loss: 1\.0",
                 "inference.quantized_max_f1_loss", "1.0 is out of range; must be < 1.0",
                 id="quantized-loss-of-one-cannot-fail"),
    pytest.param(CONFIGS / "gain_on_em.yaml", None, r"metric: em, min_gain", "quality_gates.2.metric",
                 "min_gain is gated on the paired F1 difference only; set metric: f1", id="gain-on-em"),
    pytest.param(CONFIGS / "missing_data_file.yaml", None, r"^  validation:", "data.validation",
                 "point data.validation at an existing JSONL file", id="missing-data-file"),
    pytest.param(CONFIGS / "data_is_directory.yaml", None, r"^  test:", "data.test",
                 "is a directory: ", id="data-path-is-a-directory"),
    pytest.param(CONFIGS / "no_variants_listed.yaml", None, r"^variants:", "variants",
                 "no variant to sweep; list at least one of: baseline, r8, r16, r32", id="no-variants-listed"),
    pytest.param(CONFIGS / "unknown_variant.yaml", None, r"^variants:", "variants.4",
                 "unknown variant 'r64'", id="unknown-variant-r64"),
    pytest.param(CONFIGS / "wrong_type.yaml", None, r"^  epochs:", "training.epochs",
                 "expected an integer, got 'forty'", id="epochs-is-a-word"),
    pytest.param(CONFIGS / "learning_rate_string.yaml", None, r"^  learning_rate:", "training.learning_rate",
                 "expected a number, got '5e-3' (str); write it unquoted", id="learning-rate-is-a-string"),
    pytest.param(CONFIGS / "negative_dropout.yaml", None, r"^  dropout:", "lora.dropout",
                 "-0.05 is out of range; must be >= 0.0", id="negative-dropout"),
    # a missing key has no line of its own: the error points at its section
    pytest.param(CONFIGS / "missing_key.yaml", None, r"^latency:", "latency.rounds",
                 "missing required key 'rounds'", id="missing-required-key"),
    pytest.param(CONFIGS / "unknown_choice.yaml", None, r"quant_type: nf5", "quantization.quant_type",
                 "did you mean 'nf4'", id="quant-type-nf5"),
    pytest.param(CONFIGS / "vram_ceiling_nan.yaml", None, r"^vram_ceilings_gib:", "vram_ceilings_gib.train.r16",
                 "got nan; write the most GiB this phase may use", id="vram-ceiling-nan"),
    pytest.param(CONFIGS / "vram_ceiling_inf.yaml", None, r"^vram_ceilings_gib:", "vram_ceilings_gib.inference.r8",
                 "got inf; write the most GiB this phase may use", id="vram-ceiling-inf"),
    # regressions: these used to raise OverflowError, ValueError and RecursionError, or (nan) to load
    pytest.param(CONFIGS / "float_overflow.yaml", None, r"^  learning_rate:", "training.learning_rate",
                 "is out of range; write a finite number", id="float-overflow"),
    pytest.param(CONFIGS / "nan_learning_rate.yaml", None, r"^  learning_rate:", "training.learning_rate",
                 "expected a finite number, got nan", id="nan-learning-rate"),
    pytest.param(CONFIGS / "nul_in_data_path.yaml", None, r"^  train:", "data.train",
                 "point data.train at an existing JSONL file", id="nul-byte-in-data-path"),
    pytest.param(CONFIGS / "recursive_anchor.yaml", None, r"target_modules: &mods", "lora.target_modules.0",
                 "expected a string, got [[...], 'q_proj'", id="self-referencing-anchor"),
    pytest.param(CONFIGS / "invalid_yaml.yaml", None, r"^training:", None, "fix the syntax", id="invalid-yaml"),
    pytest.param(CONFIGS / "tab_indentation.yaml", None, r"^\tepochs:", None,
                 "found character '\\t' that cannot start any token; fix the syntax", id="tab-indentation"),
    pytest.param(CONFIGS / "empty_profile.yaml", None, None, "<top>",
                 "got None; write them as indented 'key: value' lines", id="empty-profile"),
    pytest.param(BADVARIANTS / "negative_rank" / "profile.yaml", "variants.yaml", r"^  r: -16", "r16.r",
                 "-16 is out of range; must be >= 1", id="variants-negative-rank"),
    pytest.param(BADVARIANTS / "alpha_string" / "profile.yaml", "variants.yaml", r'^  alpha: "32"', "r16.alpha",
                 "expected an integer, got '32' (str)", id="variants-alpha-is-a-string"),
]


def _where(profile: Path, bad_file: str | None, pattern: str | None, key: str | None) -> str:
    """How the problem line must start: ``file:line: key: `` (line and key only where the fault has them)."""
    path = profile.parent / bad_file if bad_file else profile
    line = f":{line_of(path, pattern)}" if pattern else ""
    return f"{path}{line}: " + (f"{key}: " if key else "")


@pytest.mark.parametrize("profile, bad_file, pattern, key, fix", BAD)
def test_malformed_profile_gives_one_clear_error(profile, bad_file, pattern, key, fix):
    with pytest.raises(ConfigError) as info:
        load_profile(profile)
    err = info.value
    assert len(err.problems) == 1, f"one fault, one problem; got:\n{err}"
    (problem,) = err.problems
    assert problem.startswith(_where(profile, bad_file, pattern, key)), problem
    assert fix in problem, problem
    assert problem in str(err)


@pytest.mark.parametrize("profile, bad_file, pattern, key, fix", BAD)
def test_malformed_profile_stops_pytest_with_one_usage_error(run_as_user, profile, bad_file, pattern, key, fix):
    """``pytest --profile bad.yaml`` prints one error and runs nothing: no test errors, no traceback, artifacts as
    they were. Without the plugin's configure-time check every variant test would error on its own."""
    problem = run_as_user(profile)
    assert problem.startswith(_where(profile, bad_file, pattern, key)) and fix in problem, problem


# Profiles that load but point at something that cannot work: checked before any test runs, with the same format.
# (profile, regex of the line, the key, the fix)
UNUSABLE = [
    # a typo here used to time validation[0] instead, without a word
    pytest.param(CONFIGS / "unknown_prompt_id.yaml", r"^  prompt_id:", "latency.prompt_id",
                 "'val-01' is not the id of any example in the data; did you mean 'val-001'?", id="unknown-prompt-id"),
    # these two used to fail in every variant's fixture, each test with the same library traceback
    pytest.param(CONFIGS / "unknown_synthetic_model.yaml", r"^  source:", "model.source",
                 "no synthetic model 'synthetic:tiny2'; did you mean 'synthetic:tiny'?", id="unknown-synthetic-model"),
    pytest.param(CONFIGS / "missing_model_dir.yaml", r"^  source:", "model.source",
                 "'./no/such/checkpoint' is not a directory; give a local checkpoint directory or a hub id",
                 id="missing-model-directory"),
    # one problem for the limit, not one per example
    pytest.param(CONFIGS / "max_length_too_short.yaml", r"^  max_length:", "training.max_length",
                 "16 is shorter than every train example (", id="max-length-shorter-than-every-example"),
]


@pytest.mark.parametrize("profile, pattern, key, fix", UNUSABLE)
def test_profile_pointing_at_something_unusable_stops_pytest(run_as_user, profile, pattern, key, fix):
    problem = run_as_user(profile)
    assert problem.startswith(f"{profile}:{line_of(profile, pattern)}: {key}: {fix}"), problem


def test_invalid_yaml_names_where_the_parser_stopped_and_where_the_construct_began():
    path = CONFIGS / "invalid_yaml.yaml"
    with pytest.raises(ConfigError) as info:
        load_profile(path)
    (problem,) = info.value.problems
    # the unclosed '[' on the variants line is noticed at the next key
    assert problem.startswith(f"{path}:{line_of(path, r'^training:')}: invalid YAML: "), problem
    assert f"line {line_of(path, r'^variants: ')}" in problem, problem
    assert "fix the syntax" in problem


def test_every_fault_of_a_profile_is_reported_at_once(tmp_path):
    text = (CONFIGS / "valid.yaml").read_text().replace("quant_type: nf4", "quant_type: nf5")
    text = text.replace("  epochs: 40 ", '  epochs: "forty" ').replace("  seed: 42 ", "  seed: -1 ")
    shutil.copy(CONFIGS / "variants.yaml", tmp_path)
    # the data paths are relative to the profile: point them back at the real files
    (tmp_path / "p.yaml").write_text(text.replace("../../../data/domain_qa/", f"{DATA}/"))
    with pytest.raises(ConfigError) as info:
        load_profile(tmp_path / "p.yaml")
    keys = sorted(p.split(": ")[1] for p in info.value.problems)
    assert keys == ["quantization.quant_type", "training.epochs", "training.seed"], info.value.problems


def test_corpus_valid_profile_loads():
    p = load_profile(CONFIGS / "valid.yaml")
    assert p.variants == ("baseline", "r8", "r16", "r32")
    assert p.data_path("train") == (DATA / "train.jsonl").resolve()


def test_optional_keys_may_be_omitted():
    """quality_gates has a default: leaving it out used to raise KeyError (found by the fuzz test below)."""
    p = load_profile(CONFIGS / "no_quality_gates.yaml")
    assert p.quality_gates == ()


@pytest.mark.parametrize("name", available_profiles())
def test_shipped_profile_loads(name):
    p = load_profile(name)
    assert isinstance(p, Profile) and p.name == name
    assert Path(p.source_file) == CONFIG_DIR / f"{name}.yaml"
    assert set(p.variant_defs) == set(p.variants)
    assert all(p.data_path(s).is_file() for s in ("train", "validation", "test"))


def test_shipped_profiles_are_found():
    assert {"tiny", "synthetic-7b", "mistral-7b"} <= set(available_profiles())
    assert "variants" not in available_profiles()


def test_config_hash_is_stable_and_sensitive():
    a, b = load_profile("tiny"), load_profile("tiny")
    assert config_hash(a) == config_hash(b)
    changed = dataclasses.replace(a, training=dataclasses.replace(a.training, epochs=a.training.epochs + 1))
    assert config_hash(changed) != config_hash(a)
    restored = dataclasses.replace(changed, training=dataclasses.replace(changed.training, epochs=a.training.epochs))
    assert config_hash(restored) == config_hash(a)
    assert config_hash(dataclasses.replace(a, quantization=dataclasses.replace(a.quantization, quant_type="fp4"))) \
        != config_hash(a)


# ---------------------------------------------------------------------------------------------------------------
# Fuzz: mutated profiles load or raise ConfigError


def _base_doc() -> dict:
    doc = yaml.safe_load((CONFIG_DIR / "tiny.yaml").read_text(encoding="utf-8"))
    doc["data"] = {**doc["data"], **{s: str(DATA / f"{s}.jsonl") for s in ("train", "validation", "test")}}
    return doc


BASE_DOC = _base_doc()

scalars = (st.none() | st.booleans() | st.integers() | st.floats()
           | st.text(max_size=12) | st.sampled_from(["nf4", "train", "r8", "baseline", "1e-3", "", "null"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=8) | st.sampled_from(["r8", "train", "min"]), inner,
                                        max_size=3), max_leaves=6)
new_keys = st.text(max_size=12) | st.integers() | st.sampled_from(["learnig_rate", "variant_defs", "source_file", "r"])


def _paths(obj, prefix=()):
    """Every key path into the nested dicts and lists of ``obj`` (the root included)."""
    yield prefix
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        yield from _paths(v, prefix + (k,))


def _get(doc, path):
    for k in path:
        doc = doc[k]
    return doc


@st.composite
def mutated_profiles(draw):
    doc = copy.deepcopy(BASE_DOC)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["delete", "set", "add"]))
        if op == "add":
            containers = [p for p in _paths(doc) if isinstance(_get(doc, p), dict)]
            if not containers:
                continue
            _get(doc, draw(st.sampled_from(containers)))[draw(new_keys)] = draw(values)
            continue
        path = draw(st.sampled_from(list(_paths(doc))))
        if op == "set" and path == ():
            doc = draw(values)
        elif op == "set":
            _get(doc, path[:-1])[path[-1]] = draw(values)
        elif path:
            del _get(doc, path[:-1])[path[-1]]
    return doc


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("fuzz_profile")
    shutil.copy(CONFIG_DIR / "variants.yaml", d / "variants.yaml")
    return d


@pytest.mark.invariants
@given(doc=mutated_profiles())  # settings: the hypothesis profile conftest.py loads (fast / thorough)
def test_mutated_profile_loads_or_raises_config_error(fuzz_dir, doc):
    path = fuzz_dir / "profile.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True, sort_keys=False), encoding="utf-8")
    _loads_or_names_the_place(path)


def test_a_key_with_a_stray_blank_is_quoted_in_the_error(fuzz_dir):
    """Found by the fuzz above (a fresh-clone run, 2026-12-02): a top-level key ' M' was named bare, so the message
    read 'profile.yaml:109:  M: unknown key' and the key looked like M. It is quoted now."""
    doc = yaml.safe_load((CONFIG_DIR / "tiny.yaml").read_text(encoding="utf-8"))
    doc[" M"] = 1
    path = fuzz_dir / "profile.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True, sort_keys=False), encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_profile(path)
    assert any(": ' M': unknown key ' M'; remove it" in p for p in info.value.problems), info.value.problems
    _loads_or_names_the_place(path)


def _loads_or_names_the_place(path: Path) -> None:
    """Load ``path``: it either loads, or raises ConfigError whose every problem starts with the file beside it
    (the profile or its variants.yaml), a line number where the file parsed, and says what is wrong."""
    try:
        profile = load_profile(path)
    except ConfigError as e:
        assert e.problems, "a ConfigError must list at least one problem"
        place = re.compile(rf"^{re.escape(str(path.parent))}/(profile|variants)\.yaml(:\d+)?: \S")
        assert all(isinstance(p, str) and place.match(p) for p in e.problems), e.problems
    else:
        assert isinstance(profile, Profile)
        config_hash(profile)


# Text-level mistakes a person makes in an editor, which a dict-level mutation cannot produce: a key written twice,
# a line deleted, doubled or moved, a character typed anywhere, a file cut short, bytes that are not UTF-8.
BASE_TEXTS = {
    "profile.yaml": re.sub(r"\.\./domain_qa/", f"{DATA}/", (CONFIG_DIR / "tiny.yaml").read_text(encoding="utf-8")),
    "variants.yaml": (CONFIG_DIR / "variants.yaml").read_text(encoding="utf-8"),
}
typed = st.sampled_from(list(":-[]{}#&*!|>'\"%@`\t ,?.\\")) | st.characters() | st.sampled_from(["\n", "  ", ": x"])


@st.composite
def mutated_texts(draw) -> tuple[str, bytes]:
    name = draw(st.sampled_from(sorted(BASE_TEXTS)))
    lines = [line.encode() for line in BASE_TEXTS[name].splitlines(keepends=True)]
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["delete", "duplicate", "move", "type", "value", "truncate", "bytes"]))
        i = draw(st.integers(0, len(lines) - 1))
        if op == "delete" and len(lines) > 1:
            del lines[i]
        elif op == "duplicate":  # for a 'key: value' line: the same key twice
            lines.insert(i, lines[i])
        elif op == "move":
            lines.insert(draw(st.integers(0, len(lines) - 1)), lines.pop(i))
        elif op == "type":
            col = draw(st.integers(0, len(lines[i])))
            lines[i] = lines[i][:col] + draw(typed).encode("utf-8", "surrogatepass") + lines[i][col:]
        elif op == "value" and b": " in lines[i]:
            key = lines[i].split(b": ", 1)[0]
            lines[i] = key + b": " + draw(scalars.map(lambda v: yaml.safe_dump(v).split("\n")[0])).encode() + b"\n"
        elif op == "truncate":
            lines = lines[:i + 1]
            lines[i] = lines[i][:draw(st.integers(0, len(lines[i])))]
        elif op == "bytes":
            lines[i] = lines[i] + draw(st.binary(min_size=1, max_size=3))
    return name, b"".join(lines)


@pytest.fixture(scope="module")
def text_fuzz_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz_text")


@pytest.mark.invariants
@given(case=mutated_texts())
def test_profile_text_edited_by_hand_loads_or_raises_config_error_naming_the_file(text_fuzz_dir, case):
    """Whatever a person does to the text of a profile or its variants.yaml, the harness answers with a loaded
    profile or one ConfigError naming the file: never a yaml, Unicode or Python error. The dict-level fuzz above
    writes YAML with safe_dump, so it never produces a duplicate key, a syntax error or a non-UTF-8 byte."""
    name, data = case
    for base_name, text in BASE_TEXTS.items():
        (text_fuzz_dir / base_name).write_text(text, encoding="utf-8")
    (text_fuzz_dir / name).write_bytes(data)
    _loads_or_names_the_place(text_fuzz_dir / "profile.yaml")


def test_duplicate_key_fuzz_case_is_rejected(text_fuzz_dir):
    """The invariant above holds for a harness that silently keeps the last duplicate key; this pins the fix."""
    text = BASE_TEXTS["variants.yaml"].replace("  alpha: 16 ", "  alpha: 16\n  alpha: 160 ", 1)
    (text_fuzz_dir / "variants.yaml").write_text(text, encoding="utf-8")
    (text_fuzz_dir / "profile.yaml").write_text(BASE_TEXTS["profile.yaml"], encoding="utf-8")
    with pytest.raises(ConfigError, match=r"variants\.yaml:\d+: r8\.alpha: duplicate key 'alpha'"):
        load_profile(text_fuzz_dir / "profile.yaml")


def test_a_profile_without_variants_yaml_beside_it_uses_the_shipped_variants():
    """Your own profile needs no copy of variants.yaml: the shipped r8/r16/r32 are found."""
    profile = load_profile(CORPUS / "configs_novariants" / "profile.yaml")
    assert profile.variant("r16").r == 16


def test_a_copy_that_keeps_a_shipped_name_but_not_its_data_gets_a_clear_error(tmp_path):
    """Results of other data must not be filed as the shipped profile's (its runs/ folder and card block)."""
    import shutil

    for split in ("train", "validation", "test"):
        shutil.copy(DATA / f"{split}.jsonl", tmp_path / f"{split}.jsonl")
    text = (CONFIG_DIR / "tiny.yaml").read_text(encoding="utf-8").replace("../domain_qa/", "")
    (tmp_path / "my.yaml").write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=r"my.yaml:\d+: name: 'tiny' is the name of the shipped profile"):
        load_profile(tmp_path / "my.yaml")
    (tmp_path / "my.yaml").write_text(text.replace("name: tiny", "name: my-data"), encoding="utf-8")
    assert load_profile(tmp_path / "my.yaml").name == "my-data"


@pytest.mark.parametrize("eval_splits, headline", [(["train", "validation", "test"], "test"),
                                                    (["train", "validation"], "validation"), (["train"], "train")])
def test_the_headline_split_defaults_to_the_held_out_one(tmp_path, eval_splits, headline):
    """A user's own held-out data is what the card headlines unless the profile says otherwise (eval_splits[0] was
    train for smollm2, so the card headlined memorisation over the user's test figures)."""
    from fixtures.user_runs import write_profile

    doc_path = write_profile(tmp_path, {"data": {"eval_splits": eval_splits, "headline_split": None}})
    profile = load_profile(doc_path)
    assert profile.data.headline == headline
    assert config_hash(profile) == config_hash(load_profile(write_profile(
        tmp_path / "chosen", {"data": {"eval_splits": eval_splits, "headline_split": eval_splits[0]}}))), \
        "choosing the headline changes no figure: it must not make the card's figures stale"


def test_a_headline_split_that_is_not_evaluated_is_a_config_error(tmp_path):
    from fixtures.user_runs import write_profile

    path = write_profile(tmp_path, {"data": {"eval_splits": ["validation"], "headline_split": "test"}})
    not_evaluated = r"data\.headline_split: 'test' is not evaluated; add it to data\.eval_splits"
    with pytest.raises(ConfigError, match=not_evaluated):
        load_profile(path)
