"""``merged-int4``: the merged model's decoder projections in 4 bits, decoded by the fused engine
(harness/engines/fused.py).

A decode step at batch 1 reads every weight once, so 4-bit projections read about a quarter of bf16's bytes. The
kernels are AWQ's (gptqmodel's packaging; built once per machine by harness/engines/awq_kernels.py): the decode GEMV
(TensorRT-LLM's weight-only batched GEMV as llm-awq adapted it) for up to 7 rows, the prefill GEMM over the same
packing past them. At one row on an H200 the GEMV streams the Mistral-7B projections at 1.6-2.7 TB/s of 4-bit weights,
46.9 us a layer against Marlin's 64.5 (this engine's kernel until then) and cuBLAS bf16's 113.1
(``results/h200/decode-tries/15-probe-awq.json``). They take float16 only: each projection's bf16 input goes in as
float16 and its float16 output comes back as bf16 (both casts fused into the neighbouring kernels by inductor); the
norms, attention and residual stream stay bf16. They launch on the per-thread default stream, so the engine captures
its CUDA graphs there (harness/engines/awq_kernels.py).

The quantizer is round-to-nearest, asymmetric: per group of 128 inputs (the only group size the kernels
instantiate), a scale ``(max - min) / 15`` and an integer zero point ``round(-min / scale)``, so
``w ~ (q - zero) * scale``; the kernels take the scale in float16 and the zero point folded in, ``-scale * zero`` in
float16 (AWQ's format before its scale search, which needs calibration data). On random Mistral-7B-shaped weights a
projection's error is 0.10 relative against bf16's product (``15-probe-awq.json``); what it costs on real weights is
measured on SmolLM2 (``quality_merged-int4``).

What is quantized: each layer's fused ``qkv``, ``o``, ``gate_up`` and ``down``. What is not: ``lm_head`` (its error
lands directly on the logits whose top-2 gaps decide each greedy token), the embeddings (a gather of one row per
token) and the norms. The prefill GEMM tiles outputs by 128 and splits inputs in two halves of 128-input tiles, and
computes nothing past the last whole tile: a projection whose outputs are not a multiple of ``OUT_ALIGN`` gets zero
output rows (sliced off its product), and one whose inputs are not a multiple of ``IN_ALIGN`` gets zero input columns
(its input padded with zeros to match: a group then holds fewer real inputs). Mistral-7B's projections need neither;
SmolLM2's do (hidden size 576: ``padded_shape``), which the card's engines table names.

The engine is a snapshot: it quantizes the variant merged into ``MergedBase`` when it is built, and later merges do
not reach it. It checks its own kernels when it is built (``check_kernel``: each projection shape, at 1 and 7 rows
through the GEMV and at 32, 64, 128, 192 and 256 through each of the GEMM's five tilings, against the product with
the dequantized weight) and refuses to run on a wrong or non-finite result. On the CPU ``Int4Merged`` raises, saying so.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .awq_kernels import GROUP_SIZE, AwqKernels, awq_linear, capture_stream, load
from .fused import FusedDecoder, FusedGreedy

__all__ = ["Int4Linear", "Int4Decoder", "padded_shape", "quantize", "quantize_linear", "check_kernel",
           "int4_projections", "Int4Merged"]

PROJECTIONS = ("qkv", "o", "gate_up", "down")
OUT_ALIGN = 128  # the prefill GEMM's output tile
IN_ALIGN = 2 * 128  # its input tile, the inputs split in two halves of whole tiles (module doc)
CHECK_ROWS = (1, 7, 32, 64, 128, 192, 256)  # the GEMV's first and last row count, then each of the GEMM's tilings
CHECK_MAX_RELATIVE_ERROR = 5e-2  # the kernels against their own dequantized weight: 1.1-2.1e-3 (15-probe-awq.json)


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


def padded_shape(out_features: int, in_features: int) -> tuple[int, int]:
    """The (outputs, inputs) the kernels compute for a projection: each rounded up to its alignment (module doc)."""
    return -(-out_features // OUT_ALIGN) * OUT_ALIGN, -(-in_features // IN_ALIGN) * IN_ALIGN


def folded(scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """AWQ's float16 scale and folded zero point ``-scale * zero`` (out, groups): the kernels compute
    ``q * scale + folded zero``."""
    half = scale.half()
    return half, (-(half.float() * zero)).half()


class Int4Linear(nn.Module):
    """A Linear's weight in AWQ's 4-bit layout: ``quantize``'s values packed by gptqmodel's ``pack_intweight``,
    scales and folded zero points (``folded``) transposed to (groups, out). ``q`` may be padded past the Linear's
    shape (``padded_shape``): ``forward`` pads its input with zeros and drops the padded outputs."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, kernels: AwqKernels,
                 out_features: int, in_features: int):
        super().__init__()
        self.rows, self.columns = q.shape
        self.out_features, self.in_features = out_features, in_features
        self.qweight = kernels.pack_intweight(q.to(torch.int32).contiguous(), 4, 64)
        scales, zeros = folded(scale, zero)
        self.scales, self.zeros = scales.t().contiguous(), zeros.t().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.product(x).to(x.dtype)

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """The kernels' product as they leave it: float16, shaped as ``x`` but for its last dimension."""
        flat = x.reshape(-1, self.in_features)
        if self.columns != self.in_features:
            flat = nn.functional.pad(flat, (0, self.columns - self.in_features))
        out = awq_linear(flat.half(), self.qweight, self.scales, self.zeros, self.rows)
        return out[:, :self.out_features].reshape(*x.shape[:-1], self.out_features)


class Int4Decoder(FusedDecoder):
    """``FusedDecoder`` over ``Int4Linear`` projections, laid out so that ``FusedGreedy`` compiles its step per layer
    (one graph serves all of them) with the kernels a compile of the whole step makes. A layer's region ends at its
    down product, AWQ's kernel, opaque to inductor, and hands that product on as the kernel leaves it (float16); the
    next region casts it and adds it to the residual stream in the kernel that RMS-norms the sum, the fusion a whole
    compile makes across the boundary. The first layer is handed zeros; ``layers`` makes the last add."""

    compile_per_layer = True

    def layers(self, x, cos, sin, mask, cache_position, cache, layer=None) -> torch.Tensor:
        layer = self.layer if layer is None else layer  # `or` on a method is a branch dynamo 2.11 cannot trace
        down = self.projections[0].down  # zeros strided as its product (padded outputs sliced off): one graph
        pending = torch.zeros(x.shape[:-1].numel(), down.rows, dtype=torch.float16, device=x.device)
        pending = pending[:, :down.out_features].reshape(*x.shape[:-1], down.out_features)
        for norm_in, norm_post, proj, (keys, values) in zip(self.input_norms, self.post_norms, self.projections,
                                                            cache):
            x, pending = layer(x, pending, cos, sin, mask, cache_position, norm_in, norm_post, proj, keys, values)
        return x + pending.to(x.dtype)

    def layer(self, x, pending, cos, sin, mask, cache_position, norm_in, norm_post, proj, keys,
              values) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoder layer from the stream before the previous layer's down product and that product: (the stream
        after this layer's attention, this layer's down product)."""
        x = self.attention(x + pending.to(x.dtype), cos, sin, mask, cache_position, norm_in, proj, keys, values)
        gate, up = proj.gate_up(norm_post(x)).chunk(2, dim=-1)
        return x, proj.down.product(nn.functional.silu(gate) * up)


@torch.no_grad()
def quantize_linear(linear: nn.Linear, kernels: AwqKernels, check: bool = False) -> Int4Linear:
    """A 4-bit module computing ``linear`` (read only), groups of ``GROUP_SIZE`` inputs, padded as ``padded_shape``
    says with zeros; with ``check``, ``check_kernel`` runs on the result."""
    out_features, in_features = linear.weight.shape
    rows, columns = padded_shape(out_features, in_features)
    weight = nn.functional.pad(linear.weight, (0, columns - in_features, 0, rows - out_features))
    q, scale, zero = quantize(weight, GROUP_SIZE)  # an all-zero group: q = zero = 0
    module = Int4Linear(q, scale, zero, kernels, out_features, in_features)
    if check:  # the weight the kernels multiply by: q with the module's own float16 scales and folded zero points
        dequantized = (q * module.scales.t().float().repeat_interleave(GROUP_SIZE, 1)
                       + module.zeros.t().float().repeat_interleave(GROUP_SIZE, 1))
        check_kernel(module, dequantized[:out_features, :in_features], linear.weight.dtype)
    return module


@torch.no_grad()
def check_kernel(module: nn.Module, dequantized: torch.Tensor, dtype: torch.dtype,
                 rows: tuple[int, ...] = CHECK_ROWS) -> None:
    """``module`` computes ``x @ dequantized.T`` for ``rows``-row ``dtype`` inputs, within
    ``CHECK_MAX_RELATIVE_ERROR`` (float32 reference); RuntimeError naming the shape, the row count and the error
    otherwise (a NaN fails)."""
    out_features, in_features = dequantized.shape
    generator = torch.Generator(device=dequantized.device).manual_seed(0)
    for n in rows:
        x = torch.randn(n, in_features, device=dequantized.device, dtype=dtype, generator=generator)
        reference = x.float() @ dequantized.float().T
        error = ((module(x).float() - reference).norm() / reference.norm()).item()
        if not error <= CHECK_MAX_RELATIVE_ERROR:  # written so that NaN fails
            raise RuntimeError(f"merged-int4: the 4-bit kernel is wrong for a {out_features}x{in_features} projection "
                               f"at {n} rows (relative error {error:.3g} against the dequantized product, limit "
                               f"{CHECK_MAX_RELATIVE_ERROR:g}); not decoding with it")


def int4_projections(projections: nn.ModuleList, kernels: AwqKernels) -> nn.ModuleList:
    """4-bit copies of ``fuse_projections_``'s per-layer Linears, packed and multiplied by ``kernels``
    (harness/engines/awq_kernels.py's ``load``); the bf16 ones are only read."""
    out = nn.ModuleList()
    for i, layer in enumerate(projections):
        quantized = nn.Module()
        for name in PROJECTIONS:  # every layer has the same shapes: the first one's check covers the kernels
            setattr(quantized, name, quantize_linear(getattr(layer, name), kernels, check=i == 0))
        out.append(quantized)
    torch.cuda.empty_cache()
    return out


class Int4Merged(FusedGreedy):
    """The ``merged-int4`` engine: ``FusedGreedy`` over 4-bit copies of a merged model's projections (embeddings,
    norms and ``lm_head`` shared with the merged model), its CUDA graphs captured on the stream the kernels launch on.
    ``weights_gib`` is the 4-bit projections' resident size."""

    def __init__(self, merged_model, projections: nn.ModuleList, tokenizer, cfg, cache_dir: Path):
        if not torch.cuda.is_available() or merged_model.lm_head.weight.device.type != "cuda":
            raise RuntimeError("merged-int4 runs on CUDA only: AWQ's kernels are CUDA kernels")
        before = torch.cuda.memory_allocated()
        quantized = int4_projections(projections, load(cache_dir))
        self.weights_gib = (torch.cuda.memory_allocated() - before) / 2**30
        super().__init__(merged_model, Int4Decoder(merged_model, quantized), tokenizer, "merged-int4", cfg)
        padded = [f"{name} {m.out_features}x{m.in_features} as {m.rows}x{m.columns}" for name in PROJECTIONS
                  if ((m := getattr(quantized[0], name)).rows, m.columns) != (m.out_features, m.in_features)]
        self.note = (f"merged LoRA, decoder projections 4-bit (round-to-nearest, group {GROUP_SIZE}, AWQ's GEMV and "
                     f"GEMM kernels, float16 inside them"
                     + (f"; {', '.join(padded)}: their tiles take outputs in {OUT_ALIGN}s, inputs in {IN_ALIGN}s"
                        if padded else "")
                     + f"), lm_head/embeddings {cfg.merged_dtype}; {self.note}")

    def _side_stream(self) -> torch.cuda.Stream:
        return capture_stream()
