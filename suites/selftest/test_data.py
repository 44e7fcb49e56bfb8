"""Dataset validation: every malformed JSONL in suites/selftest/corpus/data gives one DataError naming file, line, field
and fix; quirky-but-valid files (BOM, CRLF, blank lines) load; the shipped dataset loads as documented."""

from __future__ import annotations

from pathlib import Path

import pytest

from hypothesis import given
from hypothesis import strategies as st

from fixtures.user_runs import write_profile
from harness.config.errors import DataError
from harness.config.preflight import check_profile_data
from harness.config.profiles import load_profile
from harness.data.dataset import fingerprint, load_splits
from harness.data.prompt import EmptyAnswer, build_training_example, v3_tokenizer

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus" / "data"
SHIPPED = HERE.parents[1] / "data" / "domain_qa"
SPLITS = ("train", "validation", "test")


def _load(*names: str):
    """Load corpus files as splits in order: one file is the train split, two are train + validation."""
    return load_splits({split: CORPUS / name for split, name in zip(SPLITS, names)})


def _shipped_paths(root: Path = SHIPPED) -> dict[str, Path]:
    return {s: root / f"{s}.jsonl" for s in SPLITS}


# (files loaded as train[, validation], the file the error names, its line (None: a whole-file problem),
#  what the message must name (field or kind of fault), and the fix it must suggest)
BAD = [
    pytest.param(("invalid_json.jsonl",), "invalid_json.jsonl", 2, "invalid JSON", "each line must be one JSON object",
                 id="invalid-json"),
    pytest.param(("missing_field.jsonl",), "missing_field.jsonl", 2, "field 'output'", "is missing; add it",
                 id="missing-field"),
    pytest.param(("empty_field.jsonl",), "empty_field.jsonl", 3, "field 'instruction'", "give a non-empty value",
                 id="empty-field"),
    pytest.param(("wrong_type.jsonl",), "wrong_type.jsonl", 2, "field 'output'", "must be a string, got int 42",
                 id="output-is-a-number"),
    pytest.param(("unknown_lang.jsonl",), "unknown_lang.jsonl", 2, "field 'lang'", "supported: en, fr",
                 id="unknown-lang"),
    pytest.param(("duplicate_ids.jsonl",), "duplicate_ids.jsonl", 3, "field 'id' 'c-001'",
                 "duplicates " + str(CORPUS / "duplicate_ids.jsonl") + ":1", id="duplicate-ids"),
    pytest.param(("leakage_train.jsonl", "leakage_validation.jsonl"), "leakage_validation.jsonl", 2,
                 "field 'instruction'", str(CORPUS / "leakage_train.jsonl") + ":1", id="leakage-train-validation"),
    pytest.param(("normalizes_to_nothing.jsonl",), "normalizes_to_nothing.jsonl", 2, "field 'output' is 'The'",
                 "write a checkable answer", id="answer-normalizes-to-nothing"),
    pytest.param(("non_utf8.jsonl",), "non_utf8.jsonl", 2, "not valid UTF-8 (byte 0xe9", "save the file as UTF-8",
                 id="non-utf8"),
    pytest.param(("unknown_field.jsonl",), "unknown_field.jsonl", 3, "field 'ouput'", "did you mean 'output'",
                 id="unknown-field-typo"),
    pytest.param(("json_array.jsonl",), "json_array.jsonl", 2, "expected a JSON object, got list",
                 "each line must be one JSON object", id="line-is-json-array"),
    # regressions: these two used to raise RecursionError / UnicodeEncodeError (the latter from fingerprint)
    pytest.param(("deeply_nested.jsonl",), "deeply_nested.jsonl", 2, "invalid JSON: nested too deeply",
                 "one flat JSON object", id="json-nested-too-deeply"),
    pytest.param(("lone_surrogate.jsonl",), "lone_surrogate.jsonl", 3, "lone surrogate (U+D800)",
                 "write the character itself", id="lone-surrogate-escape"),
    pytest.param(("empty.jsonl",), "empty.jsonl", None, "no examples", "add at least one JSON line", id="empty-file"),
    pytest.param(("duplicate_json_key.jsonl",), "duplicate_json_key.jsonl", 2, "field 'output' appears twice",
                 "keep one of them", id="duplicate-json-key"),
    pytest.param(("null_field.jsonl",), "null_field.jsonl", 2, "field 'input' must be a string, got NoneType",
                 '("" for no context)', id="input-is-null"),
    pytest.param(("output_whitespace_only.jsonl",), "output_whitespace_only.jsonl", 3, "field 'output' is empty",
                 "give a non-empty value", id="output-whitespace-only"),
    pytest.param(("answers_not_a_list.jsonl",), "answers_not_a_list.jsonl", 2, "field 'answers' must be a list",
                 "or leave the field out", id="answers-not-a-list"),
    pytest.param(("truncated_last_line.jsonl",), "truncated_last_line.jsonl", 3, "invalid JSON",
                 "each line must be one JSON object", id="truncated-last-line"),
    pytest.param(("utf16.jsonl",), "utf16.jsonl", None, "encoded as UTF-16", "save the file as UTF-8",
                 id="utf16-file"),
    # one problem for the file, not one per line
    pytest.param(("pretty_printed.jsonl",), "pretty_printed.jsonl", None, "not JSON Lines: no line is a JSON object",
                 "write one JSON object per line", id="pretty-printed-json"),
    pytest.param(("does_not_exist.jsonl",), "does_not_exist.jsonl", None, "file not found",
                 "point data.train in the profile at an existing JSONL file", id="missing-file"),
]


@pytest.mark.parametrize("files, bad_file, line, names, fix", BAD)
def test_malformed_file_gives_one_clear_error(files, bad_file, line, names, fix):
    with pytest.raises(DataError) as info:
        _load(*files)
    err = info.value
    where = f"{CORPUS / bad_file}:{line}: " if line is not None else f"{CORPUS / bad_file}: "
    assert len(err.problems) == 1, f"one fault, one problem; got:\n{err}"
    (problem,) = err.problems
    assert problem.startswith(where), problem
    assert names in problem, problem
    assert fix in problem, problem
    assert problem in str(err)


# line -> what its problem must say
MULTI_FAULT = {
    2: "invalid JSON",
    3: "field 'lang' is 'EN'; did you mean 'en'?",
    4: "field 'input' is missing",
    5: "field 'output' is 'the .', which normalizes to nothing",
    6: "field 'answers' must be a list of non-empty strings",
    7: "field 'id' 'c-001' duplicates",
}


def test_multi_fault_file_reports_every_problem_at_once():
    with pytest.raises(DataError) as info:
        _load("multi_fault.jsonl")
    problems = info.value.problems
    path = CORPUS / "multi_fault.jsonl"
    assert len(problems) == len(MULTI_FAULT), "\n".join(problems)
    for line, text in MULTI_FAULT.items():
        hits = [p for p in problems if p.startswith(f"{path}:{line}: ")]
        assert len(hits) == 1 and text in hits[0], (line, problems)
    assert str(info.value).startswith(f"{len(MULTI_FAULT)} problems in dataset:")


@pytest.mark.parametrize("files, bad_file, line, names, fix",
                         [case for case in BAD if case.id not in ("missing-file",)])  # a config error: test_config
def test_malformed_file_stops_pytest_with_one_usage_error(run_as_user, tmp_path, files, bad_file, line, names, fix):
    """``pytest --profile p.yaml`` whose data is bad prints one error before any test (not one ERROR per test) and
    leaves existing artifacts as they were."""
    problem = run_as_user(_profile_for(tmp_path, *files))
    where = f"{CORPUS / bad_file}:{line}: " if line is not None else f"{CORPUS / bad_file}: "
    assert problem.startswith(where) and names in problem and fix in problem, problem


def _profile_for(folder: Path, *files: str, **overrides) -> Path:
    """A tiny profile whose first splits are the given corpus files (the rest are the shipped ones)."""
    data = {split: str(CORPUS / name) for split, name in zip(SPLITS, files)}
    return write_profile(folder / "profile", {"name": "my-data", "data": data, **overrides})


def test_answer_that_does_not_fit_max_length_is_rejected_before_any_test(run_as_user, tmp_path):
    """The answer is valid text but ~600 v3 tokens: training would cut it. Only the real tokenizer can tell."""
    path = CORPUS / "answer_too_long.jsonl"
    profile = load_profile(_profile_for(tmp_path, "answer_too_long.jsonl"))
    assert load_splits({"train": path})  # the file itself is well-formed
    with pytest.raises(DataError) as info:
        check_profile_data(profile)
    (problem,) = info.value.problems
    assert problem.startswith(f"{path}:2: field 'output' does not fit: "), problem
    assert "over max_length 256; raise training.max_length or shorten the example" in problem
    assert run_as_user(Path(profile.source_file)) == problem


def test_baseline_only_profile_skips_the_length_check(tmp_path):
    """Only training needs the answer to fit: a profile that trains nothing accepts the long answer."""
    profile = load_profile(_profile_for(tmp_path, "answer_too_long.jsonl", variants=["baseline"],
                                        quality_gates=[]))
    assert len(check_profile_data(profile)["train"]) == 3


def test_empty_answer_is_a_harness_error_not_a_tokenizer_exception():
    """mistral-common rejects an empty assistant message with its own TokenizerException; callers that skip the
    dataset checks (a notebook) must still get an error that says what to fix."""
    with pytest.raises(EmptyAnswer, match="give the text the model should learn"):
        build_training_example(v3_tokenizer(), "What is ARR?", "", "", 256)


@pytest.mark.parametrize("name", ["bom.jsonl", "crlf.jsonl", "blank_trailing_line.jsonl"])
def test_bom_crlf_and_blank_trailing_line_are_each_accepted(name, tmp_path):
    (examples,) = _load(name).values()
    assert [e.id for e in examples] == ["c-001", "c-002", "c-003"]  # no BOM glued to the first id
    assert [e.output for e in examples] == ["answer number 1", "answer number 2", "answer number 3"]  # no \r
    check_profile_data(load_profile(_profile_for(tmp_path, name)))  # and a profile pointing at it runs


def test_bom_crlf_blank_lines_load():
    (examples,) = _load("bom_crlf_blank_lines.jsonl").values()
    assert [e.id for e in examples] == ["c-001", "c-002", "c-003"]  # no BOM glued to the first id
    assert [e.line for e in examples] == [1, 3, 4]  # blank lines still count for line numbers
    assert not any("\r" in e.output or "\r" in e.instruction for e in examples)
    assert examples[2].output == "Règlement général sur la protection des données"


def test_shipped_dataset_loads():
    splits = load_splits(_shipped_paths())
    assert {s: len(v) for s, v in splits.items()} == {"train": 20, "validation": 5, "test": 5}
    every = [e for v in splits.values() for e in v]
    assert sum(e.lang == "fr" for e in every) / len(every) == pytest.approx(0.4, abs=0.05)
    assert sum(e.lang == "fr" for e in splits["train"]) / 20 == pytest.approx(0.4, abs=0.05)
    assert all(e.split == s for s, v in splits.items() for e in v)


def _copy_shipped(dst: Path, transform=lambda b: b) -> dict[str, Path]:
    dst.mkdir()
    for split, src in _shipped_paths().items():
        (dst / src.name).write_bytes(transform(src.read_bytes()))
    return _shipped_paths(dst)


def test_fingerprint_ignores_bom_and_crlf_but_not_edits(tmp_path):
    original = load_splits(_shipped_paths())["train"]
    quirky = load_splits(_copy_shipped(
        tmp_path / "quirky", lambda b: b"\xef\xbb\xbf" + b.replace(b"\n", b"\r\n") + b"\r\n"))["train"]
    assert fingerprint(quirky) == fingerprint(original)
    assert fingerprint(load_splits(_shipped_paths())["train"]) == fingerprint(original)  # stable across loads

    edited = load_splits(_copy_shipped(
        tmp_path / "edited", lambda b: b.replace(b"Monthly Recurring Revenue", b"Monthly recurring revenue", 1)))
    assert fingerprint(edited["train"]) != fingerprint(original)
    assert fingerprint(edited["validation"]) == fingerprint(load_splits(_shipped_paths())["validation"])


# ---------------------------------------------------------------------------------------------------------------
# Fuzz: a hand-edited dataset loads or raises DataError naming the file and line

SHIPPED_TRAIN = (SHIPPED / "train.jsonl").read_bytes()
# what a person types into a JSON line by mistake, or what a bad export writes
typed = (st.sampled_from([b'"', b",", b"{", b"}", b"[", b"]", b":", b"\\", b"\\u", b"\\ud800", b"\r", b"\n", b"\t",
                          b" ", b"\xef\xbb\xbf", b"null", b'"id": "x"', b'"output": 1', b'"lang": "de"'])
         | st.binary(min_size=1, max_size=3) | st.text(max_size=3).map(lambda t: t.encode()))


@st.composite
def mutated_jsonl(draw) -> bytes:
    lines = SHIPPED_TRAIN.split(b"\n")
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(lines) - 1))
        op = draw(st.sampled_from(["type", "delete", "duplicate", "truncate", "join"]))
        if op == "type":
            col = draw(st.integers(0, len(lines[i])))
            lines[i] = lines[i][:col] + draw(typed) + lines[i][col:]
        elif op == "delete" and len(lines) > 1:
            del lines[i]
        elif op == "duplicate":
            lines.insert(i, lines[i])
        elif op == "truncate":
            lines[i] = lines[i][:draw(st.integers(0, len(lines[i])))]
        elif op == "join" and i + 1 < len(lines):
            lines[i:i + 2] = [lines[i] + lines[i + 1]]
    return b"\n".join(lines)


@pytest.fixture(scope="module")
def jsonl_fuzz_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz_jsonl")


@pytest.mark.invariants
@given(data=mutated_jsonl())
def test_hand_edited_dataset_loads_or_raises_data_error_naming_file_and_line(jsonl_fuzz_dir, data):
    """Any edit either loads (and fingerprints) or gives DataError problems that each start with ``path:line:`` or,
    for a whole-file fault, ``path:``. A reader that lets json, Unicode or Arrow errors through fails here: the
    lone-surrogate and nesting regressions were of that kind."""
    path = jsonl_fuzz_dir / "train.jsonl"
    path.write_bytes(data)
    try:
        splits = load_splits({"train": path})
    except DataError as e:
        assert e.problems and all(p.startswith(f"{path}:") or p.startswith(f"{path}: ") for p in e.problems), \
            e.problems
    else:
        fingerprint(splits["train"])
