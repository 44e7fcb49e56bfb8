"""AWQ's 4-bit kernels, the kernels of ``merged-int4`` (harness/engines/int4.py): the decode GEMV that llm-awq adapted
from TensorRT-LLM's weight-only batched GEMV (1 to 7 rows) and its prefill GEMM over the same packing, as gptqmodel
packages them, built on this machine from gptqmodel's unmodified sources and loaded as ``torch.ops``.

The sources come from gptqmodel's source archive, read as a file and never installed: an installed gptqmodel makes
peft route LoRA loading through it (and then ask for optimum: every variant failed to load on the H200 at d7f5e0c),
and importing it patches transformers and safetensors. ``pip download --no-deps gptqmodel==7.7.0 -d runs/_kernels``
puts the archive where ``sdist`` looks (``$QLORA_GPTQMODEL_SDIST`` names another place); its sha256 must be
``SDIST_SHA256``, the archive this module was checked with. ``build`` compiles it with torch's JIT loader
(harness/engines/kernel_build.py): about a minute, once per machine, started beside the training. The library goes
into ``<cache>/awq-<key>/``, built in a temp dir beside it and renamed into place, under a lock. The key
hashes the archive, this module, torch's and CUDA's versions, nvcc's, the GPU's compute capability and the flags, so a
library built from other sources or for another torch is never loaded. Beside it, ``pack.py``: gptqmodel's
``pack_intweight`` (the weight layout these kernels read), the function's own text taken from its module in the
archive (the module imports gptqmodel).

Two facts of these kernels shape their use. They take float16 only: ``awq_linear`` is given float16 activations and
returns float16. And they launch without a stream argument, which CUDA graph capture refuses on the legacy default
stream: built with ``--default-stream per-thread`` (a compiler flag; the sources stay as shipped), they launch on the
per-thread default stream, which is ordered with the legacy one both ways. So ``awq_linear`` runs only where torch's
current stream is one of those two, and the engine captures its CUDA graphs on the per-thread one
(``capture_stream``). The binding of the two entry points, ``BINDING``, is this module's.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import os
import shutil
import tarfile
from pathlib import Path

import torch

from .kernel_build import compile_library, keyed_folder, library_key, nvcc

__all__ = ["sdist", "build_key", "build", "AwqKernels", "load", "capture_stream", "awq_linear"]

NAMESPACE = "qlora_awq"  # BINDING's TORCH_LIBRARY
SOURCES = ("gemv_fast_cuda_entry.cu", "gemm_fast_cuda_entry.cu")  # in gptqmodel_ext/awq/
BINDING = r"""
#include <torch/extension.h>
#include "quantization_new/gemv/gemv_cuda.h"
#include "quantization_new/gemm/gemm_cuda.h"
at::Tensor gemv(at::Tensor x, at::Tensor w, at::Tensor s, at::Tensor z, int64_t m, int64_t n, int64_t k, int64_t g) {
  return gemv_forward_cuda_decode(x, w, s, z, m, n, k, g);
}
at::Tensor gemm(at::Tensor x, at::Tensor w, at::Tensor s, at::Tensor z) {
  return gemm_forward_cuda_prefill(x, w, s, z);
}
TORCH_LIBRARY(qlora_awq, m) {
  m.def("gemv(Tensor x, Tensor w, Tensor s, Tensor z, int m, int n, int k, int g) -> Tensor");
  m.def("gemm(Tensor x, Tensor w, Tensor s, Tensor z) -> Tensor");
}
TORCH_LIBRARY_IMPL(qlora_awq, CUDA, m) { m.impl("gemv", &gemv); m.impl("gemm", &gemm); }
"""
FLAGS = ("-O3", "-DENABLE_BF16")
CUDA_FLAGS = (*FLAGS, "-Xptxas", "-O3,-dlcm=ca", "-diag-suppress=179,39,177", "--default-stream", "per-thread",
              "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__")
GEMV_MAX_ROWS = 7  # the decode GEMV's instantiations: 1 to 7 rows; more go to the prefill GEMM
GROUP_SIZE = 128  # the only group size both kernels instantiate
PER_THREAD_STREAM = 2  # cudaStreamPerThread
SDIST = "gptqmodel-7.7.0.tar.gz"
SDIST_SHA256 = "039874c39fb56ba75b750dd4870968e7fe83b6ca28890a53e94ad3c46be699d0"  # PyPI's, 2026-12-03
FETCH = "pip download --no-deps gptqmodel==7.7.0 -d runs/_kernels"
PACK_MODULE = "gptqmodel/nn_modules/qlinear/gemv_fast_awq.py"  # where pack_intweight is defined
BUILDER = Path(__file__)  # this module: part of the key


def sdist(cache_dir: Path) -> Path:
    """gptqmodel's source archive (module doc); RuntimeError saying how to fetch it, or that it is not the one
    checked."""
    path = Path(os.environ.get("QLORA_GPTQMODEL_SDIST") or Path(cache_dir) / SDIST)
    if not path.is_file():
        raise RuntimeError(f"merged-int4 builds AWQ's kernels from gptqmodel's source archive, not found at {path}: "
                           f"{FETCH} (README, GPU section)")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise RuntimeError(f"{path}: sha256 {digest}, not gptqmodel 7.7.0's {SDIST_SHA256}; {FETCH}")
    return path


def _extract(archive: Path, into: Path) -> tuple[Path, str]:
    """The archive's AWQ sources, extracted under ``into``, and the text of its ``pack_intweight``: (sources, text)."""
    with tarfile.open(archive) as tar:
        tar.extractall(into, [m for m in tar.getmembers() if "/gptqmodel_ext/awq/" in m.name
                              or m.name.endswith("/" + PACK_MODULE)], filter="data")
    top = next(into.iterdir())
    module = (top / PACK_MODULE).read_text()
    pack = next((n for n in ast.parse(module).body if isinstance(n, ast.FunctionDef) and n.name == "pack_intweight"),
                None)
    if pack is None:
        raise RuntimeError(f"{archive}: {PACK_MODULE} defines no pack_intweight")
    return top / "gptqmodel_ext" / "awq", ast.get_source_segment(module, pack)


def build_key(archive_sha256: str, nvcc_version: str, capability: tuple[int, int]) -> str:
    """sha256 of everything that changes the library (module doc)."""
    return library_key([archive_sha256.encode(), BUILDER.read_bytes()], nvcc_version, capability, CUDA_FLAGS)


def build(cache_dir: Path) -> Path:
    """The folder of the library of this machine's key in ``cache_dir``, built there first if missing (module doc;
    harness/engines/kernel_build.py). Another process or thread building the same key is waited for."""
    archive = sdist(cache_dir)
    _, nvcc_version = nvcc("merged-int4")
    capability = torch.cuda.get_device_capability()
    key = build_key(SDIST_SHA256, nvcc_version, capability)

    def fill(tmp: Path) -> dict:
        sources, pack = _extract(archive, tmp / "src")
        (sources / "binding.cpp").write_text(BINDING)
        compile_library(NAMESPACE, [sources / "binding.cpp", *(sources / name for name in SOURCES)], tmp, capability,
                        FLAGS, CUDA_FLAGS, include=sources)
        (tmp / "pack.py").write_text(f"# {PACK_MODULE} of {SDIST}\nimport torch\n\n\n{pack}\n")
        shutil.rmtree(tmp / "src")
        return {"sdist": SDIST, "sdist_sha256": SDIST_SHA256, "torch": torch.__version__, "cuda": torch.version.cuda,
                "nvcc": nvcc_version.splitlines()[-1], "capability": list(capability)}

    return keyed_folder(cache_dir, "awq", key, f"{NAMESPACE}.so", fill)


class AwqKernels:
    """The loaded library (``torch.ops.qlora_awq``) and gptqmodel's ``pack_intweight`` kept beside it."""

    def __init__(self, folder: Path):
        torch.ops.load_library(str(folder / f"{NAMESPACE}.so"))
        spec = importlib.util.spec_from_file_location("_awq_pack", folder / "pack.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        self.pack_intweight = module.pack_intweight


_loaded: dict[str, AwqKernels] = {}  # by the folder this process loaded the library from


def load(cache_dir: Path) -> AwqKernels:
    """AWQ's library, built into ``cache_dir`` once per key (``build``) and loaded once per process."""
    folder = build(cache_dir)
    if str(folder) not in _loaded:
        if _loaded:
            raise RuntimeError("AWQ's kernels of another key are already loaded in this process; start a new one")
        _loaded[str(folder)] = AwqKernels(folder)
    return _loaded[str(folder)]


def capture_stream() -> torch.cuda.ExternalStream:
    """The per-thread default stream, where the kernels launch (module doc): CUDA graphs holding them capture here."""
    return torch.cuda.ExternalStream(PER_THREAD_STREAM)


@torch.library.custom_op("qlora::awq_linear", mutates_args=())
def awq_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
               out_features: int) -> torch.Tensor:
    """``x`` (rows, in), float16, times the packed weight: (rows, out), float16. The decode GEMV up to
    ``GEMV_MAX_ROWS`` rows, the prefill GEMM past them. One opaque op for torch.compile. RuntimeError where torch's
    current stream is neither the legacy nor the per-thread default stream, which the kernels would not follow."""
    stream = torch.cuda.current_stream().cuda_stream
    if stream not in (0, PER_THREAD_STREAM):
        raise RuntimeError(f"merged-int4: AWQ's kernels launch on the default streams, not on torch's current stream "
                           f"{stream:#x}; run the engine outside other streams")
    ops = getattr(torch.ops, NAMESPACE)
    if x.shape[0] <= GEMV_MAX_ROWS:
        return ops.gemv(x, qweight, scales, zeros, x.shape[0], out_features, x.shape[1], GROUP_SIZE)
    return ops.gemm(x, qweight, scales, zeros)


@awq_linear.register_fake
def _(x, qweight, scales, zeros, out_features):
    return x.new_empty(x.shape[0], out_features)
