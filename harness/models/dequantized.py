"""The merged engine's starting weights: the NF4 base dequantized on its device, and what restores it in host memory.

``MergedBase`` starts every variant from dequantize(NF4 base) in ``inference.merged_dtype``. The 4-bit base comes from
its store (``harness.models.nf4_store``) and dequantizing it on the GPU takes a fraction of a second, so nothing of
the dequantized model is written to disk. (Until 2026-12-06 a 14.5 GB checkpoint of it was written once and read back
by every session and every restore: ~10 s of a cold run on an H100, docs/performance.md, issue 18's try 43.)

``load`` returns the model and its ``Pristine``: each 4-bit weight's packed data and quantization state, and every other
parameter, held in host memory. ``Pristine.restore`` writes dequantize(4-bit weight) and the other parameters back into
the model's own storage (the compiled decode graphs hold its addresses), with the call transformers' ``dequantize``
makes for each weight (``bitsandbytes.functional.dequantize_4bit``, then the merged dtype). ``load`` restores every
4-bit weight once into a scratch tensor and compares it with the model's, so a restore that would not give back the
built model bit for bit fails the build. A base loaded without quantization keeps a host copy of every parameter.

Only parameters are cast to the merged dtype: RoPE's ``inv_freq`` stays float32, as ``from_pretrained`` leaves it in
the NF4 reference and in a deployed merged model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config.schema import Profile
from ..measure.memory import free_memory
from .base import load_base

__all__ = ["Pristine", "load"]


@dataclass
class Pristine:
    """What ``restore`` writes back: by parameter name, a 4-bit weight's (packed data, quantization state) and any
    other parameter's values, all in host memory."""

    quantized: dict[str, tuple[torch.Tensor, Any]]
    plain: dict[str, torch.Tensor]

    @torch.inference_mode()
    def restore(self, model: torch.nn.Module) -> None:
        """Every parameter of ``model`` back to the built base's values, in place."""
        params = dict(model.named_parameters())
        for name, values in self.plain.items():
            params[name].data.copy_(values)
        for name, (packed, state) in self.quantized.items():
            params[name].data.copy_(self.dequantize(packed, state, params[name]))

    @staticmethod
    def dequantize(packed: torch.Tensor, state, like: torch.Tensor) -> torch.Tensor:
        """dequantize_4bit(packed, state) on ``like``'s device, in its dtype (transformers' ``dequantize``)."""
        from bitsandbytes.functional import dequantize_4bit

        state.to(like.device)
        try:
            return dequantize_4bit(packed.to(like.device), state).to(like.dtype)
        finally:
            state.to("cpu")


def load(profile: Profile, cache_root: Path) -> tuple[torch.nn.Module, Pristine]:
    """``profile``'s base dequantized to ``inference.merged_dtype`` on this process's device, in eval mode, and its
    ``Pristine`` (module doc). RuntimeError naming the weight if a restore would not give back the built one."""
    dtype = getattr(torch, profile.inference.merged_dtype)
    nf4 = load_base(profile.model, profile.quantization, cache_root)
    quantized = {f"{name}.weight": (m.weight.data, m.weight.quant_state) for name, m in nf4.named_modules()
                 if getattr(getattr(m, "weight", None), "quant_state", None) is not None}
    if getattr(nf4, "hf_quantizer", None) is None:  # quantization off: the base itself
        model = nf4
    else:
        try:
            model = nf4.dequantize(dtype=dtype)
        except TypeError:  # transformers releases before dequantize(dtype=...)
            model = nf4.dequantize()
    del nf4
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
    quantized = {name: (packed.cpu(), state) for name, (packed, state) in quantized.items()}
    for _, state in quantized.values():
        state.to("cpu")
    free_memory()  # the 4-bit modules' GPU memory: only the dequantized weights stay resident
    params = dict(model.named_parameters())
    plain = {n: p.detach().to("cpu", copy=True) for n, p in params.items() if n not in quantized}
    pristine = Pristine(quantized, plain)
    with torch.inference_mode():
        for name, (packed, state) in quantized.items():
            if not torch.equal(Pristine.dequantize(packed, state, params[name]), params[name]):
                raise RuntimeError(f"the merged base's restore of {name} would not give back the built weight: "
                                   f"bitsandbytes' dequantize_4bit differs from the model's dequantize here")
    model.eval()
    return model, pristine
