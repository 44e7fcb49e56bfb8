"""Peak CUDA memory per variant against the profile's ceilings, for training and inference separately."""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: VRAM ceilings need a GPU "
                                                              "(CPU peak RSS is still recorded in results.json)"),
]


def _ceiling(profile, phase: str, variant: str) -> float:
    ceilings = profile.vram_ceilings_gib.get(phase, {})
    if variant not in ceilings:
        pytest.skip(f"{profile.source_file}: no vram_ceilings_gib.{phase}.{variant}; add one to gate it")
    return float(ceilings[variant])


def test_train_vram_within_ceiling(variant_name, profile, loaded_variant):
    if loaded_variant.variant.is_baseline:
        pytest.skip("baseline trains nothing")
    ceiling = _ceiling(profile, "train", variant_name)
    peak = loaded_variant.manifest["train_memory"]["peak_allocated_gib"]
    assert peak <= ceiling, (f"{variant_name} training peaked at {peak:.2f} GiB allocated, over the "
                             f"{ceiling} GiB ceiling in {profile.source_file}")


def test_inference_vram_within_ceiling(variant_name, profile, scored, recorder):
    ceiling = _ceiling(profile, "inference", variant_name)
    peak = recorder.get(variant_name, "memory")["inference_peak_allocated_gib"]
    assert peak <= ceiling, (f"{variant_name} inference peaked at {peak:.2f} GiB allocated, over the "
                             f"{ceiling} GiB ceiling in {profile.source_file}")
