"""Parity of two inference engines: greedy token agreement and teacher-forced logit differences, and the gate.

``parity`` measures; ``parity_failures`` applies the profile's thresholds (``inference.parity_min_agreement``,
``inference.parity_max_logit_diff``) and returns one message per failed check, so a test asserts
``not parity_failures(...)`` and a deliberately broken pair (the wrong adapter merged) shows it can fail.
"""

from __future__ import annotations

from typing import Any

import torch

from ..config.schema import InferenceConfig

__all__ = ["parity", "parity_failures"]


@torch.inference_mode()
def parity(reference, candidate, tokenizer, prompts: list[list[int]], max_new_tokens: int,
           batch_size: int, candidate_batch_size: int | None = None) -> dict[str, Any]:
    """Greedy outputs of ``candidate`` against ``reference`` (engines with ``generate`` and ``model``), and their
    logits on the same tokens.

    Token agreement is the mean, over prompts, of the fraction of the reference's tokens reproduced before the
    first difference. The logit difference is taken teacher-forced on prompt + reference tokens, so it compares the
    two models on identical inputs even after their greedy outputs part.
    """
    if not prompts:
        raise ValueError("parity needs at least one prompt")
    ref = reference.generate(prompts, max_new_tokens, batch_size)
    cand = candidate.generate(prompts, max_new_tokens, candidate_batch_size or batch_size)
    agreements, identical = [], 0
    for r, c in zip(ref, cand, strict=True):
        common = next((i for i, (a, b) in enumerate(zip(r, c)) if a != b), min(len(r), len(c)))
        agreements.append(common / max(len(r), 1))
        identical += r == c
    max_diff, ref_scale = 0.0, 0.0
    for p, r in zip(prompts, ref, strict=True):
        ids = torch.tensor([p + r])
        a = _logits(reference.model, ids)[0, len(p) - 1:]
        b = _logits(candidate.model, ids)[0, len(p) - 1:]
        max_diff = max(max_diff, (a - b).abs().max().item())
        ref_scale = max(ref_scale, a.abs().max().item())
    return {"prompts": len(prompts), "new_tokens": max_new_tokens,
            "token_agreement": sum(agreements) / len(agreements), "identical_sequences": identical / len(prompts),
            "max_logit_diff": max_diff, "max_abs_logit": ref_scale}


def parity_failures(result: dict[str, Any], inference_cfg: InferenceConfig, label: str = "candidate vs reference"
                    ) -> list[str]:
    """The parity gate: one message per check ``result`` (from ``parity``) fails, naming the value, the threshold
    and its profile key; empty when it passes. A NaN value fails."""
    failures = []
    diff, max_diff = result["max_logit_diff"], inference_cfg.parity_max_logit_diff
    if not (diff <= max_diff):  # written so that NaN fails
        failures.append(f"{label}: max |logit diff| {diff:.3g} exceeds inference.parity_max_logit_diff {max_diff:g} "
                        f"(teacher-forced over {result.get('prompts')} prompts)")
    agreement, min_agreement = result["token_agreement"], inference_cfg.parity_min_agreement
    if not (agreement >= min_agreement):
        failures.append(f"{label}: token agreement {agreement:.3f} is under inference.parity_min_agreement "
                        f"{min_agreement:g} ({result.get('new_tokens')} greedy tokens, "
                        f"{result.get('prompts')} prompts)")
    return failures


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    dev = next(model.parameters()).device
    return model(input_ids=ids.to(dev), use_cache=False).logits.float().cpu()
