"""Dataset validation: every malformed JSONL in suites/corpus/data gives one DataError naming file, line, field
and fix; quirky-but-valid files (BOM, CRLF, blank lines) load; the shipped dataset loads as documented."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.data import DataError, fingerprint, load_splits

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus" / "data"
SHIPPED = HERE.parent / "data" / "domain_qa"
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
