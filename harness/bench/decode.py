"""Where a decode step's time goes: ``python -m harness.bench.decode --profile synthetic-7b --out decode.json``.

Builds the merged engine for the profile's base (no adapter), compiles it as the sweep does, then runs one
``latency.max_new_tokens``-token greedy decode under ``torch.profiler`` and reports: wall time per token, GPU kernel
time per token (the sum of every CUDA kernel), the gap between them (launch and host overhead: what CUDA graphs are
for), and the kernels that take the most time, grouped by name. The floor is the bytes of weights read per token
over the card's memory bandwidth (``--bandwidth-tbs``, default the H100's measured 3.0 TB/s).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch

__all__ = ["profile_decode", "main"]


def profile_decode(profile_name: str, runs_dir: Path, bandwidth_tbs: float, top: int = 15) -> dict:
    from ..config.preflight import check_profile_data
    from ..config.profiles import load_profile
    from ..data.prompt import encode_prompt
    from ..engines.merged import MergedBase
    from ..models.base import load_tokenizer
    from ..report.provenance import provenance

    profile = load_profile(profile_name)
    splits = check_profile_data(profile)
    tokenizer = load_tokenizer(profile.model, runs_dir / "_models")
    base = MergedBase(profile, runs_dir / "_models", tokenizer)
    ex = splits["validation"][0]
    prompt, tokens = encode_prompt(tokenizer, ex.instruction, ex.input), profile.latency.max_new_tokens
    decode = lambda: base.engine.generate([prompt], tokens, batch_size=1, fixed_length=True)  # noqa: E731
    decode()  # compile
    for _ in range(3):
        decode()
    torch.cuda.synchronize()
    walls = []
    for _ in range(10):
        start = time.perf_counter()
        decode()
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - start)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        decode()
        torch.cuda.synchronize()
    kernels: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels[event.name][0] += event.device_time_total / 1e3  # ms
            kernels[event.name][1] += 1
    gpu_ms = sum(ms for ms, _ in kernels.values())
    weight_bytes = sum(p.numel() * p.element_size() for p in base.model.parameters())
    wall_ms = sorted(walls)[len(walls) // 2] * 1e3
    return {
        **provenance(), "profile": profile.name, "new_tokens": tokens, "p50_s": wall_ms / 1e3,
        "wall_ms_per_token": wall_ms / tokens, "gpu_kernel_ms_per_token": gpu_ms / tokens,
        "weights_gb": weight_bytes / 1e9, "floor_ms_per_token": weight_bytes / (bandwidth_tbs * 1e12) * 1e3,
        "achieved_bandwidth_tbs": weight_bytes / (wall_ms / tokens / 1e3) / 1e12,
        "top_kernels": [{"name": n[:120], "ms_per_token": ms / tokens, "calls_per_token": c / tokens,
                         "share": ms / gpu_ms} for n, (ms, c) in sorted(kernels.items(), key=lambda kv: -kv[1][0])
                        [:top]],
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="synthetic-7b")
    ap.add_argument("--runs-dir", type=Path, default=Path(__file__).resolve().parents[2] / "runs")
    ap.add_argument("--bandwidth-tbs", type=float, default=3.0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    result = profile_decode(args.profile, args.runs_dir, args.bandwidth_tbs)
    text = json.dumps(result, indent=2, default=str)
    if args.out:
        args.out.write_text(text + "\n")
    print({k: result[k] for k in ("p50_s", "wall_ms_per_token", "gpu_kernel_ms_per_token", "floor_ms_per_token",
                                  "achieved_bandwidth_tbs")})
    for k in result["top_kernels"]:
        print(f"{k['ms_per_token']:.3f} ms/token {k['share']:.1%} x{k['calls_per_token']:.1f}  {k['name']}")


if __name__ == "__main__":
    main()
