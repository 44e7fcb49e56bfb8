"""``merged-int8``: the merged model with int8 weight-only decoder projections, for users who trade exactness for speed.

The idea is gpt-fast's ``WeightOnlyInt8Linear``: each weight row (output channel) is stored as int8 with one
symmetric scale in the compute dtype, and ``forward`` is ``F.linear(x, weight.to(x.dtype)) * scales``. A decode step
of one token is bound by reading the weights, so halving their bytes is the speed-up; it only materialises on CUDA,
where the decode step is compiled and inductor fuses the int8 -> bf16 convert into the matrix-vector product. That
fusion needs ``coordinate_descent_tuning`` (inductor turns a 1-row mm into a fused multiply + reduction only with it:
``torch/_inductor/decomposition.py``, ``mm``), which ``Int8Merged`` passes to its own compiled step alone
(``INDUCTOR_OPTIONS``), so the other engines' graphs and numerics are unchanged. Without it the convert is a separate
kernel that writes a bf16 copy of every weight each token: slower than plain bf16. On the CPU nothing is compiled
and the eager int8 path is slower than fp32, so the CPU profiles do not time it.

What is quantized: the 7 projections of every decoder layer (q/k/v/o/gate/up/down: ~97% of Mistral-7B's bytes read
per token). What is not: ``embed_tokens`` (a gather of one row per token: nothing to save), ``lm_head`` (~2% of the
bytes, and its error would land directly on the logits whose top-2 gaps decide each greedy token) and the norms.

``Int8Merged`` quantizes a separate copy of a merged model (a variant already merged into ``MergedBase``): the copy
shares the base's projection weights only while they are read to quantize, so the base's parameters never move or
change (``MergedBase.check_storage`` holds) and the extra memory is the int8 model, not a second bf16 one.
"""

from __future__ import annotations

import copy
import gc

import torch
import torch.nn.functional as F
from torch import nn

from ..config.schema import InferenceConfig
from .decoding import StaticGreedy

__all__ = ["Int8WeightOnlyLinear", "quantize_int8_", "int8_copy", "resident_gib", "Int8Merged", "INDUCTOR_OPTIONS"]

INDUCTOR_OPTIONS = {"coordinate_descent_tuning": True}  # fuses the int8 -> bf16 convert into 1-row matmuls (CUDA)
INT8_MAX = 127  # symmetric range [-127, 127]: -128 is never used, so the grid is symmetric around zero


class Int8WeightOnlyLinear(nn.Module):
    """A Linear whose weight is int8 per output channel: ``F.linear(x, weight.to(x.dtype)) * scales (+ bias)``.

    ``weight`` (int8, [out, in]) and ``scales`` ([out], the compute dtype) are buffers, never Parameters: peft's
    merge code and optimizers look for Parameters and leave these alone, and dynamo marks module buffers as static
    addresses for CUDA graphs like Parameters. The forward has no data-dependent branch and keeps every shape.
    """

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        if weight.dtype != torch.int8 or weight.dim() != 2 or scales.shape != weight.shape[:1]:
            raise ValueError(f"expected int8 [out, in] weight and [out] scales, got {weight.dtype} "
                             f"{tuple(weight.shape)} and {tuple(scales.shape)}")
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", bias)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> Int8WeightOnlyLinear:
        """Quantize ``linear`` (read only): scale = max|row| / 127, rounded to the weight's dtype first, and the
        int8 values chosen for that stored scale. ``linear`` keeps its own tensors."""
        w = linear.weight.detach()
        w32 = w.float()
        scales = (w32.abs().amax(dim=1) / INT8_MAX).clamp(min=torch.finfo(torch.float32).eps).to(w.dtype)
        q = (w32 / scales.float()[:, None]).round_().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(q, scales, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight.to(x.dtype)) * self.scales
        if self.bias is not None:  # fixed per module: dynamo specialises on it, no runtime branch
            out = out + self.bias
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def quantize_int8_(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> int:
    """Replace, in place, every ``nn.Linear`` of ``model`` by an ``Int8WeightOnlyLinear``, except those whose
    dotted name has a component in ``skip``; return how many were replaced. On a Mistral model with the default
    ``skip`` that is the 7 projections of every decoder layer; ``lm_head`` and the embeddings stay in the compute
    dtype (see the module docstring). The replaced Linears' tensors are only read."""
    targets = [name for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and not set(name.split(".")) & set(skip)]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8WeightOnlyLinear.from_linear(getattr(parent, child)))
    return len(targets)


@torch.no_grad()
def int8_copy(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> tuple[nn.Module, int]:
    """A separate copy of ``model`` (same device) with its decoder projections in int8; ``model`` is untouched.

    The copy is a deepcopy whose Linears to be quantized share ``model``'s weight Parameters (the memo), so no bf16
    copy of them is ever made; ``quantize_int8_`` then swaps those Linears out, and the copy holds no tensor of
    ``model`` (its embeddings, norms and ``lm_head`` are its own). Returns (copy, number of layers quantized)."""
    shared = {id(p): p for name, m in model.named_modules()
              if isinstance(m, nn.Linear) and not set(name.split(".")) & set(skip) for p in m.parameters()}
    clone = copy.deepcopy(model, memo=dict(shared))
    replaced = quantize_int8_(clone, skip)
    left = {id(t) for t in (*clone.parameters(), *clone.buffers())} & set(shared)
    if left:  # a Linear that the skip rule spared in the copy but not in ``shared``: cannot happen, but never share
        raise RuntimeError(f"int8_copy: {len(left)} tensors still shared with the source model")
    gc.collect()
    return clone.eval(), replaced


def resident_gib(model: nn.Module) -> float:
    """Bytes of ``model``'s parameters and buffers (each storage counted once), in GiB."""
    seen: dict[int, int] = {}
    for t in (*model.parameters(), *model.buffers()):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values()) / 2**30


class Int8Merged(StaticGreedy):
    """The ``merged-int8`` engine: ``StaticGreedy`` over ``int8_copy(merged_model)``, its decode step compiled with
    ``INDUCTOR_OPTIONS`` on top of ``inference.compile_mode`` (fullgraph, like ``merged``).

    ``merged_model`` is a ``MergedBase`` model with the variant already merged: the copy is a snapshot of that
    variant, and later merges into the base do not reach it. ``weights_gib`` is the int8 model's resident size.
    """

    def __init__(self, merged_model: nn.Module, tokenizer, cfg: InferenceConfig, compile_on_cpu: bool = False):
        model, self.quantized_layers = int8_copy(merged_model)
        super().__init__(model, tokenizer, "merged-int8", cfg, compile_on_cpu=compile_on_cpu,
                         inductor_options=INDUCTOR_OPTIONS)
        self.weights_gib = resident_gib(model)
        self.note = (f"merged LoRA, {self.quantized_layers} decoder projections int8 weight-only (per-channel "
                     f"scales), lm_head/embeddings {cfg.merged_dtype}; {self.note}")
