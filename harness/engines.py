"""Inference engines: how evaluation and latency turn prompt ids into greedy tokens.

``seed``          the seed's path: NF4 base + unmerged PEFT adapter, ``model.generate`` with its dynamic cache.
``nf4-compiled``  the same weights (low memory), decoded with a static KV cache and a compiled decode step.
``merged``        the deployable artifact: the NF4 base dequantized to ``merged_dtype``, the adapter merged in that
                  dtype (never into 4-bit: peft #2321, transformers #31293), static cache, compiled decode step.

The compiled decode step follows transformers' documented static-cache recipe (``decode_one_tokens`` in its
"Optimizing inference" guide): prefill eagerly into a ``StaticCache``, then one compiled call per token with fixed
shapes, so CUDA graphs replay. Unlike ``generate`` it does not check for EOS on the host every token (that sync
keeps the CPU from queueing the next step while the GPU works); it checks every ``EOS_CHECK_EVERY`` tokens.
Compilation needs CUDA; on the CPU the same loop runs eagerly, and the engine says so in ``note``.

``MergedBase`` keeps one dequantized base for a whole sweep and merges each variant into it in place (restoring
the pristine weights first), so the compiled graphs, which hold the weights' addresses, are built once.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import InferenceConfig, Profile

__all__ = ["ENGINES", "StaticGreedy", "HFGreedy", "MergedBase", "round_up", "parity"]

ENGINES = ("seed", "nf4-compiled", "merged")
EOS_CHECK_EVERY = 16  # host syncs while decoding: one per this many tokens, only when stopping at EOS


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _left_pad(prompts: list[list[int]], pad_id: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) of shape (rows, width); prompts end at the right edge; missing rows repeat the last prompt."""
    width = max(len(p) for p in prompts)
    ids = torch.full((rows, width), pad_id, dtype=torch.long)
    mask = torch.zeros((rows, width), dtype=torch.long)
    for i in range(rows):
        p = prompts[min(i, len(prompts) - 1)]
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


def _trim_after_eos(row: list[int], eos_id: int | None) -> list[int]:
    if eos_id is not None and eos_id in row:
        return row[:row.index(eos_id) + 1]
    return row


@dataclass
class HFGreedy:
    """The seed's decode: ``model.generate`` (dynamic cache, eager), left-padded batches."""

    model: Any
    tokenizer: Any
    name: str = "seed"
    compiled: bool = False
    note: str = "transformers generate, dynamic KV cache, eager"
    compile_s: dict[str, float] = field(default_factory=dict)

    def generate(self, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 8,
                 fixed_length: bool = False) -> list[list[int]]:
        from .evaluate import generate_greedy

        rows = generate_greedy(self.model, self.tokenizer, prompts, max_new_tokens, batch_size,
                               min_new_tokens=max_new_tokens if fixed_length else None)
        return rows if fixed_length else [_trim_after_eos(r, self.tokenizer.eos_token_id) for r in rows]


class StaticGreedy:
    """Greedy decoding with a static KV cache and (on CUDA) a compiled, CUDA-graphed decode step.

    Shapes are fixed per (batch rows, cache length): batches are padded to ``batch_size`` rows and the cache length
    is rounded up to ``bucket`` tokens, so a sweep compiles one graph for evaluation and one for latency.
    """

    def __init__(self, model, tokenizer, name: str, cfg: InferenceConfig, compile_on_cpu: bool = False):
        self.model, self.tokenizer, self.name, self.cfg = model, tokenizer, name, cfg
        self.device = next(model.parameters()).device
        self.compiled = cfg.compile and (self.device.type == "cuda" or compile_on_cpu)
        self.note = (f"static KV cache, decode step compiled (mode={cfg.compile_mode})" if self.compiled else
                     "static KV cache, eager decode step: compilation needs CUDA, so the CPU runs the same loop "
                     "without it")
        self.compile_s: dict[str, float] = {}  # first call of each shape, compile included
        self._caches: dict[tuple[int, int], Any] = {}
        self._step = self._decode_one
        if self.compiled:
            fullgraph = cfg.compile_fullgraph and name == "merged"  # bnb 4-bit layers may break the graph
            self._step = torch.compile(self._decode_one, mode=cfg.compile_mode, fullgraph=fullgraph)

    def _decode_one(self, tok, position_ids, cache_position, attention_mask, cache):
        logits = self.model(input_ids=tok, position_ids=position_ids, cache_position=cache_position,
                            attention_mask=attention_mask, past_key_values=cache, use_cache=True).logits
        return logits[:, -1].argmax(-1, keepdim=True)

    def _cache(self, rows: int, length: int):
        from transformers import StaticCache

        key = (rows, length)
        if key not in self._caches:
            config = self.model.config
            self._caches[key] = StaticCache(config=getattr(config, "get_text_config", lambda: config)(),
                                            max_cache_len=length)
        cache = self._caches[key]
        cache.reset()
        return cache

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 8,
                 fixed_length: bool = False) -> list[list[int]]:
        tok = self.tokenizer
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        eos_id = None if fixed_length else tok.eos_token_id
        out: list[list[int]] = []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            rows = batch_size if self.compiled else len(chunk)  # one compiled shape per batch size
            ids, mask = _left_pad(chunk, pad_id, rows)
            width = ids.shape[1]
            length = round_up(width + max_new_tokens, self.cfg.cache_bucket)
            shape = f"{rows}x{length}"
            first = shape not in self.compile_s
            t0 = time.perf_counter()
            new = self._generate_batch(ids, mask, length, max_new_tokens, eos_id)
            if first:
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                self.compile_s[shape] = time.perf_counter() - t0
            out.extend(_trim_after_eos(row, eos_id) for row in new[:len(chunk)].tolist())
        return out

    def _generate_batch(self, ids, mask, length, max_new_tokens, eos_id) -> torch.Tensor:
        dev = self.device
        rows, width = ids.shape
        ids, mask = ids.to(dev), mask.to(dev)
        full_mask = torch.ones((rows, length), dtype=torch.long, device=dev)
        full_mask[:, :width] = mask  # pads stay masked; positions not yet written are masked by causality
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache_positions = torch.arange(length, device=dev)
        cache = self._cache(rows, length)
        logits = self.model(input_ids=ids, attention_mask=full_mask, position_ids=positions,
                            cache_position=cache_positions[:width], past_key_values=cache, use_cache=True).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        new = torch.empty((rows, max_new_tokens), dtype=torch.long, device=dev)
        new[:, 0] = token[:, 0]
        next_pos = positions[:, -1:] + 1
        for t in range(1, max_new_tokens):
            if self.compiled:
                torch.compiler.cudagraph_mark_step_begin()
            token = self._step(token, next_pos + (t - 1), cache_positions[width + t - 1:width + t].clone(),
                               full_mask, cache).clone()  # a CUDA-graph output is overwritten by the next replay
            new[:, t] = token[:, 0]
            if eos_id is not None and t % EOS_CHECK_EVERY == 0 and bool((new[:, :t + 1] == eos_id).any(1).all()):
                return new[:, :t + 1]
        return new


class MergedBase:
    """One dequantized base for a sweep; ``activate`` merges a variant's adapter into it in place.

    The pristine dequantized weights are kept on the host and copied back before each merge, so a variant is
    always exactly dequantize(NF4 base) + its own delta, and parameter storage never moves (compiled graphs stay
    valid). peft computes each delta (B @ A * alpha / r) and adds it in place (``merge_and_unload``).
    """

    def __init__(self, profile: Profile, cache_root: Path, tokenizer):
        from .models import load_base

        dtype = getattr(torch, profile.inference.merged_dtype)
        allocated = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
        nf4 = load_base(profile.model, profile.quantization, cache_root)
        start = time.perf_counter()
        if getattr(nf4, "hf_quantizer", None) is None:
            self.model = nf4
        else:
            try:
                self.model = nf4.dequantize(dtype=dtype)
            except TypeError:  # transformers releases before dequantize(dtype=...)
                self.model = nf4.dequantize()
        self.model.to(dtype)
        self.model.eval()
        self.dequantize_s = time.perf_counter() - start
        del nf4
        gc.collect()  # the replaced 4-bit modules are cyclic garbage: count only what stays resident
        self.resident_gib = ((torch.cuda.memory_allocated() - allocated) / 2**30 if torch.cuda.is_available()
                             else None)
        self._pristine = {n: p.detach().to("cpu", copy=True) for n, p in self.model.named_parameters()}
        self.active: str | None = None
        self.merge_s = 0.0
        self.engine = StaticGreedy(self.model, tokenizer, "merged", profile.inference)

    def warmup(self, eval_prompts: list[list[int]], latency_prompt: list[int], eval_cfg, latency_tokens: int) -> None:
        """Compile every evaluation batch shape and the latency shape now, so no variant's figures carry compile
        time or compile memory."""
        seen = set()
        for start in range(0, len(eval_prompts), eval_cfg.batch_size):
            chunk = eval_prompts[start:start + eval_cfg.batch_size]
            length = round_up(max(len(p) for p in chunk) + eval_cfg.max_new_tokens, self.engine.cfg.cache_bucket)
            if length not in seen:
                seen.add(length)
                self.engine.generate(chunk, eval_cfg.max_new_tokens, eval_cfg.batch_size)
        self.engine.generate([latency_prompt], latency_tokens, 1, fixed_length=True)

    @torch.inference_mode()
    def _restore(self) -> None:
        params = dict(self.model.named_parameters())
        for n, saved in self._pristine.items():
            params[n].data.copy_(saved)

    @torch.inference_mode()
    def activate(self, name: str, adapter_dir: Path | None) -> Any:
        from peft import PeftModel

        if self.active == name:
            return self.model
        start = time.perf_counter()
        self.active = None  # until this merge completes, the weights belong to no variant
        self._restore()
        if adapter_dir is not None:
            wrapped = PeftModel.from_pretrained(self.model, str(adapter_dir))
            try:
                merged = wrapped.merge_and_unload()
            except BaseException:
                wrapped.unload()  # take the adapter layers out again, then put the pristine weights back
                self._restore()
                raise
            if merged is not self.model:  # peft returns the base module it wrapped
                raise RuntimeError("peft merge_and_unload returned a new module; the compiled graphs would be stale")
            for attr in ("peft_config", "_hf_peft_config_loaded"):  # peft's marks; the next merge adds them again
                self.model.__dict__.pop(attr, None)
        self.active = name
        self.merge_s = time.perf_counter() - start
        return self.model


@torch.inference_mode()
def parity(reference, candidate, tokenizer, prompts: list[list[int]], max_new_tokens: int,
           batch_size: int) -> dict[str, Any]:
    """Greedy outputs of ``candidate`` against ``reference`` (engines), and their logits on the same tokens.

    Token agreement is the mean, over prompts, of the fraction of the reference's tokens reproduced before the
    first difference. The logit difference is taken teacher-forced on prompt + reference tokens, so it compares the
    two models on identical inputs even after their greedy outputs part.
    """
    ref = reference.generate(prompts, max_new_tokens, batch_size)
    cand = candidate.generate(prompts, max_new_tokens, batch_size)
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


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    dev = next(model.parameters()).device
    return model(input_ids=ids.to(dev), use_cache=False).logits.float().cpu()
