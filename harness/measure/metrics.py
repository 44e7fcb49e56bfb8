"""Answer metrics: SQuAD v1.1 normalization for English, an explicit French rule, EM and token F1.

Pure functions, no I/O. Scores are on a 0-1 scale and take the max over references.
"""

from __future__ import annotations

import collections
import re
import string
import unicodedata
from collections.abc import Sequence

__all__ = ["SUPPORTED_LANGS", "normalize_answer", "exact_match", "f1"]

SUPPORTED_LANGS = ("en", "fr")

_PUNCT = frozenset(string.punctuation)
_EN_ARTICLES = re.compile(r"\b(a|an|the)\b")
_FR_ARTICLES = frozenset({"le", "la", "les", "un", "une", "des", "du", "de", "au", "aux"})
# Longest first so that "jusqu'" wins over "qu'".
_FR_ELISIONS = ("jusqu'", "lorsqu'", "puisqu'", "qu'", "l'", "d'", "j'", "m'", "n'", "s'", "t'", "c'")
# An elision starts a word: no letter or digit before it. Not (?<!\w): "_" is punctuation here, as in "-l'eau".
_FR_ELISION_RE = re.compile(r"(?<![^\W_])(?:" + "|".join(re.escape(e) for e in _FR_ELISIONS) + r")")


def _check_lang(lang: str) -> None:
    if lang not in SUPPORTED_LANGS:
        raise ValueError(f"unsupported lang {lang!r}; supported: {', '.join(SUPPORTED_LANGS)}")


def _normalize_en(text: str) -> str:
    # The official SQuAD v1.1 evaluate.py, step for step.
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _EN_ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _normalize_fr(text: str) -> str:
    text = unicodedata.normalize("NFKC", text)  # NBSP and narrow NBSP become plain spaces
    text = text.lower()
    text = text.replace("\u2019", "'").replace("\u02bc", "'")
    text = _FR_ELISION_RE.sub("", text)
    text = "".join(
        " " if ch in _PUNCT or unicodedata.category(ch).startswith("P") else ch for ch in text
    )
    return " ".join(tok for tok in text.split() if tok not in _FR_ARTICLES)


def normalize_answer(text: str, lang: str = "en") -> str:
    """Normalize an answer for comparison: SQuAD v1.1 for English, the French rule for French."""
    _check_lang(lang)
    return _normalize_en(text) if lang == "en" else _normalize_fr(text)


def _as_list(references: str | Sequence[str]) -> list[str]:
    refs = [references] if isinstance(references, str) else list(references)
    if not refs:
        raise ValueError("references is empty; give at least one reference answer")
    return refs


def _em_one(prediction: str, reference: str, lang: str) -> float:
    return float(normalize_answer(prediction, lang) == normalize_answer(reference, lang))


def _f1_one(prediction: str, reference: str, lang: str) -> float:
    pred = normalize_answer(prediction, lang).split()
    ref = normalize_answer(reference, lang).split()
    if not pred and not ref:
        return 1.0  # SQuAD v2.0: both empty is a match, so EM = 1 implies F1 = 1
    common = collections.Counter(pred) & collections.Counter(ref)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, references: str | Sequence[str], lang: str = "en") -> float:
    """1.0 if the prediction equals any reference after normalization, else 0.0."""
    _check_lang(lang)
    return max(_em_one(prediction, ref, lang) for ref in _as_list(references))


def f1(prediction: str, references: str | Sequence[str], lang: str = "en") -> float:
    """Bag-of-tokens F1 between prediction and the best-matching reference."""
    _check_lang(lang)
    return max(_f1_one(prediction, ref, lang) for ref in _as_list(references))
