"""Peak CUDA memory per variant against the profile's ceilings, for training and inference separately."""

from __future__ import annotations

import pytest
import torch

from harness.report.provenance import device_name
from harness.measure.gates import vram_ceiling

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: VRAM ceilings need a GPU "
                                                              "(CPU peak RSS is still recorded in results.json)"),
]


def _ceiling(profile, phase: str, variant: str) -> float:
    ceiling = vram_ceiling(profile, phase, variant, device_name())
    if ceiling is None:
        pytest.skip(f"{profile.source_file}: no vram_ceilings_gib.{phase}.{variant} for {device_name()!r}; add one "
                    f"to gate it")
    return ceiling


def test_train_vram_within_ceiling(sweep, loaded, evaluation, variant_name):
    if loaded.variant.is_baseline:
        pytest.skip("baseline trains nothing")
    _ceiling(sweep.profile, "train", variant_name)
    failures = sweep.recorder.get(variant_name, "training")["vram_failures"]
    assert not failures, "\n".join(failures)


def test_inference_vram_within_ceiling(sweep, evaluation, variant_name):
    _ceiling(sweep.profile, "inference", variant_name)
    assert "peak_allocated_gib" in evaluation.peak_memory
    assert not evaluation.vram_failures, "\n".join(evaluation.vram_failures)


def test_real_cuda_oom_names_variant_phase_ceiling_and_memory_and_frees_it(tmp_path):
    """For real: all but 4 MiB of the GPU is taken by ballast tensors, so r16's training (a tiny model on CUDA)
    hits a true cudaMalloc failure. The error names variant, phase, ceiling and memory; the memory comes back;
    r8 then trains. (``set_per_process_memory_fraction`` did not cap training on the H100: the test passed the cap.)"""
    from fixtures.user_runs import quick_profile
    from harness.models.base import resolve_source
    from harness.sweep import Sweep
    from harness.train.oom import LIBRARY_OUT_OF_MEMORY, VariantOutOfMemory

    sweep = Sweep.prepare(quick_profile(tmp_path / "p", {"vram_ceilings_gib": {"train": {"r16": 0.01}}}),
                          runs_dir=tmp_path / "runs", card=tmp_path / "MODEL_CARD.md")
    sweep.own_phase_log()  # its checkpoint's phase line goes to its own log, not the session's profile's
    sweep.tokenizer, resolve_source(sweep.profile.model, sweep.runs_dir / "_models")  # before the ballast
    (torch.ones(256, 256, device="cuda") @ torch.ones(256, 256, device="cuda")).sum().item()  # cuBLAS handle
    torch.cuda.empty_cache()
    allocated_before = torch.cuda.memory_allocated()
    ballast, leave = [], 4 * 2**20
    while (free := torch.cuda.mem_get_info()[0]) > leave + 2**20:
        ballast.append(torch.empty(min(free - leave, 2**30), dtype=torch.uint8, device="cuda"))
    try:  # the cap must be real: 32 MiB more cannot be had, or no OOM can be forced and the test says so
        torch.empty(32 * 2**20, dtype=torch.uint8, device="cuda")
    except torch.cuda.OutOfMemoryError:
        pass
    else:
        del ballast
        torch.cuda.empty_cache()
        pytest.skip("this device let the process allocate past what cudaMemGetInfo reports free (seen on the H100 "
                    "VMs here, also with set_per_process_memory_fraction): a real OOM cannot be forced; the injected "
                    "OOM tests (suites/selftest/test_reliability.py, test_plugin.py) cover the message and cleanup")
    try:
        with pytest.raises(VariantOutOfMemory) as info:
            sweep.train("r16")
    finally:
        del ballast
        torch.cuda.empty_cache()
    message = str(info.value)
    cause = message.removeprefix("r16: out of memory during train (").split("); memory at failure")[0]
    # torch's allocator, or a CUDA library's own allocation (H200 runs: cuBLAS in r16's backward, then cublasCreate)
    assert cause != message and any(m in cause for m in ("CUDA out of memory", *LIBRARY_OUT_OF_MEMORY)), message
    assert "vram_ceilings_gib.train.r16 = 0.01 GiB" in message and "GiB allocated" in message, message
    assert torch.cuda.memory_allocated() <= allocated_before + 2**20, "the failed variant's memory was not freed"
    path, manifest = sweep.train("r8")
    assert manifest["complete"] and (path / "adapter").is_dir()
