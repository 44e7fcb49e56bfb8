"""``merged-int4``: the merged model's decoder projections in 4 bits, decoded by the fused engine (harness/engines/fused.py).

A decode step at batch 1 reads every weight once, so 4-bit projections read about a quarter of bf16's bytes. The
kernels are gemlite's (Triton GEMV kernels tuned for batch 1, shipped with configs per GPU); the quantizer is
torchao's HQQ (half-quadratic, calibration-free), the one torchao's own ``UIntxWeightOnlyConfig`` uses for gemlite.
That config cannot be used as it is: with gemlite 0.6 its packing step fails ("too many values to unpack":
``get_tensor_args`` returns four tensors, torchao 0.18 expects three; H200, 2026-12-02), so ``quantize_linear``
calls the same two halves itself: torchao quantizes, gemlite packs and multiplies.

What is quantized: each layer's fused ``qkv``, ``o``, ``gate_up`` and ``down`` (asymmetric, one bf16 scale and zero
per ``group_size`` inputs). What is not: ``lm_head`` (its error lands directly on the logits whose top-2 gaps decide
each greedy token), the embeddings (a gather of one row per token) and the norms.

The engine is a snapshot: it quantizes the variant merged into ``MergedBase`` when it is built, and later merges do
not reach it. gemlite needs CUDA; on the CPU ``Int4Merged`` raises, saying so. It decodes one prompt at a time:
batch 1 is what it is for (gemlite's GEMV kernels), and gemlite 0.6's multi-row path returned NaN for SmolLM2's
fused gate/up (3072 x 576) at 8 rows on the H200 (``.ci/int4_check.py``, 2026-12-02). gemlite picks kernel configs by GPU
name; where it ships none for this GPU (the H200), the H100's (same chip, sm_90) are loaded.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .fused import FusedDecoder, FusedGreedy

__all__ = ["quantize_linear", "int4_projections", "Int4Merged"]

PROJECTIONS = ("qkv", "o", "gate_up", "down")
FALLBACK_CONFIG = "h100.json"  # gemlite's configs are named by GPU; the H200 is an H100 chip with faster memory


def _load_gemlite():
    try:
        import gemlite
        from gemlite import core
    except ImportError as e:
        raise RuntimeError("merged-int4 needs gemlite (pip install gemlite; see README, GPU section)") from e
    if core.selected_tag is None:  # no config named after this GPU: autotuning every shape would take minutes
        core.GemLiteLinear.load_config(os.path.join(os.path.dirname(gemlite.__file__), "configs", FALLBACK_CONFIG))
    return gemlite


@torch.no_grad()
def quantize_linear(linear: nn.Linear, group_size: int) -> nn.Module:
    """A gemlite 4-bit module computing ``linear`` (read only): HQQ quantization in groups of ``group_size`` inputs,
    scales and zeros in the weight's dtype. ValueError when the input size is not a multiple of ``group_size``."""
    from torchao.quantization.quant_primitives import _choose_qparams_and_quantize_affine_hqq

    gemlite = _load_gemlite()
    out_features, in_features = linear.weight.shape
    if in_features % group_size:
        raise ValueError(f"merged-int4: input size {in_features} is not a multiple of group_size {group_size}; "
                         "choose a group size that divides every projection's input (inference.int4_group_size)")
    w_q, scale, zero, _ = _choose_qparams_and_quantize_affine_hqq(linear.weight.detach(), nbits=4,
                                                                  group_size=group_size, raw_output=True)
    # gemlite takes its compute dtype from the scales unless told (HQQ returns float16 ones): keep the model's
    return gemlite.helper.A16Wn(device=linear.weight.device, dtype=linear.weight.dtype).from_weights(
        w_q, scale, zero, 4, group_size, bias=None)


def int4_projections(projections: nn.ModuleList, group_size: int) -> nn.ModuleList:
    """4-bit copies of ``fuse_projections_``'s per-layer Linears; the bf16 ones are only read."""
    out = nn.ModuleList()
    for layer in projections:
        quantized = nn.Module()
        for name in PROJECTIONS:
            setattr(quantized, name, quantize_linear(getattr(layer, name), group_size))
        out.append(quantized)
    torch.cuda.empty_cache()
    return out


class Int4Merged(FusedGreedy):
    """The ``merged-int4`` engine: ``FusedGreedy`` over 4-bit copies of a merged model's projections (embeddings,
    norms and ``lm_head`` shared with the merged model). ``weights_gib`` is the 4-bit projections' resident size."""

    def __init__(self, merged_model, projections: nn.ModuleList, tokenizer, cfg):
        if not torch.cuda.is_available() or merged_model.lm_head.weight.device.type != "cuda":
            raise RuntimeError("merged-int4 runs on CUDA only: gemlite's kernels are Triton GPU kernels")
        group = cfg.int4_group_size
        before = torch.cuda.memory_allocated()
        quantized = int4_projections(projections, group)
        self.weights_gib = (torch.cuda.memory_allocated() - before) / 2**30
        super().__init__(merged_model, FusedDecoder(merged_model, quantized), tokenizer, "merged-int4", cfg)
        self.note = (f"merged LoRA, decoder projections 4-bit (torchao HQQ, group {group}, gemlite kernels), "
                     f"lm_head/embeddings {cfg.merged_dtype}; {self.note}")

    def generate(self, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 8,
                 fixed_length: bool = False) -> list[list[int]]:
        """``FusedGreedy.generate`` one prompt at a time, whatever ``batch_size`` asks (see the module doc)."""
        return super().generate(prompts, max_new_tokens, 1, fixed_length)
