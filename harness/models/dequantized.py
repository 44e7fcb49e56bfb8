"""The NF4 base dequantized once and kept on disk: the merged engine's starting weights.

``MergedBase`` starts every variant from dequantize(NF4 base) in ``inference.merged_dtype``. That product is
deterministic, so it is an artifact like an adapter: written once (atomically, under a lock) as a plain checkpoint
in ``runs/_models/dequantized-<key>/`` and loaded by later sessions instead of loading, quantizing and dequantizing
the base again. Its tensors also serve ``MergedBase``'s restores between variants, read through a memory map, so
no second copy of the weights is held in host memory (copying the 7B's 14.5 GB from the GPU into host memory took
most of the base's 11.5-17.9 s build on an H200: ``docs/performance.md``, issue 18).

The key hashes what the weights depend on: the base (``revision.base_identity``), the quantization config, the
dtype, the device type, the libraries that load, quantize and dequantize (torch, transformers, bitsandbytes) and the
code that does it (``KEY_SOURCES``), kept as ``harness.models.keyed_folder`` says: a folder whose ``key.json`` does
not name this key is never loaded, and writing a key removes the folders of other keys for the same base,
quantization and dtype.
"""

from __future__ import annotations

import dataclasses
import gc
from pathlib import Path
from typing import Any

import torch

from ..config.profiles import config_hash
from ..config.schema import Profile
from ..report.atomic import file_lock
from ..report.phases import note
from ..report.provenance import library_versions, source_digest
from .base import device, load_base
from .keyed_folder import store
from .revision import base_identity

__all__ = ["KEY_SOURCES", "key_parts", "folder", "load"]

_MODELS = Path(__file__).resolve().parent
KEY_SOURCES = (_MODELS / "base.py", _MODELS / "pretrained.py", _MODELS / "host_copy.py", _MODELS / "nf4_store.py",
               Path(__file__).resolve())
_LIBRARIES = ("torch", "transformers", "bitsandbytes")


def key_parts(profile: Profile) -> dict[str, Any]:
    """Everything that changes the dequantized weights of ``profile``'s base (module doc)."""
    versions = library_versions()
    return {"base": base_identity(profile.model), "quantization": dataclasses.asdict(profile.quantization),
            "dtype": profile.inference.merged_dtype, "device_type": device().type,
            "versions": {k: versions.get(k) for k in _LIBRARIES},
            "code": source_digest(KEY_SOURCES, "harness.models.dequantized.KEY_SOURCES")}


def folder(cache_root: Path, key: str) -> Path:
    return Path(cache_root) / f"dequantized-{key[:12]}"


def load(profile: Profile, cache_root: Path) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """``profile``'s base dequantized to ``inference.merged_dtype`` on this process's device, in eval mode, and its
    weights as stored (CPU tensors over a memory map of the checkpoint), by parameter name. Built and written first
    when no folder of this key is there; the model always comes from the stored checkpoint, as a deployed merged model
    would: ``from_pretrained`` keeps RoPE's ``inv_freq`` in float32 (as the NF4 reference has it), where casting the
    dequantized model to bfloat16 rounds it (the merged engine's RoPE until 2026-12-04)."""
    parts = key_parts(profile)
    key = config_hash(parts)
    final = folder(cache_root, key)
    with file_lock(final):
        built = store(final, key, parts, ("base", "quantization", "dtype", "device_type"),
                      lambda: _dequantize(profile, cache_root))
        note("dequantized-base", f"{'built and kept as' if built else 'loaded'} {final.name}")
        model = _from_disk(profile, final)  # also when built: a built base and a loaded one are the same (buffers)
    model.eval()
    return model, _mapped(final, model)


def _dequantize(profile: Profile, cache_root: Path) -> torch.nn.Module:
    dtype = getattr(torch, profile.inference.merged_dtype)
    nf4 = load_base(profile.model, profile.quantization, cache_root)
    if getattr(nf4, "hf_quantizer", None) is None:  # quantization off: the base itself, in the merged dtype
        model = nf4
    else:
        try:
            model = nf4.dequantize(dtype=dtype)
        except TypeError:  # transformers releases before dequantize(dtype=...)
            model = nf4.dequantize()
        # A base read from the stored 4-bit folder keeps the loader's record of the deserialization it ran, and
        # save_pretrained would try to reverse it (NotImplementedError under transformers 5.17). Dequantizing drops
        # that record from 5.24 on (HfQuantizer.remove_quantization_config); do the same here.
        model.__dict__.pop("_weight_conversions", None)
    del nf4
    gc.collect()  # the replaced 4-bit modules are cyclic garbage: keep only the dequantized weights resident
    return model.to(dtype)


def _from_disk(profile: Profile, path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        path, dtype=getattr(torch, profile.inference.merged_dtype), device_map={"": device()},
        attn_implementation=profile.model.attn_implementation)


def _mapped(path: Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors by name (safetensors maps the file: a tensor is read when it is copied), which must
    be exactly ``model``'s parameters, shape and dtype included."""
    from safetensors import safe_open

    stored: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            stored.update({name: f.get_tensor(name) for name in f.keys()})
    params = {name: (p.shape, p.dtype) for name, p in model.named_parameters()}
    wrong = sorted(set(stored) ^ set(params)) + sorted(
        n for n in set(stored) & set(params) if (stored[n].shape, stored[n].dtype) != params[n])
    if wrong:
        raise RuntimeError(f"{path}: the stored dequantized base does not match the model's parameters "
                           f"({', '.join(wrong[:5])}{' ...' if len(wrong) > 5 else ''}); delete the folder to "
                           f"rebuild it")
    return stored
