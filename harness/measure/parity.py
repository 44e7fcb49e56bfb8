"""Parity of two inference engines: greedy token agreement, teacher-forced logit differences, the error relative
to the adapter's own effect, and the gate. The candidate decodes; the reference judges its tokens in one forward.

``parity`` measures; ``parity_failures`` applies the profile's thresholds (``inference.parity_min_agreement``,
``inference.parity_max_logit_diff``, ``inference.parity_max_relative_error``) and returns one message per failed
check, so a test asserts ``not parity_failures(...)`` and a deliberately broken engine shows it can fail.

Why a relative check: an absolute logit tolerance loose enough for bf16 rounding over 32 layers (1.0 on the 7B
shape) is also loose enough for a merge that is missing, stale or doubled, whenever the adapter moves the logits by
less than that. So the reference's adapter effect is measured too (its logits with the adapter, minus with
``disable_adapter()``), and the engine's error is gated as a fraction of it::

    relative_error = ||engine - seed_with_adapter||_F / ||seed_with_adapter - seed_without_adapter||_F

Frobenius norms over every teacher-forced position of every prompt, pooled. Pooled, because a per-prompt ratio
blows up on a prompt where the adapter barely acts; Frobenius rather than max, because one outlier logit would
decide a max ratio; and rather than mean-abs, because it weighs a concentrated error (one layer's merge lost, a
few positions off) more than diffuse rounding of the same total. A merge that is skipped gives exactly 1 (the
error *is* the effect); merged twice, about 1; another variant's merge left in, about ||other|| / ||effect||.
Without an adapter (the baseline) there is no effect to divide by: ``relative_error`` is None, the note says so,
and only the absolute checks apply.

Near ties. Where the reference's best two tokens score within rounding of each other, an engine as exact as its
arithmetic allows can pick the other one, and token agreement counted to the first difference then drops by the rest
of that prompt: on SmolLM2's unlearned baseline answers in bf16 one such flip moves the mean by 0.03-0.07 with the
logit error unchanged (0.658 against 0.731 at an engine error rms of 0.170 both;
results/h200/smollm2-135m-bf16/257f5bf-parity-fail/). So a difference counts only where the reference scores the
candidate's token more than ``inference.parity_tie_logits`` below its own choice; a near tie within that is passed
over, and since the reference reads the candidate's own tokens, the positions after it are judged on the same
context as before. vLLM's model tests accept a near tie the same way (``check_logprobs_close``: at the first
differing token each must be among the other's top log-probabilities) but must stop there, their two decodes having
parted. ``token_agreement_exact`` keeps the count to the first difference of any size, and ``near_ties`` says how
many were passed over; with ``parity_tie_logits`` 0 only exact ties are.

Logits come from each engine's ``forced_logits`` (harness/engines/decoding.py): the candidate's through its own static
cache and decode step (compiled where it compiles), the reference's from a plain forward.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..config.schema import InferenceConfig

__all__ = ["token_agreement", "agreement_past_near_ties", "parity", "parity_failures", "parity_check_count"]

NO_ADAPTER_NOTE = "no adapter on the reference (baseline): the relative gate does not apply, the absolute ones do"


def token_agreement(reference: list[list[int]], candidate: list[list[int]]) -> float:
    """Mean over rows of the fraction of the reference's tokens the candidate reproduces before the first
    difference (1.0: identical)."""
    shares = []
    for r, c in zip(reference, candidate, strict=True):
        common = next((i for i, (a, b) in enumerate(zip(r, c)) if a != b), min(len(r), len(c)))
        shares.append(common / max(len(r), 1))
    return sum(shares) / len(shares)


def agreement_past_near_ties(deficits: list[float], tie_logits: float) -> tuple[float, int]:
    """For one prompt, from the reference's ``deficits`` on the candidate's tokens (``HFGreedy.teacher_forced``: how
    far below its own choice it scores each token, 0 where it chose it): the share of the tokens before the first
    deficit over ``tie_logits``, and how many deficits over 0 came before it (near ties passed over). A NaN deficit
    ends the agreement there."""
    end = next((i for i, d in enumerate(deficits) if not d <= tie_logits), len(deficits))
    return end / max(len(deficits), 1), sum(d > 0 for d in deficits[:end])


@torch.inference_mode()
def parity(reference, candidate, tokenizer, prompts: list[list[int]], max_new_tokens: int,
           batch_size: int, tie_logits: float, candidate_batch_size: int | None = None) -> dict[str, Any]:
    """Greedy outputs of ``candidate`` (an engine with ``generate`` and ``forced_logits``) against the choices of
    ``reference`` (``HFGreedy``: ``teacher_forced``), their logits on the same tokens, and the candidate's error
    relative to the reference's adapter effect.

    The candidate decodes; the reference reads each prompt + the candidate's tokens in one forward and gives its
    greedy choice at every position. Token agreement is the mean, over prompts, of the fraction of the candidate's
    tokens the reference chooses too, near ties within ``tie_logits`` passed over (module doc), before the first it
    would choose differently: up to there, the reference's own greedy decode is those very tokens (up to its near
    ties), so this is the share of its greedy output the candidate reproduces, found without decoding the reference
    token by token (on the 7B shape its eager ``generate`` was most of a parity check's time: docs/performance.md,
    issue 18). The logits compare the two on identical inputs throughout.
    ``batch_size`` is the candidate's decode batch unless ``candidate_batch_size`` is given; the reference reads one
    prompt at a time (no padding).
    """
    if not prompts:
        raise ValueError("parity needs at least one prompt")
    cand = candidate.generate(prompts, max_new_tokens, candidate_batch_size or batch_size)
    shares, exact, ties, max_diff, ref_scale, error_sq, effect_sq, n_logits = [], [], 0, 0.0, 0.0, 0.0, 0.0, 0
    has_adapter = _has_adapter(reference.model)
    for p, c in zip(prompts, cand, strict=True):
        choices, deficits, a = reference.teacher_forced(p, c)
        exact.append(token_agreement([choices], [c]))
        share, passed = agreement_past_near_ties(deficits, tie_logits)
        shares.append(share)
        ties += passed
        b = candidate.forced_logits(p, c)
        max_diff = max(max_diff, (a - b).abs().max().item())
        ref_scale = max(ref_scale, a.abs().max().item())
        error_sq += (a - b).double().pow(2).sum().item()
        n_logits += a.numel()
        if has_adapter:
            with reference.model.disable_adapter():
                effect_sq += (a - reference.forced_logits(p, c)).double().pow(2).sum().item()
    result = {"prompts": len(prompts), "new_tokens": max_new_tokens,
              "token_agreement": sum(shares) / len(shares), "token_agreement_exact": sum(exact) / len(exact),
              "near_ties": ties, "tie_logits": tie_logits,
              "identical_sequences": sum(s == 1.0 for s in exact) / len(prompts),
              "max_logit_diff": max_diff, "max_abs_logit": ref_scale,
              "engine_error_rms": math.sqrt(error_sq / n_logits), "teacher_forced_logits": n_logits,
              "reference_tokens": "teacher-forced: the reference's greedy choice on the candidate's tokens"}
    if has_adapter:
        result["adapter_effect_rms"] = math.sqrt(effect_sq / n_logits)
        result["relative_error"] = math.sqrt(error_sq / effect_sq) if effect_sq > 0 else math.inf
    else:
        result["relative_error"], result["relative_note"] = None, NO_ADAPTER_NOTE
    return result


def parity_failures(result: dict[str, Any], inference_cfg: InferenceConfig, label: str = "candidate vs reference"
                    ) -> list[str]:
    """The parity gate: one message per check ``result`` (from ``parity``) fails, naming the value, the threshold
    and its profile key; empty when it passes. A NaN value fails. The relative check applies when ``result`` has a
    ``relative_error`` (a reference with an adapter)."""
    failures = []
    diff, max_diff = result["max_logit_diff"], inference_cfg.parity_max_logit_diff
    if not (diff <= max_diff):  # written so that NaN fails
        failures.append(f"{label}: max |logit diff| {diff:.3g} exceeds inference.parity_max_logit_diff {max_diff:g} "
                        f"(teacher-forced over {result.get('prompts')} prompts)")
    agreement, min_agreement = result["token_agreement"], inference_cfg.parity_min_agreement
    if not (agreement >= min_agreement):
        failures.append(f"{label}: token agreement {agreement:.3f} is under inference.parity_min_agreement "
                        f"{min_agreement:g} ({result.get('new_tokens')} greedy tokens, "
                        f"{result.get('prompts')} prompts, near ties within inference.parity_tie_logits "
                        f"{_g(result.get('tie_logits'))} passed over: {_g(result.get('near_ties'))})")
    rel, max_rel = result.get("relative_error"), inference_cfg.parity_max_relative_error
    if rel is not None and max_rel is not None and not (rel <= max_rel):
        effect = result.get("adapter_effect_rms")
        why = (" (the adapter does not move the reference's logits at all: nothing to hold the engine to)"
               if effect == 0 else "; about 1 means the engine lacks the adapter, or holds it twice or beside another")
        failures.append(f"{label}: engine error is {rel:.3g} of the adapter's own effect (rms "
                        f"{_g(result.get('engine_error_rms'))} against {_g(effect)} logits), over "
                        f"inference.parity_max_relative_error {max_rel:g}{why}")
    return failures


def parity_check_count(result: dict[str, Any], inference_cfg: InferenceConfig) -> int:
    """How many checks ``parity_failures`` applied to ``result``: 3, or 2 without an adapter or with
    ``inference.parity_max_relative_error`` null."""
    return 2 + (result.get("relative_error") is not None and inference_cfg.parity_max_relative_error is not None)


def _has_adapter(model) -> bool:
    """A peft model whose adapter ``disable_adapter()`` can switch off (the seed path's reference)."""
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def _g(x) -> str:
    return "n/a" if x is None else f"{x:.3g}"
