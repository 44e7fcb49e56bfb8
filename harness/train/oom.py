"""Out of memory: turn a failed CUDA allocation into one message a user can act on, and free the memory.

A failed allocation is ``torch.cuda.OutOfMemoryError`` when torch's allocator makes it, and a plain ``RuntimeError``
when a CUDA library does: on an H200 filled to 4 MiB, r16's backward failed in cuBLAS creating its handle
("CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`", results/h200/smollm2-135m-bf16/c8dd8a0/).
``is_out_of_memory`` knows both.

``call_with_oom_guard(profile, "r16", "train", fn, ...)`` raises ``VariantOutOfMemory`` naming the variant, the
phase, the profile's VRAM ceiling for it and the memory in use when the allocation failed. The original exception (whose
traceback holds the frames, and so the tensors, of the failed call) is dropped before the CUDA cache is emptied,
so the next variant starts from a clean device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

from ..config.schema import Profile
from ..measure.memory import free_memory, memory_now

__all__ = ["PHASES", "VariantOutOfMemory", "is_out_of_memory", "describe_oom", "call_with_oom_guard"]

T = TypeVar("T")

# the phases, named as the vram_ceilings_gib sections that bound them
PHASES = ("train", "inference")
# how CUDA libraries word a failed allocation in the RuntimeError they raise (cuBLAS, cuDNN, cuSOLVER, cuFFT, and a
# raw CUDA call)
LIBRARY_OUT_OF_MEMORY = ("CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED", "CUSOLVER_STATUS_ALLOC_FAILED",
                         "CUFFT_ALLOC_FAILED", "CUDA error: out of memory")


class VariantOutOfMemory(RuntimeError):
    """A variant ran out of accelerator memory; the message names variant, phase, ceiling and memory."""

    def __init__(self, message: str, variant: str, phase: str):
        super().__init__(message)
        self.variant, self.phase = variant, phase


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is a failed CUDA allocation: torch's ``OutOfMemoryError``, or a CUDA library's
    ``RuntimeError`` saying so (``LIBRARY_OUT_OF_MEMORY``). A ``VariantOutOfMemory`` is one already described."""
    if isinstance(error, VariantOutOfMemory) or not isinstance(error, RuntimeError):
        return False
    return isinstance(error, torch.cuda.OutOfMemoryError) or any(m in str(error) for m in LIBRARY_OUT_OF_MEMORY)


def describe_oom(profile: Profile, variant: str, phase: str, memory: dict[str, float], error: str = "") -> str:
    """The message for an OOM of ``variant`` during ``phase`` ('train' or 'inference')."""
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; use one of {PHASES}")
    from ..measure.gates import vram_ceiling
    from ..report.provenance import device_name

    section = phase
    ceiling = vram_ceiling(profile, section, variant, device_name())
    ceiling_text = (f"configured ceiling vram_ceilings_gib.{section}.{variant} = {ceiling} GiB" if ceiling is not None
                    else f"no ceiling configured for this device (vram_ceilings_gib.{section}.{variant})")
    if "allocated_gib" in memory:
        at = (f"{memory['allocated_gib']:.2f} GiB allocated, {memory['reserved_gib']:.2f} GiB reserved, peak "
              f"{memory['peak_allocated_gib']:.2f} GiB of {memory['total_gib']:.1f} GiB on the device")
    else:
        at = f"no CUDA memory in use (CPU; process peak RSS {memory['peak_rss_gib']:.2f} GiB)"
    first_line = error.strip().splitlines()[0] if error.strip() else "torch.cuda.OutOfMemoryError"
    fix = ("lower training.batch_size or training.max_length, or turn on training.gradient_checkpointing"
           if phase == "train" else "lower eval.batch_size or eval.max_new_tokens")
    return (f"{variant}: out of memory during {phase} ({first_line}); memory at failure: {at}; {ceiling_text} in "
            f"{profile.source_file}. The other variants still run. Fix: {fix}, or use a GPU with more memory.")


def call_with_oom_guard(profile: Profile, variant: str, phase: str, fn: Callable[..., T], *args, **kwargs) -> T:
    """``fn(*args, **kwargs)``; a failed CUDA allocation inside it (``is_out_of_memory``) becomes
    ``VariantOutOfMemory``, raised after freeing memory.

    A function, not a ``with`` block: a context manager's ``__exit__`` holds the OOM, and through its traceback every
    tensor of the failed call, until it returns, so nothing could be freed inside it.
    """
    try:
        return fn(*args, **kwargs)
    except RuntimeError as e:
        if not is_out_of_memory(e):
            raise
        message = describe_oom(profile, variant, phase, memory_now(), str(e))
    del fn, args, kwargs  # the model may be an argument: the raised error's traceback must not keep it alive
    free_memory()  # the OOM and the frames of the failed call are gone by now
    raise VariantOutOfMemory(message, variant, phase) from None
