"""The NF4 reference: the seed's inference path that every faster engine is checked against.

``load_nf4_with_adapter`` builds the reference the merged model is checked against: a fresh NF4 base with the
adapter on top, unmerged (the seed's inference path), computing in the profile's ``quantization.compute_dtype``.
On CPUs with AVX512-BF16, bitsandbytes' inference path would otherwise repack the 4-bit weights at the first
eval-mode forward and run a fused kernel that casts activations and block scales to bfloat16 whatever the compute
dtype (bitsandbytes/backends/cpu/ops.py, ``gemv_4bit``: "cpu fused op only support bf16 for now"): on the tiny
profile (float32) that alone moves the base model's logits by ~5e-3, five times ``parity_max_logit_diff``.
"""

from __future__ import annotations

from pathlib import Path

from ..config.schema import Profile

__all__ = ["load_nf4_with_adapter", "disable_cpu_bf16_4bit_kernel"]


def disable_cpu_bf16_4bit_kernel(model) -> int:
    """Make every bitsandbytes 4-bit layer of ``model`` compute in its ``compute_dtype`` on the CPU: turn off the
    AVX512-BF16 fused inference kernel (which computes in bfloat16). Returns the number of layers changed. Call it
    before the first forward: a layer already repacked for that kernel raises RuntimeError. No effect on CUDA."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return 0
    changed = 0
    for name, module in model.named_modules():
        if not isinstance(module, Linear4bit):
            continue
        if getattr(getattr(module.weight, "quant_state", None), "packing_format_for_cpu", False):
            raise RuntimeError(f"{name}: 4-bit weight already repacked for bitsandbytes' bf16 CPU kernel; call "
                               "disable_cpu_bf16_4bit_kernel before the model's first forward")
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def load_nf4_with_adapter(profile: Profile, adapter_dir: Path | None, cache_root: Path):
    """A fresh NF4 base (``harness.models.load_base``) with the PEFT adapter in ``adapter_dir`` on top, unmerged,
    in eval mode; the base alone when ``adapter_dir`` is None. Shares no tensors with any other model.

    Unless the compute dtype is bfloat16, bitsandbytes' bf16 CPU kernel is turned off
    (``disable_cpu_bf16_4bit_kernel``), so the model computes in ``quantization.compute_dtype`` as configured."""
    from peft import PeftModel

    from .base import load_base

    base = load_base(profile.model, profile.quantization, cache_root)
    if profile.quantization.compute_dtype != "bfloat16":
        disable_cpu_bf16_4bit_kernel(base)
    if adapter_dir is None:
        return base
    model = PeftModel.from_pretrained(base, str(adapter_dir), low_cpu_mem_usage=True)  # no init of weights it loads
    model.eval()
    return model
