"""``merged-int8``: the merged model with int8 weight-only decoder projections, for users who trade exactness for speed.

The quantization is torchao's ``Int8WeightOnlyConfig``: each weight row (output channel) stored as int8 with one
symmetric float32 scale, and its linear ``mm(x, w_int8.to(x.dtype)) * scale``, gpt-fast's ``WeightOnlyInt8Linear``
(torchao's ``Int8Tensor``). A decode step of one token is bound by reading the weights, so halving their bytes is the
speed-up; it only materialises on CUDA, where the decode step is compiled and inductor fuses the int8 -> bf16 convert
into the matrix-vector product. That fusion needs ``coordinate_descent_tuning`` (inductor turns a 1-row mm into a
fused multiply + reduction only with it: ``torch/_inductor/decomposition.py``, ``mm``), which ``Int8Merged`` passes to
its own compiled step alone (``INDUCTOR_OPTIONS``); torchao's own setter of global inductor options is off
(``set_inductor_config=False``), so the other engines' graphs and numerics are unchanged. On the CPU nothing is
compiled and the eager int8 path is slower than fp32, so the CPU profiles do not time it.

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
from collections.abc import Iterator

import torch
from torch import nn

from ..config.schema import InferenceConfig
from .decoding import StaticGreedy

__all__ = ["quantize_int8_", "int8_copy", "leaf_tensors", "resident_gib", "Int8Merged", "INDUCTOR_OPTIONS"]

INDUCTOR_OPTIONS = {"coordinate_descent_tuning": True}  # fuses the int8 -> bf16 convert into 1-row matmuls (CUDA)


def _quantized(name: str, module: nn.Module, skip: tuple[str, ...]) -> bool:
    return isinstance(module, nn.Linear) and not set(name.split(".")) & set(skip)


def quantize_int8_(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> int:
    """torchao's int8 weight-only quantization, in place, of every ``nn.Linear`` of ``model`` except those whose
    dotted name has a component in ``skip``; return how many were quantized. On a Mistral model with the default
    ``skip`` that is the 7 projections of every decoder layer; ``lm_head`` and the embeddings stay in the compute
    dtype (see the module docstring). The quantized Linears' former weights are only read."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    targets = sum(_quantized(name, m, skip) for name, m in model.named_modules())
    quantize_(model, Int8WeightOnlyConfig(set_inductor_config=False),
              filter_fn=lambda module, name: _quantized(name, module, skip))
    return targets


@torch.no_grad()
def int8_copy(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> tuple[nn.Module, int]:
    """A separate copy of ``model`` (same device) with its decoder projections in int8; ``model`` is untouched.

    The copy is a deepcopy whose Linears to be quantized share ``model``'s weight Parameters (the memo), so no bf16
    copy of them is ever made; ``quantize_int8_`` then gives those Linears new int8 weights, and the copy holds no
    tensor of ``model`` (its embeddings, norms and ``lm_head`` are its own). Returns (copy, number of layers
    quantized)."""
    shared = {id(p): p for name, m in model.named_modules() if _quantized(name, m, skip) for p in m.parameters()}
    clone = copy.deepcopy(model, memo=dict(shared))
    replaced = quantize_int8_(clone, skip)
    left = {id(t) for t in (*clone.parameters(), *clone.buffers())} & set(shared)
    if left:  # a Linear that the skip rule spared in the copy but not in ``shared``: cannot happen, but never share
        raise RuntimeError(f"int8_copy: {len(left)} tensors still shared with the source model")
    gc.collect()
    return clone.eval(), replaced


def leaf_tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    """Every plain tensor holding ``model``'s parameters and buffers: a torchao tensor subclass (an int8 weight)
    stands for its inner tensors (int8 values, scales)."""

    def leaves(t: torch.Tensor) -> Iterator[torch.Tensor]:
        if hasattr(t, "__tensor_flatten__"):
            for name in t.__tensor_flatten__()[0]:
                yield from leaves(getattr(t, name))
        else:
            yield t

    for t in (*model.parameters(), *model.buffers()):
        yield from leaves(t.data if isinstance(t, nn.Parameter) else t)


def resident_gib(model: nn.Module) -> float:
    """Bytes of ``model``'s parameters and buffers (each storage counted once), in GiB."""
    seen = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in leaf_tensors(model)}
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
        self.note = (f"merged LoRA, {self.quantized_layers} decoder projections int8 weight-only (torchao "
                     f"Int8WeightOnlyConfig, per-channel scales), lm_head/embeddings {cfg.merged_dtype}; {self.note}")
