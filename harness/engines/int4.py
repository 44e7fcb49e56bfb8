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
not reach it. gemlite needs CUDA; on the CPU ``Int4Merged`` raises, saying so.

One gemlite kernel serves every row count: its batch-1 GEMV (``GEMV_REVSPLITK``, one program per row and output block),
for the prompt's prefill rows as for each decoded token. Left to choose by row count, gemlite 0.6 takes its split-K GEMM
for 5-63 rows, which returned NaN for SmolLM2's fused gate/up (3072 x 576) at 8 rows on the H200
(``.ci/int4_check.py``, 2026-12-02). Every SmolLM2 prompt's prefill went through it in the run where ``merged-int4``
answered nothing right (F1 0.0 on every split and variant, ``results/h200/smollm2-135m-bf16/c8dd8a0/``); with the
GEMV for every row count it scored train F1 0.87-0.97 against the bf16 engine's 1.0
(``results/h200/smollm2-135m-bf16/``, 6687e16), and the 7B decode kept its speed (0.460 s for 128 tokens). The engine
also checks its own kernels when it is built (``check_kernel``: each projection shape, at 1, 7 and 32 rows, against
the product with the dequantized weight) and refuses to run on a wrong or non-finite result. It decodes one prompt at
a time: batch 1 is what the GEMV is for. gemlite picks kernel configs by GPU name; where it ships none for this GPU (the
H200), the H100's (same chip, sm_90) are loaded.

Configs per row count: gemlite looks a config up by (row-count bucket, shape), and its shipped configs are for one
row; Triton autotunes afresh for every row count it has no config for (the row count is in its autotune key), about
17 configs a shape a prompt length. The kernel runs one program per row, so the one-row config serves every row count:
``pin_one_row_configs`` files it under every bucket, once a shape's one-row config is known (shipped or autotuned
when the engine is built).
"""

from __future__ import annotations

import ast
import os

import torch
from torch import nn

from .fused import FusedDecoder, FusedGreedy

__all__ = ["Int4Linear", "quantize_linear", "dequantize", "check_kernel", "pin_one_row_configs", "int4_projections",
           "Int4Merged"]

PROJECTIONS = ("qkv", "o", "gate_up", "down")
FALLBACK_CONFIG = "h100.json"  # gemlite's configs are named by GPU; the H200 is an H100 chip with faster memory
KERNEL = "GEMV_REVSPLITK"  # gemlite's batch-1 kernel, used for every row count (module doc)
CHECK_ROWS = (1, 7, 32)  # Triton specializes a row count of 1 and multiples of 16: one of each kind, and another
CHECK_MAX_RELATIVE_ERROR = 5e-2  # bf16 rounding of a 4-bit product measured 0.8-3.5e-2 (.ci/int4_check.py)


def _load_gemlite():
    try:
        import gemlite
        from gemlite import core
    except ImportError as e:
        raise RuntimeError("merged-int4 needs gemlite (pip install gemlite; see README, GPU section)") from e
    if core.selected_tag is None:  # no config named after this GPU: autotuning every shape would take minutes
        core.GemLiteLinear.load_config(os.path.join(os.path.dirname(gemlite.__file__), "configs", FALLBACK_CONFIG))
    return gemlite


class Int4Linear(nn.Module):
    """A gemlite 4-bit module called with ``KERNEL`` whatever the row count (module doc)."""

    def __init__(self, packed: nn.Module):
        super().__init__()
        self.packed = packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.packed.forward_manual(x, KERNEL)


@torch.no_grad()
def quantize_linear(linear: nn.Linear, group_size: int, check: bool = False) -> Int4Linear:
    """A gemlite 4-bit module computing ``linear`` (read only): HQQ quantization in groups of ``group_size`` inputs,
    scales and zeros in the weight's dtype. ValueError when the input size is not a multiple of ``group_size``;
    with ``check``, ``check_kernel`` runs on the result."""
    from torchao.quantization.quant_primitives import _choose_qparams_and_quantize_affine_hqq

    gemlite = _load_gemlite()
    out_features, in_features = linear.weight.shape
    if in_features % group_size:
        raise ValueError(f"merged-int4: input size {in_features} is not a multiple of group_size {group_size}; "
                         "choose a group size that divides every projection's input (inference.int4_group_size)")
    w_q, scale, zero, _ = _choose_qparams_and_quantize_affine_hqq(linear.weight.detach(), nbits=4,
                                                                  group_size=group_size, raw_output=True)
    # gemlite takes its compute dtype from the scales unless told (HQQ returns float16 ones): keep the model's
    module = Int4Linear(gemlite.helper.A16Wn(device=linear.weight.device, dtype=linear.weight.dtype).from_weights(
        w_q, scale, zero, 4, group_size, bias=None))
    if check:
        module(torch.zeros(1, in_features, device=linear.weight.device, dtype=linear.weight.dtype))  # one-row config
        pin_one_row_configs()
        check_kernel(module, dequantize(w_q, scale, zero, (out_features, in_features), group_size,
                                        linear.weight.dtype))
    return module


def dequantize(w_q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, shape: tuple[int, int], group_size: int,
               dtype: torch.dtype) -> torch.Tensor:
    """The ``shape`` ([out, in]) float32 weight that HQQ's raw ``w_q``, ``scale`` and ``zero`` stand for, the scales
    and zeros rounded to ``dtype`` as gemlite stores them: ``(w_q - zero) * scale`` per group (exact in float32)."""
    out_features, in_features = shape
    groups = (out_features, in_features // group_size, group_size)
    return ((w_q.float().view(groups) - zero.to(dtype).float().view(*groups[:2], 1))
            * scale.to(dtype).float().view(*groups[:2], 1)).view(out_features, in_features)


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


def pin_one_row_configs() -> None:
    """File ``KERNEL``'s one-row config of every shape gemlite knows (shipped, loaded or autotuned in this process)
    under every row-count bucket, where that bucket has none (module doc)."""
    from gemlite import core
    from gemlite.triton_kernels import utils
    from gemlite.triton_kernels.gemv_revsplitK_kernels import gemv_revsplitK

    table = core.GEMLITE_TRITON_CONFIG_CACHE.setdefault(KERNEL, {})
    for kernel in gemv_revsplitK.kernel:  # what Triton autotuned, keyed as gemlite's own cache_config keys it
        for key, config in core.cache_kernel_config(kernel, 6).items():
            table.setdefault(key, config)
    buckets = sorted(set(utils.M_MAPPING))  # gemlite's bucket of each row count up to its maximum, indexed by rows
    for key, config in list(table.items()):
        rows, *shape = ast.literal_eval(key)  # gemlite's key: str((rows bucket, N, K, group, elements, type id))
        if rows == 1:
            for bucket in buckets:
                table.setdefault(str(tuple([bucket, *shape])), config)


def int4_projections(projections: nn.ModuleList, group_size: int) -> nn.ModuleList:
    """4-bit copies of ``fuse_projections_``'s per-layer Linears; the bf16 ones are only read."""
    out = nn.ModuleList()
    for i, layer in enumerate(projections):
        quantized = nn.Module()
        for name in PROJECTIONS:  # every layer has the same shapes: the first one's check covers the kernels
            setattr(quantized, name, quantize_linear(getattr(layer, name), group_size, check=i == 0))
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
        """``FusedGreedy.generate`` one prompt at a time, whatever ``batch_size`` asks (batch 1 is what the GEMV is
        for)."""
        return super().generate(prompts, max_new_tokens, 1, fixed_length)
