"""Where a decode step's time goes, per engine: ``python -m harness.bench.decode --profile synthetic-7b
--engines merged,merged-int4 --out decode.json``.

Builds the profile's merged base (no adapter) as the sweep does, then for each engine: compiles it, times
``--rounds`` greedy decodes of ``latency.max_new_tokens`` tokens at batch 1 (median), and runs one more under
``torch.profiler`` to report the GPU kernel time per token, the gap between wall and kernels (launches and host
work: what CUDA graphs remove), and the kernels that take the most time, grouped by name. The floor is the bytes of
weights one token reads over ``--bandwidth-tbs`` (default: the H200's 4.8 TB/s; the H100 SXM's is 3.35).

Engines: ``merged`` (the sweep's: fused projections, CUDA-graphed loop, one-row products in gemv.cu's kernels),
``merged-int4`` (harness/engines/int4.py), ``merged-int8`` (harness/engines/int8.py: torchao's int8 through the
model's own forward) and ``hf-step`` (the merged weights through the model's own forward, one compiled CUDA-graphed
step per token: the engine ``merged`` replaced, kept here as the same-run baseline).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

__all__ = ["profile_decode", "main"]

ENGINES = ("merged", "merged-int4", "merged-int8", "hf-step")


def _weights_read_bytes(engine) -> int:
    """Bytes one decode step reads from weights: every decoder parameter and buffer plus ``lm_head`` (the
    embedding table is a gather of one row, not read whole)."""
    decoder = getattr(engine, "decoder", None)
    model = engine.model
    modules: list[nn.Module] = [decoder.projections, decoder.input_norms, decoder.post_norms, decoder.norm,
                                decoder.lm_head] if decoder is not None else [model.model.layers, model.model.norm,
                                                                               model.lm_head]
    from ..engines.int8 import leaf_tensors

    seen = {t.data_ptr(): t.numel() * t.element_size() for module in modules for t in leaf_tensors(module)}
    return sum(seen.values())


def _kernels(fn) -> dict[str, list[float]]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels[event.name][0] += event.device_time_total / 1e3  # ms
            kernels[event.name][1] += 1
    return kernels


def _measure(engine, prompt: list[int], tokens: int, rounds: int, bandwidth_tbs: float, top: int) -> dict:
    decode = lambda: engine.generate([prompt], tokens, batch_size=1, fixed_length=True)  # noqa: E731
    start = time.perf_counter()
    first = decode()
    torch.cuda.synchronize()
    first_s = time.perf_counter() - start
    decode()
    walls = []
    for _ in range(rounds):
        start = time.perf_counter()
        decode()
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - start)
    kernels = _kernels(decode)
    gpu_ms = sum(ms for ms, _ in kernels.values())
    wall_ms = statistics.median(walls) * 1e3
    weight_bytes = _weights_read_bytes(engine)
    floor_ms = weight_bytes / (bandwidth_tbs * 1e12) * 1e3
    return {
        "engine": engine.name, "note": engine.note, "p50_s": wall_ms / 1e3, "rounds": rounds, "samples_s": walls,
        "first_call_s": first_s, "wall_ms_per_token": wall_ms / tokens, "gpu_kernel_ms_per_token": gpu_ms / tokens,
        "weights_read_gb": weight_bytes / 1e9, "floor_ms_per_token": floor_ms,
        "share_of_floor": floor_ms / (wall_ms / tokens), "tokens": first[0],
        "top_kernels": [{"name": n[:120], "ms_per_token": ms / tokens, "calls_per_token": c / tokens,
                         "share": ms / gpu_ms} for n, (ms, c) in sorted(kernels.items(), key=lambda kv: -kv[1][0])
                        [:top]],
    }


def profile_decode(profile_name: str, runs_dir: Path, engines: list[str], bandwidth_tbs: float, rounds: int = 10,
                   top: int = 12) -> dict:
    from ..config.preflight import prepare_profile
    from ..config.profiles import load_profile
    from ..data.prompt import encode_prompt
    from ..engines.decoding import StaticGreedy
    from ..engines.int4 import Int4Merged
    from ..engines.int8 import Int8Merged
    from ..engines.merged import MergedBase
    from ..models.base import load_tokenizer
    from ..report.provenance import provenance

    profile, splits, _ = prepare_profile(load_profile(profile_name))  # a folder source keyed by its content
    tokenizer = load_tokenizer(profile.model, runs_dir / "_models")
    base = MergedBase(profile, runs_dir / "_models", tokenizer)
    ex = splits["validation"][0]
    prompt, tokens = encode_prompt(tokenizer, ex.instruction, ex.input), profile.latency.max_new_tokens
    build = {
        "merged": lambda: base.engine,
        "merged-int4": lambda: Int4Merged(base.model, base.projections, tokenizer, profile.inference,
                                          runs_dir / "_kernels"),
        "merged-int8": lambda: Int8Merged(base.model, tokenizer, profile.inference),
        "hf-step": lambda: StaticGreedy(base.model, tokenizer, "merged", profile.inference),
    }
    out = {**provenance(), "profile": profile.name, "device": torch.cuda.get_device_name(), "new_tokens": tokens,
           "bandwidth_tbs": bandwidth_tbs, "engines": {}}
    for name in engines:
        figures = _measure(build[name](), prompt, tokens, rounds, bandwidth_tbs, top)
        if "merged" in out["engines"]:
            figures["agreement_vs_merged"] = sum(
                a == b for a, b in zip(figures["tokens"], out["engines"]["merged"]["tokens"])) / tokens
        out["engines"][name] = figures
        print(f"{name}: p50 {figures['p50_s']:.4f} s, {figures['wall_ms_per_token']:.2f} ms/token (kernels "
              f"{figures['gpu_kernel_ms_per_token']:.2f}), floor {figures['floor_ms_per_token']:.2f} "
              f"({figures['share_of_floor']:.0%}), first call {figures['first_call_s']:.1f} s", flush=True)
        for k in figures["top_kernels"]:
            print(f"   {k['ms_per_token']:.3f} ms/token {k['share']:.1%} x{k['calls_per_token']:.1f}  {k['name']}")
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="synthetic-7b")
    ap.add_argument("--runs-dir", type=Path, default=Path(__file__).resolve().parents[2] / "runs")
    ap.add_argument("--engines", default="merged,merged-int4",
                    help=f"comma-separated, from: {', '.join(ENGINES)}")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--bandwidth-tbs", type=float, default=4.8)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    engines = [e for e in args.engines.split(",") if e]
    unknown = sorted(set(engines) - set(ENGINES))
    if unknown:
        ap.error(f"unknown engine(s) {', '.join(unknown)}; choose from: {', '.join(ENGINES)}")
    if not torch.cuda.is_available():
        ap.error("bench.decode profiles CUDA kernels; this machine has no CUDA device")
    result = profile_decode(args.profile, args.runs_dir, engines, args.bandwidth_tbs, args.rounds)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
