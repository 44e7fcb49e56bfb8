"""The merged engine's one-row products on CUDA: bf16 GEMVs with the step's small computations folded in
(harness/engines/gemv.cu), built on this machine and loaded as ``torch.ops.qlora_gemv``.

At batch 1 a decode step of Mistral-7B reads 14.5 GB of weights; cuBLAS streams the large products near the copy
bandwidth but splits o and down along their inputs (a second kernel adds the parts), and the RMSNorms, SiLU(gate) *
up and the residual adds are kernels of their own: 441 launches a token (``results/h200/decode-tries/``, try 21).
``GemvDecoder`` computes a layer's four products, and ``lm_head``, with one kernel each: its prologue does the
RMSNorm (q/k/v, gate/up, ``lm_head``), its epilogue adds the residual (o, down) or multiplies SiLU(gate) * up
(gate/up), with the rounding of the model's eager bf16 forward (gemv.cu). Batches, prompts and the CPU go through
``FusedDecoder``'s own products. The kernels are launched with programmatic dependent launch: each starts reading its
weights while the kernel before it ends.

``build`` compiles gemv.cu with torch's JIT loader (harness/engines/kernel_build.py; about 30 s on 16 cores, once per
machine, started beside the training) into ``<cache>/gemv-<key>/``, built in a temp dir and renamed into place under
a lock; the key hashes gemv.cu, this module, torch's and CUDA's versions, nvcc's, the GPU's compute capability and
the flags. ``GemvDecoder`` checks every product against ``FusedDecoder``'s when it is built and refuses a wrong or
non-finite one.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .fused import FusedDecoder
from .kernel_build import compile_library, keyed_folder, library_key, nvcc

__all__ = ["build_key", "build", "load", "gemv", "GemvDecoder"]

NAMESPACE = "qlora_gemv"  # gemv.cu's TORCH_LIBRARY
SOURCE = Path(__file__).with_suffix(".cu")
BUILDER = Path(__file__)  # this module: part of the key
CUDA_FLAGS = ("-O3", "-std=c++17")
CHECK_MAX_RELATIVE_ERROR = 1e-2  # each kernel against FusedDecoder's product; they differ in summation order only


def build_key(nvcc_version: str, capability: tuple[int, int]) -> str:
    """sha256 of everything that changes the library (module doc)."""
    return library_key([SOURCE.read_bytes(), BUILDER.read_bytes()], nvcc_version, capability, CUDA_FLAGS)


def build(cache_dir: Path) -> Path:
    """The folder of the library of this machine's key in ``cache_dir``, built there first if missing (module doc;
    harness/engines/kernel_build.py). Another process or thread building the same key is waited for."""
    _, nvcc_version = nvcc("the merged engine")
    capability = torch.cuda.get_device_capability()

    def fill(tmp: Path) -> dict:
        compile_library(NAMESPACE, [SOURCE], tmp, capability, cuda_flags=CUDA_FLAGS)
        return {"torch": torch.__version__, "cuda": torch.version.cuda, "nvcc": nvcc_version.splitlines()[-1],
                "capability": list(capability)}

    return keyed_folder(cache_dir, "gemv", build_key(nvcc_version, capability), f"{NAMESPACE}.so", fill)


_loaded: list[str] = []  # the folder this process loaded the library from


def load(cache_dir: Path) -> None:
    """The library, built into ``cache_dir`` once per key (``build``) and loaded once per process."""
    folder = str(build(cache_dir))
    if folder not in _loaded:
        if _loaded:
            raise RuntimeError("GEMV kernels of another key are already loaded in this process; start a new one")
        torch.ops.load_library(str(Path(folder) / f"{NAMESPACE}.so"))
        _loaded.append(folder)


@torch.library.custom_op("qlora::gemv", mutates_args=())
def gemv(x: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor | None, eps: float,
         residual: torch.Tensor | None, silu_pairs: bool, pdl: bool) -> torch.Tensor:
    """One row of ``x`` times ``weight`` (n, k), bf16: (1, n). With ``norm_weight``, ``x`` is RMS-normed first (with
    ``eps``); with ``residual`` (n values), it is added to the product; with ``silu_pairs``, the result is SiLU(gate)
    * up of the product's two halves, (1, n / 2). One opaque op for torch.compile."""
    return getattr(torch.ops, NAMESPACE).gemv(x, weight, norm_weight, eps, residual, silu_pairs, pdl)


@gemv.register_fake
def _(x, weight, norm_weight, eps, residual, silu_pairs, pdl):
    return weight.new_empty(1, weight.shape[0] // 2 if silu_pairs else weight.shape[0])


class GemvDecoder(FusedDecoder):
    """``FusedDecoder`` whose one-row steps on CUDA run the four products of each layer and ``lm_head`` through
    ``gemv`` (module doc); ``pdl`` launches them with programmatic dependent launch. The library must be loaded
    (``load``). Built on CUDA, it checks each product against ``FusedDecoder``'s (``check``).

    ``compile_per_layer``: in a one-row step a layer ends in the kernel that adds the residual and the next begins in
    the one that norms it, so compiling the step per layer (``FusedGreedy``) loses no fusion there; batches, which
    run ``FusedDecoder``'s products, lose the fused add and norm between layers (evaluation only: never timed)."""

    compile_per_layer = True

    def __init__(self, model, projections, pdl: bool = True):
        super().__init__(model, projections)
        self.pdl = pdl
        if self.lm_head.weight.device.type == "cuda":
            self.check()

    @staticmethod
    def _one_row(x) -> bool:
        return x.is_cuda and x.numel() == x.shape[-1]

    def _gemv(self, x, linear, norm=None, residual=None, silu_pairs=False):
        out = gemv(x, linear.weight, None if norm is None else norm.weight,
                   0.0 if norm is None else norm.variance_epsilon, residual, silu_pairs, self.pdl)
        return out.view(*x.shape[:-1], -1)

    def qkv(self, proj, norm, x):
        if not self._one_row(x):
            return super().qkv(proj, norm, x)
        return self._gemv(x, proj.qkv, norm)

    def attention_out(self, proj, attn, x):
        if not self._one_row(x):
            return super().attention_out(proj, attn, x)
        return self._gemv(attn, proj.o, residual=x)

    def mlp(self, proj, norm, x):
        if not self._one_row(x):
            return super().mlp(proj, norm, x)
        return self._gemv(self._gemv(x, proj.gate_up, norm, silu_pairs=True), proj.down, residual=x)

    def head(self, x):
        if not self._one_row(x):
            return super().head(x)
        return self._gemv(x, self.lm_head, self.norm)

    @torch.no_grad()
    def check(self) -> None:
        """This decoder's products against ``FusedDecoder``'s on the first layer, for one random row; RuntimeError
        naming the product and the error past ``CHECK_MAX_RELATIVE_ERROR`` (a NaN fails). Run when built on CUDA."""
        like = self.lm_head.weight
        proj, norm_in, norm_post = self.projections[0], self.input_norms[0], self.post_norms[0]
        generator = torch.Generator(device=like.device).manual_seed(0)
        hidden = like.shape[1]
        # a small residual stream: the norms see its direction only, and the sum the o and MLP kernels round to bf16
        # then holds what they add to within a few of its own ulps, not of the stream's
        x = 1e-2 * torch.randn(1, 1, hidden, device=like.device, dtype=like.dtype, generator=generator)
        attn = torch.randn(1, 1, proj.o.weight.shape[1], device=like.device, dtype=like.dtype, generator=generator)
        cases = {"q/k/v": (self.qkv, FusedDecoder.qkv, (proj, norm_in, x)),
                 "o": (self.attention_out, FusedDecoder.attention_out, (proj, attn, x)),
                 "gate/up and down": (self.mlp, FusedDecoder.mlp, (proj, norm_post, x)),
                 "lm_head": (self.head, FusedDecoder.head, (x[:, -1],))}
        for name, (kernel, reference, args) in cases.items():
            want = reference(self, *args).float()
            got = kernel(*args).float()
            if name in ("o", "gate/up and down"):  # the residual stream: compare what was added to it
                want, got = want - x.float(), got - x.float()
            error = ((got - want).norm() / want.norm()).item()
            if not error <= CHECK_MAX_RELATIVE_ERROR:  # written so that NaN fails
                raise RuntimeError(f"merged engine: the GEMV kernel for {name} is wrong (relative error {error:.3g} "
                                   f"against the composed product, limit {CHECK_MAX_RELATIVE_ERROR:g})")
