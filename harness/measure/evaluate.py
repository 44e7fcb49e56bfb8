"""Greedy generation and scoring: batched left-padded generate, answers from new tokens only, EM/F1 with CIs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..config.schema import EvalConfig
from ..data.dataset import Example
from ..data.prompt import decode_answer, encode_prompt, user_content
from ..engines.decoding import HFGreedy
from .metrics import exact_match, f1
from .stats import bootstrap_ci, paired_bootstrap

__all__ = ["score_split", "SplitScores", "compare_to_baseline"]


@dataclass
class SplitScores:
    split: str
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    tokens: list[list[int]] = field(default_factory=list)  # each row's generated token ids, as decoded


def _summarize(rows: list[dict], cfg: EvalConfig) -> dict[str, Any]:
    summary: dict[str, Any] = {"n": len(rows)}
    groups = {"all": rows, **{lang: [r for r in rows if r["lang"] == lang] for lang in ("en", "fr")}}
    for group, members in groups.items():
        if not members:
            continue
        for metric in ("em", "f1"):
            mean, lo, hi = bootstrap_ci([r[metric] for r in members], cfg.bootstrap_resamples, cfg.confidence,
                                        cfg.bootstrap_seed)
            prefix = metric if group == "all" else f"{metric}_{group}"
            summary[prefix] = mean
            summary[f"{prefix}_ci"] = [lo, hi]
        summary[f"n_{group}"] = len(members)
    return summary


def score_split(decoder, tokenizer, examples: list[Example], cfg: EvalConfig) -> SplitScores:
    """Generate for every example of a split and score it: per-example rows plus EM/F1 with bootstrap CIs.

    ``decoder`` is an engine from ``harness.engines.decoding`` (or a bare model, decoded the seed's way).
    """
    if not hasattr(decoder, "compile_s"):
        decoder = HFGreedy(decoder, tokenizer)
    prompts = [encode_prompt(tokenizer, e.instruction, e.input) for e in examples]
    new_tokens = decoder.generate(prompts, cfg.max_new_tokens, cfg.batch_size)
    rows = []
    for ex, toks in zip(examples, new_tokens, strict=True):
        pred = decode_answer(tokenizer, toks)
        rows.append({
            "id": ex.id, "lang": ex.lang, "split": ex.split, "prompt": user_content(ex.instruction, ex.input),
            "prediction": pred, "references": list(ex.references), "new_tokens": len(toks),
            "em": exact_match(pred, ex.references, ex.lang), "f1": f1(pred, ex.references, ex.lang),
        })
    return SplitScores(examples[0].split if examples else "", rows, _summarize(rows, cfg), new_tokens)


def compare_to_baseline(variant_rows: list[dict], baseline_rows: list[dict], cfg: EvalConfig) -> dict[str, Any]:
    """Paired bootstrap of the per-example F1 difference (variant - baseline) on the same examples."""
    base = {r["id"]: r["f1"] for r in baseline_rows}
    ids = [r["id"] for r in variant_rows if r["id"] in base]
    mine = {r["id"]: r["f1"] for r in variant_rows}
    if len(ids) != len(variant_rows):  # another dataset's baseline: a partial pairing would compare other questions
        return {"f1_delta_vs_baseline_note": f"ΔF1 n/a: the baseline's predictions cover {len(ids)} of these "
                                             f"{len(variant_rows)} examples; evaluate the baseline on this data"}
    mean, lo, hi = paired_bootstrap([mine[i] for i in ids], [base[i] for i in ids], cfg.bootstrap_resamples,
                                    cfg.confidence, cfg.bootstrap_seed)
    return {"f1_delta_vs_baseline": mean, "f1_delta_vs_baseline_ci": [lo, hi], "n_paired": len(ids)}
