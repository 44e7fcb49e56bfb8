"""``merged-int4``: the merged model's decoder projections in 4 bits, decoded by the fused engine (harness/engines/fused.py).

A decode step at batch 1 reads every weight once, so 4-bit projections read about a quarter of bf16's bytes. The
kernel is Marlin's 4-bit GEMM (vLLM's, as gptqmodel packages it; built once per machine by harness/engines/marlin.py):
at one row on an H200 it streams the Mistral-7B projections at 0.9-2.2 TB/s of 4-bit weights, 61.6 us a layer against
gemlite's GEMV's 76.5 and bf16's 113.5 (``results/h200/decode-tries/9-probe-marlin.json``; gemlite was this engine's
kernel until then). One kernel serves every row count, the prompt's prefill as each decoded token.

The quantizer is round-to-nearest, asymmetric: per group of ``group_size`` inputs, a bf16 scale ``(max - min) / 15``
and an integer zero point ``round(-min / scale)``, so ``w ~ (q - zero) * scale`` (AWQ's format before its scale
search, which needs calibration data). Marlin takes integer zero points only with bf16 activations. On random
Mistral-7B-shaped weights a projection's error is 0.10 relative, as torchao's HQQ quantizer gave gemlite
(``9-probe-marlin.json``); what it costs on real weights is measured on SmolLM2 (``quality_merged-int4``).

What is quantized: each layer's fused ``qkv``, ``o``, ``gate_up`` and ``down``. What is not: ``lm_head`` (its error
lands directly on the logits whose top-2 gaps decide each greedy token), the embeddings (a gather of one row per
token) and the norms. Marlin tiles outputs and inputs by 64 and takes groups of 32, 64 or 128 inputs: SmolLM2's
hidden size 576 takes 64 (``inference.int4_group_size``). Its thread tiles (inputs x outputs: 128x128, 64x128,
128x64) need the outputs or the inputs to be a multiple of 128: a projection with neither gets zero output rows up to
the next multiple of 128 (``marlin_rows``), sliced off its product. Without them Marlin's host code crashed the
process on SmolLM2's q/k/v (960x576) and o (576x576), at groups 32 and 64 alike, while 3072x576, 576x1536, 1024x576
and 1152x576 ran (H200, b0afe53); Mistral-7B's projections need none.

The engine is a snapshot: it quantizes the variant merged into ``MergedBase`` when it is built, and later merges do
not reach it. It checks its own kernel when it is built (``check_kernel``: each projection shape, at 1, 7 and 32
rows, against the product with the dequantized weight) and refuses to run on a wrong or non-finite result. Marlin's
kernel is a GEMM for any row count, so the engine batches prompts as ``merged`` does. On the CPU ``Int4Merged``
raises, saying so.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .fused import FusedDecoder, FusedGreedy
from .marlin import Marlin, load, marlin_gemm

__all__ = ["Int4Linear", "marlin_rows", "quantize", "quantize_linear", "check_kernel", "int4_projections",
           "Int4Merged"]

PROJECTIONS = ("qkv", "o", "gate_up", "down")
TILE = 64  # Marlin's smallest output and input tile
THREAD_TILE = 128  # the outputs or the inputs must be a multiple of this (module doc)
CHECK_ROWS = (1, 7, 32)  # one row, a prefill's odd count, and a full tile of rows
CHECK_MAX_RELATIVE_ERROR = 5e-2  # Marlin against its own dequantized weight: 2.5-3.0e-3 (9-probe-marlin.json)
SCALE_PERM = [i + 8 * j for i in range(8) for j in range(8)]  # Marlin's order of scales and zero points in a tile
ZERO_INTERLEAVE = [0, 2, 4, 6, 1, 3, 5, 7]  # and of eight zero points in a word (its dequantizer's order)


def quantize(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest asymmetric 4-bit (module doc): ``q`` (out, in) in 0..15, ``scale`` and integer-valued
    ``zero`` (out, in / group_size), float32; ``(q - zero) * scale`` is the dequantized weight."""
    out_features, in_features = weight.shape
    groups = weight.detach().float().reshape(out_features, in_features // group_size, group_size)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = ((high - low) / 15).clamp_min(1e-8)
    zero = (-low / scale).round().clamp(0, 15)
    q = (groups / scale + zero).round().clamp(0, 15)
    return q.reshape(out_features, in_features), scale.squeeze(-1), zero.squeeze(-1)


def marlin_rows(out_features: int, in_features: int) -> int:
    """The output rows Marlin computes for an ``out_features`` x ``in_features`` projection: ``out_features``, or the
    next multiple of ``THREAD_TILE`` where neither size is one (module doc)."""
    if out_features % THREAD_TILE == 0 or in_features % THREAD_TILE == 0:
        return out_features
    return -(-out_features // THREAD_TILE) * THREAD_TILE


def _pack(values: torch.Tensor, dim: int) -> torch.Tensor:
    """Eight consecutive 4-bit values along ``dim`` (0 or 1) in one int32, the first in the low bits."""
    v = values.to(torch.int64)
    v = v.reshape(v.shape[0] // 8, 8, v.shape[1]) if dim == 0 else v.reshape(v.shape[0], v.shape[1] // 8, 8)
    word = sum((v[:, j, :] if dim == 0 else v[:, :, j]) << (4 * j) for j in range(8))
    return (word - ((word >> 31) << 32)).to(torch.int32)  # each 32-bit word as the int32 it is


class Int4Linear(nn.Module):
    """A Linear's weight in Marlin's 4-bit layout: ``quantize``'s values repacked by Marlin's own repack op, scales
    and zero points in its tile order. Reads only ``qweight``, ``scales``, ``zeros`` and the lock ``workspace``.
    ``q`` may hold zero rows past ``out_features`` (``marlin_rows``): Marlin computes them, ``forward`` drops them."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype, marlin: Marlin,
                 out_features: int | None = None):
        super().__init__()
        device = q.device
        self.rows, self.in_features = q.shape
        self.out_features = out_features or self.rows
        n = self.rows
        no_perm = torch.empty(0, dtype=torch.int32, device=device)
        self.qweight = marlin.ops.gptq_marlin_repack(_pack(q.t().contiguous(), 0), no_perm, self.in_features, n, 4)
        self.scales = scale.t().to(dtype).reshape(-1, len(SCALE_PERM))[:, SCALE_PERM].reshape(-1, n).contiguous()
        zeros = zero.t().reshape(-1, len(SCALE_PERM))[:, SCALE_PERM].reshape(-1, 8)[:, ZERO_INTERLEAVE]
        self.zeros = _pack(zeros.reshape(-1, n), 1)
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        self.workspace = torch.zeros(max(sms, 128), dtype=torch.int32, device=device)  # gptqmodel's size
        self.type_id = marlin.uint4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = marlin_gemm(x.reshape(-1, self.in_features), self.qweight, self.scales, self.zeros, self.workspace,
                          self.type_id, self.rows)
        return out[:, :self.out_features].reshape(*x.shape[:-1], self.out_features)


@torch.no_grad()
def quantize_linear(linear: nn.Linear, group_size: int, marlin: Marlin, check: bool = False) -> Int4Linear:
    """A Marlin 4-bit module computing ``linear`` (read only), groups of ``group_size`` inputs, its output rows padded
    as ``marlin_rows`` says. ValueError for a shape Marlin does not tile; with ``check``, ``check_kernel`` runs on
    the result."""
    out_features, in_features = linear.weight.shape
    if in_features % group_size or in_features % TILE or out_features % TILE:
        raise ValueError(f"merged-int4: a {out_features}x{in_features} projection does not fit Marlin's tiles "
                         f"({TILE} outputs and inputs) and groups of {group_size} inputs; choose a group size that "
                         f"divides every projection's input (inference.int4_group_size: 32, 64 or 128)")
    pad = marlin_rows(out_features, in_features) - out_features
    q, scale, zero = quantize(nn.functional.pad(linear.weight, (0, 0, 0, pad)), group_size)  # zero rows: q = zero = 0
    module = Int4Linear(q, scale, zero, linear.weight.dtype, marlin, out_features)
    if check:
        dequantized = ((q - zero.repeat_interleave(group_size, 1))
                       * scale.to(linear.weight.dtype).float().repeat_interleave(group_size, 1))
        check_kernel(module, dequantized[:out_features])
    return module


@torch.no_grad()
def check_kernel(module: nn.Module, dequantized: torch.Tensor, rows: tuple[int, ...] = CHECK_ROWS) -> None:
    """``module`` computes ``x @ dequantized.T`` for ``rows``-row inputs, within ``CHECK_MAX_RELATIVE_ERROR`` (float32
    reference); RuntimeError naming the shape, the row count and the error otherwise (a NaN fails)."""
    out_features, in_features = dequantized.shape
    dtype = next((t.dtype for t in module.parameters() if t.is_floating_point()), torch.bfloat16)
    generator = torch.Generator(device=dequantized.device).manual_seed(0)
    for n in rows:
        x = torch.randn(n, in_features, device=dequantized.device, dtype=dtype, generator=generator)
        reference = x.float() @ dequantized.float().T
        error = ((module(x).float() - reference).norm() / reference.norm()).item()
        if not error <= CHECK_MAX_RELATIVE_ERROR:  # written so that NaN fails
            raise RuntimeError(f"merged-int4: the 4-bit kernel is wrong for a {out_features}x{in_features} projection "
                               f"at {n} rows (relative error {error:.3g} against the dequantized product, limit "
                               f"{CHECK_MAX_RELATIVE_ERROR:g}); not decoding with it")


def int4_projections(projections: nn.ModuleList, group_size: int, cache_dir: Path) -> nn.ModuleList:
    """4-bit copies of ``fuse_projections_``'s per-layer Linears; the bf16 ones are only read. ``cache_dir`` holds the
    built kernels (harness/engines/marlin.py), loaded once here for every projection."""
    marlin = load(cache_dir)
    out = nn.ModuleList()
    for i, layer in enumerate(projections):
        quantized = nn.Module()
        for name in PROJECTIONS:  # every layer has the same shapes: the first one's check covers the kernels
            setattr(quantized, name, quantize_linear(getattr(layer, name), group_size, marlin, check=i == 0))
        out.append(quantized)
    torch.cuda.empty_cache()
    return out


class Int4Merged(FusedGreedy):
    """The ``merged-int4`` engine: ``FusedGreedy`` over 4-bit copies of a merged model's projections (embeddings,
    norms and ``lm_head`` shared with the merged model). ``weights_gib`` is the 4-bit projections' resident size."""

    def __init__(self, merged_model, projections: nn.ModuleList, tokenizer, cfg, cache_dir: Path):
        if not torch.cuda.is_available() or merged_model.lm_head.weight.device.type != "cuda":
            raise RuntimeError("merged-int4 runs on CUDA only: Marlin's kernels are CUDA kernels")
        group = cfg.int4_group_size
        before = torch.cuda.memory_allocated()
        quantized = int4_projections(projections, group, cache_dir)
        self.weights_gib = (torch.cuda.memory_allocated() - before) / 2**30
        super().__init__(merged_model, FusedDecoder(merged_model, quantized), tokenizer, "merged-int4", cfg)
        padded = [f"{name} {m.out_features}x{m.in_features} as {m.rows} rows" for name in PROJECTIONS
                  if (m := getattr(quantized[0], name)).rows != m.out_features]
        self.note = (f"merged LoRA, decoder projections 4-bit (round-to-nearest, group {group}, Marlin kernels"
                     + (f"; {', '.join(padded)}: Marlin needs outputs or inputs in 128s" if padded else "")
                     + f"), lm_head/embeddings {cfg.merged_dtype}; {self.note}")
