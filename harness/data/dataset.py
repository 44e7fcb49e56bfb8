"""The QA dataset: strict JSONL validation with file:line errors, then a `datasets.Dataset`.

Each line: ``id``, ``lang`` (fr|en), ``instruction``, ``input`` (may be empty), ``output`` and an optional
``answers`` list of further acceptable references. ``load_splits`` reads every split of a profile, checks each line
and the splits against each other (duplicate ids, the same question in two splits), and raises one ``DataError``
listing every problem as ``path:line: field 'x' ...``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ..config.errors import DataError, closest, did_you_mean
from ..measure.metrics import SUPPORTED_LANGS, normalize_answer

__all__ = ["Example", "read_jsonl", "load_splits", "fingerprint", "SPLITS"]

SPLITS = ("train", "validation", "test")
_REQUIRED = ("id", "lang", "instruction", "input", "output")
_OPTIONAL = ("answers",)
_MAY_BE_EMPTY = ("input",)


@dataclass(frozen=True)
class Example:
    id: str
    lang: str
    instruction: str
    input: str
    output: str
    answers: tuple[str, ...]
    split: str
    path: str
    line: int

    @property
    def references(self) -> tuple[str, ...]:
        return (self.output, *self.answers)

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def _check_record(rec: dict, where: str, problems: list[str]) -> bool:
    ok = True
    renamed = set()  # a typo of a missing field ('ouput') is one problem, not 'unknown' plus 'missing'
    for key in rec:
        if key not in _REQUIRED + _OPTIONAL:
            match = closest(key, _REQUIRED + _OPTIONAL)
            hint = did_you_mean(key, _REQUIRED + _OPTIONAL)
            if match is not None and match not in rec:
                renamed.add(match)
                hint += "rename it; "
            problems.append(f"{where}: field {key!r} is unknown; {hint}allowed: {', '.join(_REQUIRED + _OPTIONAL)}")
            ok = False
    for key in _REQUIRED:
        if key in renamed:
            continue
        if key not in rec:
            problems.append(f"{where}: field {key!r} is missing; add it" + (" (use \"\" for no context)"
                                                                          if key == "input" else ""))
            ok = False
        elif not isinstance(rec[key], str):
            problems.append(f"{where}: field {key!r} must be a string, got {type(rec[key]).__name__} "
                            f"{rec[key]!r}; write it in double quotes" + (" (\"\" for no context)"
                                                                          if key == "input" else ""))
            ok = False
        elif key not in _MAY_BE_EMPTY and not rec[key].strip():
            problems.append(f"{where}: field {key!r} is empty; give a non-empty value")
            ok = False
    answers = rec.get("answers", [])
    if not isinstance(answers, list) or not all(isinstance(a, str) and a.strip() for a in answers):
        problems.append(f"{where}: field 'answers' must be a list of non-empty strings, got {answers!r}; write "
                        f"[\"first\", \"second\"] or leave the field out")
        ok = False
    if ok and rec["lang"] not in SUPPORTED_LANGS:
        hint = did_you_mean(rec["lang"].lower(), SUPPORTED_LANGS)
        problems.append(f"{where}: field 'lang' is {rec['lang']!r}; {hint}supported: {', '.join(SUPPORTED_LANGS)}")
        ok = False
    if ok:
        for field_name, ref in [("output", rec["output"])] + [(f"answers[{i}]", a) for i, a in enumerate(answers)]:
            if not normalize_answer(ref, rec["lang"]):
                problems.append(f"{where}: field {field_name!r} is {ref!r}, which normalizes to nothing "
                                f"(articles and punctuation only); write a checkable answer")
                ok = False
    return ok


class _DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    """json.loads keeps the last of two equal keys without a word; a line with two 'output's is a mistake."""
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def read_jsonl(path: str | Path, split: str, problems: list[str]) -> list[Example]:
    """Read one split; append every problem to ``problems``. Accepts a BOM, CRLF and blank lines."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        problems.append(f"{path}: file not found; point data.{split} in the profile at an existing JSONL file")
        return []
    except IsADirectoryError:
        problems.append(f"{path}: is a directory; point data.{split} at a JSONL file")
        return []
    except OSError as e:
        problems.append(f"{path}: cannot be read ({e.strerror or e}); point data.{split} at a readable JSONL file")
        return []
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):  # otherwise every line would be its own error
        problems.append(f"{path}: encoded as UTF-16 (it starts with a UTF-16 byte-order mark); save the file as UTF-8")
        return []
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    examples: list[Example] = []
    first_problem, lines, not_json = len(problems), 0, 0
    for lineno, bline in enumerate(raw.split(b"\n"), start=1):
        bline = bline.rstrip(b"\r")
        if not bline.strip():
            continue
        where = f"{path}:{lineno}"
        lines += 1
        try:
            line = bline.decode("utf-8")
        except UnicodeDecodeError as e:
            problems.append(f"{where}: not valid UTF-8 (byte 0x{bline[e.start]:02x} at column {e.start + 1}); "
                            f"save the file as UTF-8")
            continue
        try:
            rec = json.loads(line, object_pairs_hook=_no_duplicate_keys)
        except _DuplicateKey as e:
            problems.append(f"{where}: field {e.key!r} appears twice in one line; keep one of them")
            continue
        except json.JSONDecodeError as e:
            problems.append(f"{where}: invalid JSON at column {e.colno}: {e.msg}; each line must be one JSON object")
            not_json += 1
            continue
        except RecursionError:
            problems.append(f"{where}: invalid JSON: nested too deeply; each line must be one flat JSON object")
            continue
        try:  # a \ud800-style escape is valid JSON but no character: it would break hashing and Arrow later
            json.dumps(rec, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:
            problems.append(f"{where}: a \\u escape encodes a lone surrogate (U+{ord(e.object[e.start]):04X}), "
                            f"not a character; write the character itself or a valid surrogate pair")
            continue
        if not isinstance(rec, dict):
            problems.append(f"{where}: expected a JSON object, got {type(rec).__name__}; "
                            f"each line must be one JSON object {{\"id\": ..., \"output\": ...}}")
            continue
        if _check_record(rec, where, problems):
            examples.append(Example(
                id=rec["id"], lang=rec["lang"], instruction=rec["instruction"], input=rec["input"],
                output=rec["output"], answers=tuple(rec.get("answers", ())), split=split,
                path=str(path), line=lineno,
            ))
    if lines > 1 and not_json == lines:  # pretty-printed JSON, CSV, YAML...: one problem, not one per line
        first = problems[first_problem][len(str(path)) + 1:].split("; each line", 1)[0]  # "3: invalid JSON at..."
        problems[first_problem:] = [f"{path}: not JSON Lines: no line is a JSON object on its own (line {first}); "
                                    f"write one JSON object per line"]
    if not examples and not any(p.startswith(str(path)) for p in problems):
        problems.append(f"{path}: no examples; add at least one JSON line")
    return examples


def _question_key(ex: Example) -> str:
    return " ".join((ex.instruction + "\n" + ex.input).lower().split())


def load_splits(paths: dict[str, str | Path]) -> dict[str, list[Example]]:
    """Read and cross-check the splits ``{split: path}``; raise DataError listing every problem."""
    problems: list[str] = []
    splits = {split: read_jsonl(p, split, problems) for split, p in paths.items()}
    seen_ids: dict[str, Example] = {}
    seen_q: dict[str, Example] = {}
    for split, examples in splits.items():
        for ex in examples:
            if ex.id in seen_ids:
                first = seen_ids[ex.id]
                problems.append(f"{ex.where}: field 'id' {ex.id!r} duplicates {first.where}; ids must be unique "
                                f"across all splits")
            else:
                seen_ids[ex.id] = ex
            key = _question_key(ex)
            other = seen_q.get(key)
            if other is not None and other.split != ex.split:
                problems.append(f"{ex.where}: field 'instruction' repeats the question of {other.where} "
                                f"({other.split} split); leakage between splits: remove one of them")
            elif other is None:
                seen_q[key] = ex
    if problems:
        raise DataError(problems)
    return splits


def fingerprint(examples: list[Example]) -> str:
    """sha256 of the examples' content (not their bytes): a BOM or CRLF change keeps it, any edit changes it."""
    rows = [[e.id, e.lang, e.instruction, e.input, e.output, list(e.answers)] for e in examples]
    blob = json.dumps(rows, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()
