"""The 4-bit base quantized once and kept on disk: what every later NF4 load of the same base reads.

A session loads the NF4 base a dozen times on the 7B shape: three trainings, the merged base's build, a parity
reference per variant, the seed and ``nf4-compiled`` engines and their references. Each load read the bf16
checkpoint (14.5 GB) into the GPU and quantized it there; the copy alone was 2.6 s of a 4.9 s reference load on an
H200 (``results/h200/setup-tries/profile-reference-load.txt``). Quantizing is deterministic, so its product is kept
like an adapter: bitsandbytes' own serialization (the packed weights and each layer's quant state, ~3.9 GB
at the 7B shape) written once by ``save_pretrained`` into ``runs/_models/nf4-<key>/`` and loaded by
``from_pretrained``, which finds the quantization config in it.

The first load quantizes, writes the folder and then loads it back, as every later load does, so no session runs on
a model the store would not give it. A CPU self-test holds the stored model to one quantized afresh: every tensor of
the state dict (packed weights, absmax, quant maps, nested constants), every buffer with its dtype, and the logits.

The key: the base (``revision.base_identity``), the quantization config, the device type, torch, transformers and
bitsandbytes, and the code (``KEY_SOURCES``); kept as ``harness.models.keyed_folder`` says.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import torch

from ..config.profiles import config_hash
from ..config.schema import ModelConfig, QuantConfig
from ..report.atomic import file_lock
from ..report.phases import note
from ..report.provenance import library_versions, source_digest
from .keyed_folder import store
from .revision import base_identity

__all__ = ["KEY_SOURCES", "key_parts", "folder", "load"]

_MODELS = Path(__file__).resolve().parent
KEY_SOURCES = (_MODELS / "base.py", _MODELS / "pretrained.py", _MODELS / "host_copy.py", Path(__file__).resolve())
_LIBRARIES = ("torch", "transformers", "bitsandbytes")


def key_parts(model_cfg: ModelConfig, q: QuantConfig, device_type: str) -> dict[str, Any]:
    """Everything that changes the quantized weights of this base (module doc)."""
    versions = library_versions()
    return {"base": base_identity(model_cfg), "quantization": dataclasses.asdict(q), "device_type": device_type,
            "versions": {k: versions.get(k) for k in _LIBRARIES},
            "code": source_digest(KEY_SOURCES, "harness.models.nf4_store.KEY_SOURCES")}


def folder(cache_root: Path, key: str) -> Path:
    return Path(cache_root) / f"nf4-{key[:12]}"


def load(model_cfg: ModelConfig, q: QuantConfig, cache_root: Path, device_type: str,
         quantize: Callable[[], torch.nn.Module], from_disk: Callable[[Path], torch.nn.Module]) -> torch.nn.Module:
    """The base from its stored folder (``from_disk``), written first from ``quantize()`` when none of this key is
    there."""
    parts = key_parts(model_cfg, q, device_type)
    key = config_hash(parts)
    final = folder(cache_root, key)
    with file_lock(final):
        if store(final, key, parts, ("base", "quantization", "device_type"), quantize):
            note("nf4-base", f"quantized and kept as {final.name}")
        return from_disk(final)  # also after writing it: as every later session loads it
