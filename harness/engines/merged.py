"""The merged engine's base: one dequantized model for a sweep, each variant's adapter merged into it in place.

``merged`` is the deployable artifact: the NF4 base dequantized to ``merged_dtype``, the adapter merged in that
dtype (never into 4-bit: peft #2321, transformers #31293), decoded by ``harness.engines.fused.FusedGreedy``
(fused projections, decode steps captured as CUDA graphs; ``StaticGreedy`` for architectures it does not cover). On
CUDA its one-row steps run ``harness.engines.gemv``'s kernels, built into ``kernels_dir`` (default: ``_kernels``
beside ``cache_root``) once per machine; where there is no nvcc to build them, cuBLAS's, which the engine's note says.

``MergedBase`` keeps the dequantized weights for the whole sweep and merges each variant into them in place
(restoring the pristine weights first), so the compiled decode graphs, which hold the weights' addresses, are
built once. ``activate`` checks that promise after every merge: a parameter whose storage moved would leave the
CUDA graphs reading the old, stale weights, so it raises instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..config.schema import Profile
from .decoding import StaticGreedy
from .fused import FusedDecoder, FusedGreedy, check_supported, fuse_projections_
from .gemv import GemvDecoder
from .gemv import load as load_gemv
from .kernel_build import CompilerMissing

__all__ = ["MergedBase"]


class MergedBase:
    """One dequantized base for a sweep; ``activate`` merges a variant's adapter into it in place.

    The pristine weights (``harness.models.dequantized``: the 4-bit weights and the other parameters, in host memory)
    are written back before a merge when another variant's delta is in them, so a variant is always exactly
    dequantize(NF4 base) + its own delta, and parameter storage never moves (compiled graphs stay valid; ``activate``
    verifies it). peft computes each delta (B @ A * alpha / r) and adds it in place (``merge_and_unload``).
    """

    def __init__(self, profile: Profile, cache_root: Path, tokenizer, kernels_dir: Path | None = None):
        from ..models.dequantized import load

        allocated = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
        self.model, self._pristine = load(profile, cache_root)  # restores write it back
        try:
            check_supported(self.model)
            self.projections, unsupported = fuse_projections_(self.model), None
        except ValueError as e:  # another architecture: the model's own forward, one compiled step per token
            self.projections, unsupported = None, str(e)
        self.resident_gib = ((torch.cuda.memory_allocated() - allocated) / 2**30 if torch.cuda.is_available()
                             else None)
        self._storage = self._storage_map()  # what the compiled graphs will read: checked after every merge
        self.active: str | None = None
        self._activating: str | None = None  # the variant being merged, for check_storage's message
        self._merged_in = False  # whether the weights differ from the pristine ones (a restore is due before a merge)
        if self.projections is None:
            self.engine = StaticGreedy(self.model, tokenizer, "merged", profile.inference)
            self.engine.note += f" (not fused: {unsupported})"
        else:
            decoder, note = self._decoder(kernels_dir or Path(cache_root).parent / "_kernels")
            hand = isinstance(decoder, GemvDecoder)  # its kernels and inductor's launch with programmatic dependence
            self.engine = FusedGreedy(self.model, decoder, tokenizer, "merged", profile.inference,
                                      inductor_options={"triton.enable_pdl": True} if hand else None)
            self.engine.note += note

    def _decoder(self, kernels_dir: Path) -> tuple[FusedDecoder, str]:
        """On CUDA, ``GemvDecoder`` with gemv.cu's kernels (built into ``kernels_dir`` once per machine); on the CPU,
        or on CUDA without nvcc to build them, ``FusedDecoder``, its one-row products cuBLAS's. With what the engine's
        note (the card's engines table) says of it."""
        if self.model.lm_head.weight.device.type != "cuda":
            return FusedDecoder(self.model, self.projections), ""
        try:
            load_gemv(kernels_dir)
        except CompilerMissing as e:
            return FusedDecoder(self.model, self.projections), f"; one-row products cuBLAS's, not gemv.cu's: {e}"
        return GemvDecoder(self.model, self.projections), ("; one-row products through harness/engines/gemv.cu "
                                                           "(RMSNorm, SiLU(gate) * up and residual adds folded in), "
                                                           "kernels launched with programmatic dependent launch")

    def _storage_map(self) -> dict[str, tuple[int, tuple[int, ...], torch.dtype]]:
        return {n: (p.data_ptr(), tuple(p.shape), p.dtype) for n, p in self.model.named_parameters()}

    def check_storage(self) -> None:
        """Raise RuntimeError naming the first parameter whose storage address, shape or dtype differs from
        construction time (or that appeared or disappeared): compiled CUDA graphs would read stale weights."""
        now = self._storage_map()
        for name in list(self._storage) + [n for n in now if n not in self._storage]:
            before, after = self._storage.get(name), now.get(name)
            if before == after:
                continue
            if before is None or after is None:
                what = "appeared" if before is None else "disappeared"
                detail = f"parameter {name!r} {what} after the merge"
            else:
                detail = (f"parameter {name!r} moved: data_ptr {before[0]:#x} -> {after[0]:#x}, shape {before[1]} -> "
                          f"{after[1]}, dtype {before[2]} -> {after[2]}")
            raise RuntimeError(
                f"MergedBase: {detail} (variant {self._activating!r}). The compiled CUDA graphs of the merged engine "
                "hold the original parameter addresses and would read stale weights; merges must write in place.")

    def warmup(self, eval_prompts: list[list[int]], latency_prompt: list[int], eval_cfg, latency_tokens: int) -> None:
        """Compile every evaluation batch shape and the latency shape now, so no variant's figures carry compile
        time or compile memory."""
        seen = set()
        for start in range(0, len(eval_prompts), eval_cfg.batch_size):
            chunk = eval_prompts[start:start + eval_cfg.batch_size]
            length = self.engine.cache_length(max(len(p) for p in chunk), eval_cfg.max_new_tokens)
            if length not in seen:
                seen.add(length)
                self.engine.generate(chunk, eval_cfg.max_new_tokens, eval_cfg.batch_size)
        self.engine.generate([latency_prompt], latency_tokens, 1, fixed_length=True)

    @torch.inference_mode()
    def activate(self, name: str, adapter_dir: Path | None) -> Any:
        """Restore the pristine weights, merge ``adapter_dir`` (None: the base alone) in place, check that no
        parameter's storage moved, and return the model. RuntimeError if one moved; the weights then belong to
        no variant (``active`` is None)."""
        from peft import PeftModel

        if self.active == name:
            return self.model
        self.active = None  # until this merge completes and is checked, the weights belong to no variant
        self._activating = name
        if self._merged_in:
            self._pristine.restore(self.model)
            self._merged_in = False
        if adapter_dir is not None:
            self._merged_in = True
            wrapped = PeftModel.from_pretrained(self.model, str(adapter_dir), low_cpu_mem_usage=True)
            try:
                merged = wrapped.merge_and_unload()
            except BaseException:
                wrapped.unload()  # take the adapter layers out again, then put the pristine weights back
                self._pristine.restore(self.model)
                self._merged_in = False
                raise
            if merged is not self.model:  # peft returns the base module it wrapped
                raise RuntimeError("peft merge_and_unload returned a new module; the compiled graphs would be stale")
            for attr in ("peft_config", "_hf_peft_config_loaded"):  # peft's marks; the next merge adds them again
                self.model.__dict__.pop(attr, None)
        self.check_storage()
        self.active = name
        return self.model
