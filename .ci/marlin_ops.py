"""Marlin's 4-bit GEMM (bf16 activations) for the decode probe (issue 17, try 19): gptqmodel 7.7.0's copy of vLLM's
Marlin kernels, built from its sdist's unmodified sources with torch's JIT loader on the device (nvcc 13.0 is in the
image). Not part of the harness: the probe times it against gemlite's GEMV and bf16 first.

The sdist's kernel files are split into parts of a few template instantiations each (the instantiations themselves
unchanged), so that ninja compiles them on every core: one file of 75 instantiations takes minutes on one core.
"""

import glob
import importlib.util
import os
import subprocess
import sys
import tarfile
import time

import torch

SDIST = os.environ.get("MARLIN_SDIST", ".whl-marlin/gptqmodel-7.7.0.tar.gz")
BUILD = os.environ.get("MARLIN_BUILD", "/tmp/marlin-build")
PER_PART = 5
_ops = None


def _split(path: str) -> list[str]:
    """``path``'s explicit instantiations in parts of ``PER_PART``, each with the file's own head and tail."""
    lines = open(path).read().splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("template "))
    head, body = lines[:first], [line for line in lines[first:] if line.startswith("template ")]
    parts = []
    for n, i in enumerate(range(0, len(body), PER_PART)):
        part = f"{path[:-3]}_part{n:02d}.cu"
        with open(part, "w") as f:
            f.write("\n".join(head + body[i:i + PER_PART] + ["}", ""]))
        parts.append(part)
    os.remove(path)
    return parts


def scalar_types():
    """gptqmodel's ScalarType ids (a stdlib-only module of the sdist), loaded without importing gptqmodel."""
    path = glob.glob(os.path.join(BUILD, "src", "*", "gptqmodel", "utils", "marlin_scalar_type.py"))[0]
    spec = importlib.util.spec_from_file_location("marlin_scalar_type", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.scalar_types


def ops():
    """torch.ops.gptqmodel_marlin_bf16, built once per process (minutes on 16 cores)."""
    global _ops
    if _ops is not None:
        return _ops
    from torch.utils.cpp_extension import load

    t0 = time.time()
    src = os.path.join(BUILD, "src")
    with tarfile.open(SDIST) as t:
        t.extractall(src, [m for m in t.getmembers() if "/gptqmodel_ext/marlin/" in m.name
                           or m.name.endswith("/utils/marlin_scalar_type.py")], filter="data")
    mdir = glob.glob(os.path.join(src, "*", "gptqmodel_ext", "marlin"))[0]
    subprocess.run([sys.executable, "generate_kernels.py"], cwd=mdir, check=True)
    sources = [os.path.join(mdir, f) for f in ("marlin_torch_bf16.cpp", "gptq_marlin_bf16.cu",
                                               "gptq_marlin_repack.cu", "awq_marlin_repack.cu")]
    for path in sorted(glob.glob(os.path.join(mdir, "kernel_bf16_*.cu"))):
        sources += _split(path)
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count()))
    os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
    os.makedirs(os.path.join(BUILD, "out"), exist_ok=True)
    flags = ["-O3", "-DENABLE_BF16"]
    load(name="gptqmodel_marlin_bf16", sources=sources, extra_include_paths=[mdir], extra_cflags=flags,
         extra_cuda_cflags=["-static-global-template-stub=false", *flags, "-Xptxas", "-O3,-dlcm=ca",
                            "-diag-suppress=179,39,177", "-Xfatbin", "-compress-all"],
         build_directory=os.path.join(BUILD, "out"), is_python_module=False, verbose=False)
    _ops = torch.ops.gptqmodel_marlin_bf16
    print(f"[marlin] built {len(sources)} sources in {time.time() - t0:.0f} s", flush=True)
    return _ops


def _scale_perms():
    perm = [i + 8 * j for i in range(8) for j in range(8)]
    single = [2 * i + j for i in range(4) for j in (0, 1, 8, 9, 16, 17, 24, 25)]
    return perm, single


def _pack_rows(q: torch.Tensor) -> torch.Tensor:
    """(k, n) values in 0..15 -> (k/8, n) int32, eight consecutive rows a word, the first in the low bits (GPTQ)."""
    k, n = q.shape
    q = q.to(torch.int64).reshape(k // 8, 8, n)
    word = sum(q[:, j, :] << (4 * j) for j in range(8))
    return (word - ((word >> 31) << 32)).to(torch.int32)  # the two's-complement int32 of each 32-bit word


def _pack_cols(q: torch.Tensor) -> torch.Tensor:
    """(k, n) values in 0..15 -> (k, n/8) int32, eight consecutive columns a word, the first in the low bits."""
    k, n = q.shape
    q = q.to(torch.int64).reshape(k, n // 8, 8)
    word = sum(q[:, :, j] << (4 * j) for j in range(8))
    return (word - ((word >> 31) << 32)).to(torch.int32)


class MarlinInt4(torch.nn.Module):
    """``linear``'s weight in 4 bits, groups of ``group`` inputs, multiplied by Marlin. ``zero_points``: asymmetric,
    integer zero points (``uint4``); else symmetric around 8 (``uint4b8``, GPTQ's)."""

    def __init__(self, linear: torch.nn.Linear, group: int = 128, zero_points: bool = True):
        super().__init__()
        o, types = ops(), scalar_types()
        w = linear.weight.detach().float()
        n, k = w.shape
        g = w.reshape(n, k // group, group)
        if zero_points:
            lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
            scale = ((hi - lo) / 15).clamp_min(1e-8)
            zero = (-lo / scale).round().clamp(0, 15)
            q = (g / scale + zero).round().clamp(0, 15)
        else:
            scale = (g.abs().amax(-1, keepdim=True) / 7).clamp_min(1e-8)
            zero = torch.full_like(scale, 8.0)
            q = (g / scale).round().clamp(-8, 7) + 8
        dequantized = ((q - zero) * scale).reshape(n, k).to(linear.weight.dtype)
        q = q.reshape(n, k).t().contiguous()  # (k, n)
        dev = linear.weight.device
        self.qweight = o.gptq_marlin_repack(_pack_rows(q), torch.empty(0, dtype=torch.int32, device=dev), k, n, 4)
        perm, single = _scale_perms()
        s = scale.reshape(n, k // group).t().contiguous().to(linear.weight.dtype)  # (k/group, n)
        self.scales = s.reshape(-1, len(perm))[:, perm].reshape(-1, n).contiguous()
        self.zeros = None
        if zero_points:
            z = zero.reshape(n, k // group).t().contiguous()
            z = z.reshape(-1, len(perm))[:, perm].reshape(-1, 8)[:, [0, 2, 4, 6, 1, 3, 5, 7]].reshape(-1, n)
            self.zeros = _pack_cols(z)
        self.type_id = (types.uint4 if zero_points else types.uint4b8).id
        self.workspace = torch.zeros(max(torch.cuda.get_device_properties(dev).multi_processor_count, 128),
                                     dtype=torch.int32, device=dev)
        self.n, self.k = n, k
        x = torch.randn(3, k, device=dev, dtype=linear.weight.dtype)
        want = x.float() @ dequantized.float().t()
        # the kernel against its own dequantized weight: packing or layout errors show here, not rounding
        self.kernel_error = ((self(x).float() - want).norm() / want.norm()).item()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.k)
        out = marlin_gemm(x2, self.qweight, self.scales, self.zeros, self.workspace, self.type_id, self.n)
        return out.reshape(*x.shape[:-1], self.n)


@torch.library.custom_op("qlora_probe::marlin_gemm", mutates_args=())
def marlin_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                workspace: torch.Tensor, type_id: int, n: int) -> torch.Tensor:
    """One opaque op for torch.compile (gptqmodel's op returns an alias of an optional output, which functionalization
    does not take); the lock workspace is left zeroed by the kernel."""
    return ops().gptq_marlin_gemm_bf16(x, None, qweight, None, scales, None, zeros, None, None, workspace, type_id,
                                       x.shape[0], n, x.shape[1], True, False, True, False)


@marlin_gemm.register_fake
def _(x, qweight, scales, zeros, workspace, type_id, n):
    return x.new_empty(x.shape[0], n)
