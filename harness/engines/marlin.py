"""Marlin's 4-bit GEMM, the kernel of ``merged-int4`` (harness/engines/int4.py): vLLM's Marlin kernels as gptqmodel
packages them, built on this machine from gptqmodel's unmodified sources and loaded as ``torch.ops``.

gptqmodel (``pip install --no-deps gptqmodel==7.7.0``) ships the CUDA sources and compiles them on first use; its own
loader cannot be used here (importing gptqmodel patches transformers and safetensors, and its wheel asks for a newer
torch), so ``ops`` builds the same files with torch's JIT loader and reads nothing else of the package. One build
takes ~2 minutes on 16 cores (``nvcc`` on the PATH, or ``CUDA_HOME``), once per machine: the library goes into
``<cache>/marlin-<key>/``, built in a temp dir beside it and renamed into place, under a lock. The key hashes every
source file, this module, torch's and CUDA's versions, nvcc's, the GPU's compute capability and the flags, so a
library built from other sources or for another torch is never loaded.

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
import threading
from importlib import metadata
from pathlib import Path

import torch

from ..report.atomic import atomic_dir, file_lock, sweep_partial

__all__ = ["marlin_root", "build_key", "build", "build_in_background", "ops", "scalar_type_id", "marlin_gemm"]

NAMESPACE = "gptqmodel_marlin_bf16"  # the TORCH_LIBRARY that gptqmodel's marlin_torch_bf16.cpp registers
SOURCES = ("marlin_torch_bf16.cpp", "gptq_marlin_bf16.cu", "gptq_marlin_repack.cu", "awq_marlin_repack.cu")
FLAGS = ("-O3", "-DENABLE_BF16")
CUDA_FLAGS = ("-static-global-template-stub=false",  # templates instantiated in one file, launched from another
              *FLAGS, "-Xptxas", "-O3,-dlcm=ca", "-diag-suppress=179,39,177", "-Xfatbin", "-compress-all")
PER_PART = 5
INSTALL = "pip install --no-deps gptqmodel==7.7.0"
BUILDER = Path(__file__)  # this module: part of the key


def marlin_root() -> Path:
    """gptqmodel's Marlin sources (``gptqmodel_ext/marlin``); RuntimeError saying how to install them."""
    try:
        root = Path(metadata.distribution("gptqmodel").locate_file("gptqmodel_ext/marlin"))
    except metadata.PackageNotFoundError:
        root = None
    if root is None or not (root / "generate_kernels.py").is_file():
        raise RuntimeError(f"merged-int4 builds Marlin's kernels from gptqmodel's sources: {INSTALL} "
                           f"(README, GPU section)")
    return root


def _nvcc() -> str:
    """The nvcc that torch's loader will build with (``CUDA_HOME``, else the PATH's, else /usr/local/cuda)."""
    from torch.utils.cpp_extension import CUDA_HOME

    nvcc = Path(CUDA_HOME or "/nonexistent") / "bin" / "nvcc"
    if not nvcc.is_file():
        raise RuntimeError("merged-int4 compiles Marlin's kernels once per machine and needs CUDA's compiler: put nvcc "
                           "on the PATH or set CUDA_HOME")
    return str(nvcc)


def build_key(root: Path, nvcc_version: str, capability: tuple[int, int]) -> str:
    """sha256 of everything that changes the library (module doc)."""
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
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
    (src.parent / "build").mkdir()
    env = {**os.environ, "TORCH_CUDA_ARCH_LIST": f"{capability[0]}.{capability[1]}",
           "MAX_JOBS": os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))}
    done = subprocess.run([sys.executable, "-c", script, NAMESPACE, str(src), " ".join(FLAGS), " ".join(CUDA_FLAGS),
                           *map(str, sources)], env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"building Marlin's kernels failed (in {src.parent}):\n{done.stderr[-4000:]}")
    shutil.move(str(src.parent / "build" / f"{NAMESPACE}.so"), out / f"{NAMESPACE}.so")


def build(cache_dir: Path) -> tuple[str, Path]:
    """(key, library): the library of this machine's key in ``cache_dir``, built there first if missing (module doc).
    Another process or thread building the same key is waited for."""
    root, nvcc = marlin_root(), _nvcc()
    nvcc_version = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout.strip()
    capability = torch.cuda.get_device_capability()
    key = build_key(root, nvcc_version, capability)
    final = Path(cache_dir) / f"marlin-{key[:16]}"
    library = final / f"{NAMESPACE}.so"
    with file_lock(final):
        if not library.is_file():
            sweep_partial(final)
            with atomic_dir(final) as tmp:
                shutil.copytree(root, tmp / "src", ignore=shutil.ignore_patterns("__pycache__"))
                _build(tmp / "src", tmp, capability)
                shutil.rmtree(tmp / "src")
                shutil.rmtree(tmp / "build")
                made = {"key": key, "torch": torch.__version__, "cuda": torch.version.cuda,
                        "nvcc": nvcc_version.splitlines()[-1], "capability": list(capability),
                        "gptqmodel": metadata.version("gptqmodel")}
                (tmp / "key.json").write_text(json.dumps(made, indent=1))
    return key, library


def build_in_background(cache_dir: Path) -> None:
    """Start ``build`` in a thread (the compiling is a child process's) where CUDA is here. A build that cannot start
    or fails is left to ``ops``, which builds again in the foreground and raises the error there."""
    if torch.cuda.is_available():
        threading.Thread(target=_quiet_build, args=(cache_dir,), daemon=True, name="marlin-build").start()


def _quiet_build(cache_dir: Path) -> None:
    try:
        build(cache_dir)
    except Exception:  # noqa: BLE001 - ops() meets the same error in the foreground
        pass


_loaded: dict[str, str] = {}  # cache folder -> key of the library this process loaded from it


def ops(cache_dir: Path):
    """``torch.ops.gptqmodel_marlin_bf16``, built into ``cache_dir`` once per key (``build``) and loaded once per
    process."""
    folder = str(Path(cache_dir).resolve())
    if folder not in _loaded:
        key, library = build(cache_dir)
        if any(k != key for k in _loaded.values()):
            raise RuntimeError("Marlin's kernels of another key are already loaded in this process; start a new one")
        if key not in _loaded.values():
            torch.ops.load_library(str(library))
        _loaded[folder] = key
    return getattr(torch.ops, NAMESPACE)


def scalar_type_id(name: str) -> int:
    """gptqmodel's id of weight type ``name`` (``uint4``: 4-bit with zero points), read from its stdlib-only module
    without importing gptqmodel."""
    path = Path(metadata.distribution("gptqmodel").locate_file("gptqmodel/utils/marlin_scalar_type.py"))
    spec = importlib.util.spec_from_file_location("_gptqmodel_marlin_scalar_type", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module.scalar_types, name).id


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
