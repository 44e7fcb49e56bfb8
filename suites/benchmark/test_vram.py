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


def test_train_vram_within_ceiling(sweep, loaded, variant_name):
    if loaded.variant.is_baseline:
        pytest.skip("baseline trains nothing")
    _ceiling(sweep.profile, "train", variant_name)
    failures = sweep.recorder.get(variant_name, "training")["vram_failures"]
    assert not failures, "\n".join(failures)


def test_inference_vram_within_ceiling(sweep, evaluation, variant_name):
    _ceiling(sweep.profile, "inference", variant_name)
    assert "peak_allocated_gib" in evaluation.peak_memory
    assert not evaluation.vram_failures, "\n".join(evaluation.vram_failures)
