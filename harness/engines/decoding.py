"""Decode loops: how evaluation and latency turn prompt ids into greedy tokens.

``seed``          the seed's path: NF4 base + unmerged PEFT adapter, ``model.generate`` with its dynamic cache
                  (``HFGreedy``, ``generate_greedy``).
``nf4-compiled``  the same weights (low memory), the model's own layers compiled per layer in the merged engines'
                  loop (harness/engines/nf4_layers.py); ``StaticGreedy`` for an architecture that loop does not take.
``merged``        the deployable artifact: the dequantized base with the adapter merged in, fused projections
                  (harness/engines/merged.py, fused.py); ``StaticGreedy`` for an architecture they do not take.
``merged-int8``   ``merged`` with int8 weight-only decoder projections: faster, not exact (harness/engines/int8.py);
                  the speed suite only.

``StaticGreedy``'s compiled decode step follows transformers' documented static-cache recipe (``decode_one_tokens``
in its "Optimizing inference" guide): prefill eagerly into a ``StaticCache``, then one compiled call per token with
fixed shapes, so CUDA graphs replay. Unlike ``generate`` it does not check for EOS on the host every token (that sync
keeps the CPU from queueing the next step while the GPU works); it checks every ``EOS_CHECK_EVERY`` tokens.
Compilation needs CUDA; on the CPU the same loop runs eagerly, and the engine says so in ``note``.

Timed rounds run inside ``no_recompile()``: after warm-up every shape is compiled, so a recompile there would put
compile time into a measurement; it raises instead.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config.schema import InferenceConfig

__all__ = ["FULLGRAPH_ENGINES", "EOS_CHECK_EVERY", "round_up", "left_pad", "padded_batches", "generate_greedy",
           "HFGreedy", "StaticGreedy", "compile_layers_once", "no_recompile", "timed_round"]

FULLGRAPH_ENGINES = ("merged", "merged-int8")  # compiled with fullgraph=cfg.compile_fullgraph
EOS_CHECK_EVERY = 16  # host syncs while decoding: one per this many tokens, only when stopping at EOS


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def left_pad(prompts: list[list[int]], pad_id: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) of shape (rows, width); prompts end at the right edge; missing rows repeat the last prompt."""
    width = max(len(p) for p in prompts)
    ids = torch.full((rows, width), pad_id, dtype=torch.long)
    mask = torch.zeros((rows, width), dtype=torch.long)
    for i in range(rows):
        p = prompts[min(i, len(prompts) - 1)]
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


def padded_batches(prompts: list[list[int]], pad_id: int, batch_size: int, fixed_rows: bool):
    """(prompts of the batch, ids, mask) for each batch of ``batch_size`` prompts, left-padded; with ``fixed_rows``
    every batch has ``batch_size`` rows (one compiled shape per batch size)."""
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        yield (chunk, *left_pad(chunk, pad_id, batch_size if fixed_rows else len(chunk)))


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _trim_after_eos(row: list[int], eos_id: int | None) -> list[int]:
    if eos_id is not None and eos_id in row:
        return row[:row.index(eos_id) + 1]
    return row


@contextlib.contextmanager
def no_recompile() -> Iterator[None]:
    """Within this block a torch.compile recompilation (a guard failure on an already compiled function: a new
    shape, dtype or weight identity) raises ``torch._dynamo.exc.RecompileError`` instead of compiling again.

    Wrap timed rounds in it, after warm-up has compiled every shape they use. A first compilation of a function
    never compiled before is not a recompile and is allowed. Where nothing is compiled (the CPU's eager decode
    step) it changes nothing.
    """
    import torch._dynamo

    with torch._dynamo.config.patch(error_on_recompile=True):
        yield


def timed_round(engine, prompt: list[int], tokens: int):
    """One timed unit of a latency benchmark: ``engine`` greedy-decodes ``prompt`` to exactly ``tokens`` tokens; a
    recompilation inside it is an error, and on CUDA the round ends when the GPU is done, not when its kernels are
    queued."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    def once() -> list[list[int]]:
        with no_recompile():
            out = engine.generate([prompt], tokens, batch_size=1, fixed_length=True)
        sync()
        return out

    return once


@contextlib.contextmanager
def _allow_compile(allowed: bool) -> Iterator[None]:
    if not allowed:
        yield
        return
    import torch._dynamo

    limit = max(torch._dynamo.config.recompile_limit, 64)  # engines x shapes share one code object's cache
    with torch._dynamo.config.patch(error_on_recompile=False, recompile_limit=limit):
        yield


@torch.inference_mode()
def generate_greedy(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 8,
                    min_new_tokens: int | None = None) -> list[list[int]]:
    """Greedy-decode each prompt (token ids) with ``model.generate`` and return only the new tokens, in input
    order (left-padded batches: every prompt ends where generation starts)."""
    device = next(model.parameters()).device
    pad_id = _pad_id(tokenizer)
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        ids, mask = left_pad(chunk, pad_id, len(chunk))
        gen = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False, max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens, pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id,
            temperature=None, top_p=None, top_k=None,
        )
        out.extend(row[ids.shape[1]:].tolist() for row in gen.cpu())
    return out


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
        rows = generate_greedy(self.model, self.tokenizer, prompts, max_new_tokens, batch_size,
                               min_new_tokens=max_new_tokens if fixed_length else None)
        return rows if fixed_length else [_trim_after_eos(r, self.tokenizer.eos_token_id) for r in rows]

    @torch.inference_mode()
    def teacher_forced(self, prompt: list[int], forced: list[int]) -> tuple[list[int], list[float], torch.Tensor]:
        """One plain forward of prompt + forced, no cache: (this model's greedy choice at each forced position, given
        the tokens before it; how many logits below that choice it scores the forced token there, 0 where they are the
        same; ``forced_logits``' rows). Where the choices equal ``forced`` up to position i, greedy decoding of this
        model would have produced ``forced[:i + 1]``: what ``generate`` finds one step at a time, one forward finds
        here."""
        dev = next(self.model.parameters()).device
        logits = self.model(input_ids=torch.tensor([prompt + forced], device=dev), use_cache=False).logits
        after_prompt = logits[0, len(prompt) - 1:].float()
        scores = after_prompt[:len(forced)]
        best, choices = scores.max(-1)  # the first of equal maxima, as argmax
        deficits = best - scores.gather(-1, torch.tensor(forced, device=dev)[:, None]).squeeze(-1)
        return choices.tolist(), deficits.tolist(), after_prompt[1:].cpu()

    def forced_logits(self, prompt: list[int], forced: list[int]) -> torch.Tensor:
        """The reference for ``StaticGreedy.forced_logits``: one plain teacher-forced forward of prompt + forced,
        no cache; row i is the prediction after ``prompt + forced[:i + 1]``. [len(forced), vocab] float32, CPU."""
        return self.teacher_forced(prompt, forced)[2]


def compile_layers_once(model) -> None:
    """Mark ``model``'s decoder layers (a transformers decoder, or peft's model of one) as one nested compile region
    per layer class (``torch.compiler.nested_compile_region``): a compile of the whole decode step still traces each
    layer, but lowers and compiles one for all of them when their traces match, and the step stays one graph (one
    CUDA graph). Eager calls are unchanged. What it costs: no fusion across a layer boundary (the residual add with
    the next layer's RMSNorm: one kernel a layer more)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    regions: dict[type, Any] = {}
    for layer in base.get_decoder().layers:
        kind = type(layer)
        region = regions.setdefault(kind, torch.compiler.nested_compile_region(kind.forward))
        layer.forward = functools.partial(region, layer)


class StaticGreedy:
    """Greedy decoding with a static KV cache and (on CUDA) a compiled, CUDA-graphed decode step, its decoder layers
    compiled once for all (``compile_layers_once``).

    Shapes are fixed per (batch rows, cache length): batches are padded to ``batch_size`` rows and the cache length
    is rounded up to ``bucket`` tokens, so a sweep compiles one graph for evaluation and one for latency.
    """

    def __init__(self, model, tokenizer, name: str, cfg: InferenceConfig, compile_on_cpu: bool = False,
                 inductor_options: dict[str, Any] | None = None):
        """``inductor_options``: inductor config applied to this engine's decode step alone, on top of
        ``cfg.compile_mode`` (``merged-int8`` passes ``coordinate_descent_tuning``)."""
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
            compile_layers_once(model)
            fullgraph = cfg.compile_fullgraph and name in FULLGRAPH_ENGINES  # bnb 4-bit layers may break the graph
            if inductor_options:  # torch.compile takes mode or options, not both: spell the mode out as options
                from torch._inductor import list_mode_options

                self._step = torch.compile(self._decode_one, fullgraph=fullgraph,
                                           options={**list_mode_options(cfg.compile_mode), **inductor_options})
            else:
                self._step = torch.compile(self._decode_one, mode=cfg.compile_mode, fullgraph=fullgraph)

    def cache_length(self, width: int, max_new_tokens: int) -> int:
        """Cache slots for a ``width``-token prompt and ``max_new_tokens`` new ones: one compiled shape a bucket."""
        return round_up(width + max_new_tokens, self.cfg.cache_bucket)

    def _decode_one(self, tok, position_ids, cache_position, attention_mask, cache):
        """One decode step: (logits of the next token [rows, vocab], its greedy choice [rows, 1]). The argmax stays
        inside the compiled graph; ``forced_logits`` reads the logits."""
        logits = self.model(input_ids=tok, position_ids=position_ids, cache_position=cache_position,
                            attention_mask=attention_mask, past_key_values=cache, use_cache=True).logits[:, -1]
        return logits, logits.argmax(-1, keepdim=True)

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
        pad_id = _pad_id(tok)
        eos_id = None if fixed_length else tok.eos_token_id
        out: list[list[int]] = []
        for chunk, ids, mask in padded_batches(prompts, pad_id, batch_size, self.compiled):
            rows, width = ids.shape
            length = self.cache_length(width, max_new_tokens)
            shape = f"{rows}x{length}"
            first = shape not in self.compile_s
            t0 = time.perf_counter()
            # The first call of a shape compiles it: for this engine that is a first compile, but dynamo keys its
            # cache on the code of _decode_one, which every engine shares, so it counts as a recompile of another
            # engine's graph. It is never a timed round; later calls of the shape must not recompile.
            with _allow_compile(first and self.compiled):
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
                               full_mask, cache)[1].clone()  # a CUDA-graph output is overwritten by the next replay
            new[:, t] = token[:, 0]
            if eos_id is not None and t % EOS_CHECK_EVERY == 0 and bool((new[:, :t + 1] == eos_id).any(1).all()):
                return new[:, :t + 1]
        return new

    @torch.inference_mode()
    def forced_logits(self, prompt: list[int], forced: list[int]) -> torch.Tensor:
        """Teacher-forced logits through this engine's own decode path: [len(forced), vocab] float32 on the CPU.

        The prompt is prefilled into the static cache as ``_generate_batch`` does (one row); then each forced token
        goes through the decode step (compiled where ``generate``'s is) and row i holds the logits after
        ``prompt + forced[:i + 1]``, i.e. the prediction of the token after forced[i]. ``HFGreedy.forced_logits``
        gives the same rows from one plain forward, so the two compare token for token.
        """
        dev, n = self.device, len(prompt)
        length = round_up(n + len(forced), self.cfg.cache_bucket)
        full_mask = torch.ones((1, length), dtype=torch.long, device=dev)
        cache_positions = torch.arange(length, device=dev)
        cache = self._cache(1, length)
        with _allow_compile(self.compiled):  # never timed: a new shape may compile here
            self.model(input_ids=torch.tensor([prompt], device=dev), attention_mask=full_mask,
                       position_ids=cache_positions[None, :n], cache_position=cache_positions[:n],
                       past_key_values=cache, use_cache=True)
            rows = []
            for i, tok in enumerate(forced):
                if self.compiled:
                    torch.compiler.cudagraph_mark_step_begin()
                at = cache_positions[n + i:n + i + 1]
                token = torch.tensor([[tok]], device=dev)
                logits, _ = self._step(token, at[None].clone(), at.clone(), full_mask, cache)
                rows.append(logits[0].float().cpu())  # copied out before the next replay overwrites it
        return torch.stack(rows)
