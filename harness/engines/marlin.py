"""Marlin's 4-bit GEMM, the kernel of ``merged-int4`` (harness/engines/int4.py): vLLM's Marlin kernels as gptqmodel
packages them, built on this machine from gptqmodel's unmodified sources and loaded as ``torch.ops``.

The sources come from gptqmodel's source archive, read as a file and never installed: an installed gptqmodel makes
peft route LoRA loading through it (and then ask for optimum: every variant failed to load on the H200 at d7f5e0c),
and importing it patches transformers and safetensors. ``pip download --no-deps gptqmodel==7.7.0 -d runs/_kernels``
puts the archive where ``sdist`` looks (``$QLORA_MARLIN_SDIST`` names another place); its sha256 must be
``SDIST_SHA256``, the archive this module was checked with. ``build`` compiles it with torch's JIT loader (nvcc on the
PATH, or ``CUDA_HOME``): ~2 minutes on 16 cores, once per machine, started beside the training
(``build_in_background``). The library goes into ``<cache>/marlin-<key>/``, built in a temp dir beside it and renamed
into place, under a lock. The key hashes the archive, this module, torch's and CUDA's versions, nvcc's, the GPU's
compute capability and the flags, so a library built from other sources or for another torch is never loaded.

Only the bf16 kernels are built. gptqmodel's generator writes each weight type's instantiations into one file; they are
split into parts of ``PER_PART`` (the instantiations unchanged) so that ninja compiles them on every core.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import torch

from ..report.atomic import atomic_dir, file_lock, sweep_partial

__all__ = ["sdist", "build_key", "build", "build_in_background", "Marlin", "load", "marlin_gemm"]

NAMESPACE = "gptqmodel_marlin_bf16"  # the TORCH_LIBRARY that gptqmodel's marlin_torch_bf16.cpp registers
SOURCES = ("marlin_torch_bf16.cpp", "gptq_marlin_bf16.cu", "gptq_marlin_repack.cu", "awq_marlin_repack.cu")
FLAGS = ("-O3", "-DENABLE_BF16")
CUDA_FLAGS = ("-static-global-template-stub=false",  # templates instantiated in one file, launched from another
              *FLAGS, "-Xptxas", "-O3,-dlcm=ca", "-diag-suppress=179,39,177", "-Xfatbin", "-compress-all")
PER_PART = 5
SDIST = "gptqmodel-7.7.0.tar.gz"
SDIST_SHA256 = "039874c39fb56ba75b750dd4870968e7fe83b6ca28890a53e94ad3c46be699d0"  # PyPI's, 2026-12-03
FETCH = "pip download --no-deps gptqmodel==7.7.0 -d runs/_kernels"
BUILDER = Path(__file__)  # this module: part of the key


def sdist(cache_dir: Path) -> Path:
    """gptqmodel's source archive (module doc); RuntimeError saying how to fetch it, or that it is not the one
    checked."""
    path = Path(os.environ.get("QLORA_MARLIN_SDIST") or Path(cache_dir) / SDIST)
    if not path.is_file():
        raise RuntimeError(f"merged-int4 builds Marlin's kernels from gptqmodel's source archive, not found at {path}: "
                           f"{FETCH} (README, GPU section)")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise RuntimeError(f"{path}: sha256 {digest}, not gptqmodel 7.7.0's {SDIST_SHA256}; {FETCH}")
    return path


def _extract(archive: Path, into: Path) -> tuple[Path, Path]:
    """The archive's Marlin sources and its ScalarType module, extracted under ``into``: (sources, module)."""
    with tarfile.open(archive) as tar:
        tar.extractall(into, [m for m in tar.getmembers() if "/gptqmodel_ext/marlin/" in m.name
                              or m.name.endswith("/gptqmodel/utils/marlin_scalar_type.py")], filter="data")
    top = next(into.iterdir())
    return top / "gptqmodel_ext" / "marlin", top / "gptqmodel" / "utils" / "marlin_scalar_type.py"


def _nvcc() -> str:
    """The nvcc that torch's loader will build with (``CUDA_HOME``, else the PATH's, else /usr/local/cuda)."""
    from torch.utils.cpp_extension import CUDA_HOME

    nvcc = Path(CUDA_HOME or "/nonexistent") / "bin" / "nvcc"
    if not nvcc.is_file():
        raise RuntimeError("merged-int4 compiles Marlin's kernels once per machine and needs CUDA's compiler: put nvcc "
                           "on the PATH or set CUDA_HOME")
    return str(nvcc)


def build_key(archive_sha256: str, nvcc_version: str, capability: tuple[int, int]) -> str:
    """sha256 of everything that changes the library (module doc)."""
    h = hashlib.sha256(archive_sha256.encode())
    h.update(BUILDER.read_bytes())
    h.update(json.dumps([torch.__version__, torch.version.cuda, nvcc_version, list(capability), PER_PART,
                         CUDA_FLAGS]).encode())
    return h.hexdigest()


def _split(path: Path) -> list[Path]:
    """``path``'s explicit instantiations in parts of ``PER_PART``, each part with the file's own head and tail."""
    lines = path.read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("template "))
    head, body = lines[:first], [line for line in lines[first:] if line.startswith("template ")]
    parts = []
    for n, i in enumerate(range(0, len(body), PER_PART)):
        part = path.with_name(f"{path.stem}_part{n:02d}.cu")
        part.write_text("\n".join(head + body[i:i + PER_PART] + ["}", ""]))
        parts.append(part)
    path.unlink()
    return parts


def _build(src: Path, out: Path, capability: tuple[int, int]) -> None:
    """Generate, split and compile the sources copied to ``src``; the library lands in ``out``. In a child process:
    torch's loader also loads what it builds, and the parent loads the library only from its final place."""
    subprocess.run([sys.executable, "generate_kernels.py"], cwd=src, check=True, capture_output=True)
    sources = [src / name for name in SOURCES]
    for path in sorted(src.glob("kernel_bf16_*.cu")):
        sources += _split(path)
    for stale in src.glob("kernel_fp16_*.cu"):
        stale.unlink()
    script = ("import sys, torch.utils.cpp_extension as c; c.load(name=sys.argv[1], sources=sys.argv[5:], "
              "extra_include_paths=[sys.argv[2]], extra_cflags=sys.argv[3].split(), "
              "extra_cuda_cflags=sys.argv[4].split(), build_directory=sys.argv[2] + '/../build', "
              "is_python_module=False)")
    (src.parent / "build").mkdir()  # beside src, inside the temp dir
    env = {**os.environ, "TORCH_CUDA_ARCH_LIST": f"{capability[0]}.{capability[1]}",
           "MAX_JOBS": os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))}
    done = subprocess.run([sys.executable, "-c", script, NAMESPACE, str(src), " ".join(FLAGS), " ".join(CUDA_FLAGS),
                           *map(str, sources)], env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"building Marlin's kernels failed (in {src.parent}):\n{done.stderr[-4000:]}")
    shutil.move(str(src.parent / "build" / f"{NAMESPACE}.so"), out / f"{NAMESPACE}.so")


def build(cache_dir: Path) -> Path:
    """The folder of the library of this machine's key in ``cache_dir``, built there first if missing (module doc).
    Another process or thread building the same key is waited for."""
    archive, nvcc = sdist(cache_dir), _nvcc()
    nvcc_version = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout.strip()
    capability = torch.cuda.get_device_capability()
    key = build_key(SDIST_SHA256, nvcc_version, capability)
    final = Path(cache_dir) / f"marlin-{key[:16]}"
    with file_lock(final):
        if not (final / f"{NAMESPACE}.so").is_file():
            sweep_partial(final)
            with atomic_dir(final) as tmp:
                sources, types = _extract(archive, tmp / "src")
                _build(sources, tmp, capability)
                shutil.copy(types, tmp / types.name)
                shutil.rmtree(tmp / "src")
                made = {"key": key, "sdist": SDIST, "sdist_sha256": SDIST_SHA256, "torch": torch.__version__,
                        "cuda": torch.version.cuda, "nvcc": nvcc_version.splitlines()[-1],
                        "capability": list(capability)}
                (tmp / "key.json").write_text(json.dumps(made, indent=1))
    return final


_background: list[threading.Thread] = []  # builds started by build_in_background, for wait_for_background_build


def build_in_background(cache_dir: Path) -> None:
    """Start ``build`` in a thread (the compiling is a child process's) where CUDA is here. A build that cannot start
    or fails is left to ``load``, which builds again in the foreground and raises the error there."""
    if torch.cuda.is_available():
        thread = threading.Thread(target=_quiet_build, args=(cache_dir,), daemon=True, name="marlin-build")
        _background.append(thread)
        thread.start()


def background_build_running() -> bool:
    """Whether a build that ``build_in_background`` started is still compiling."""
    return any(t.is_alive() for t in _background)


def wait_for_background_build() -> None:
    """Block until every build that ``build_in_background`` started has ended."""
    while _background:
        _background.pop().join()


def _quiet_build(cache_dir: Path) -> None:
    try:
        build(cache_dir)
    except Exception:  # noqa: BLE001 - load() meets the same error in the foreground
        pass


class Marlin:
    """The loaded library: ``ops`` (``torch.ops.gptqmodel_marlin_bf16``) and gptqmodel's id of the ``uint4`` weight
    type (4 bits with zero points), read from its stdlib-only ScalarType module kept beside the library."""

    def __init__(self, folder: Path):
        torch.ops.load_library(str(folder / f"{NAMESPACE}.so"))
        self.ops = getattr(torch.ops, NAMESPACE)
        spec = importlib.util.spec_from_file_location("_marlin_scalar_type", folder / "marlin_scalar_type.py")
        types = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(types)
        self.uint4 = types.scalar_types.uint4.id


_loaded: dict[str, Marlin] = {}  # by the folder this process loaded the library from


def load(cache_dir: Path) -> Marlin:
    """Marlin's library, built into ``cache_dir`` once per key (``build``) and loaded once per process."""
    folder = build(cache_dir)
    if str(folder) not in _loaded:
        if _loaded:
            raise RuntimeError("Marlin's kernels of another key are already loaded in this process; start a new one")
        _loaded[str(folder)] = Marlin(folder)
    return _loaded[str(folder)]


@torch.library.custom_op("qlora::marlin_gemm", mutates_args=())
def marlin_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                workspace: torch.Tensor, type_id: int, out_features: int) -> torch.Tensor:
    """``x`` (rows, in) times the Marlin-packed weight: (rows, out). One opaque op for torch.compile (gptqmodel's op
    returns an alias of its optional output, which functionalization does not take). ``workspace`` holds the
    kernel's locks, which it leaves zeroed."""
    return getattr(torch.ops, NAMESPACE).gptq_marlin_gemm_bf16(
        x, None, qweight, None, scales, None, zeros, None, None, workspace, type_id, x.shape[0], out_features,
        x.shape[1], True, False, True, False)  # is_k_full, use_atomic_add, use_fp32_reduce, is_zp_float


@marlin_gemm.register_fake
def _(x, qweight, scales, zeros, workspace, type_id, out_features):
    return x.new_empty(x.shape[0], out_features)
