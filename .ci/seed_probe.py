"""Seed-path probe (issue 18): the seed path's 128-token greedy rounds one after another in one process, each with its
wall time, this process's CPU time, the CPU clock /proc/cpuinfo reports, the collector's full collections and the CUDA
allocator's reserved bytes, to tell a host-bound spread from the collector, the allocator or other load.

The seed path is ``harness.engines.decoding.HFGreedy`` over the profile's NF4 base with an r16 LoRA (peft's
initialization: B = 0, so no training is needed; the same computation as a trained adapter's), on the latency prompt,
after ``memory.freeze_long_lived`` as in a session. Rounds run until ``PROBE_S`` seconds (default 150) or 12 rounds.
``PROBE_FIRST_TOKENS=8`` makes the fresh model's first call that short (the speed suite's warm-up is a full call):
whether the first call's extra host work is the process's once or each new KV length's. ``PROBE_OTHER_PROMPT=1``
ends with one round on another prompt (the first validation example that is not the latency prompt), whose KV
lengths the rounds before have not seen.

  PROBE_PROFILE=synthetic-7b PROBE_S=110 OUT=/tmp/probe python .ci/seed_probe.py   # writes $OUT/seed-probe.json
"""

import gc
import json
import os
import time
from pathlib import Path

import torch
from peft import get_peft_model

from harness.config.profiles import load_profile
from harness.data.dataset import load_splits
from harness.data.prompt import encode_prompt, v3_tokenizer
from harness.engines.decoding import HFGreedy
from harness.measure.memory import freeze_long_lived
from harness.models.base import load_base, peft_config

FULL = {"count": 0, "seconds": 0.0, "started": 0.0}


def _count_full_collections(phase: str, info: dict) -> None:
    if info["generation"] != 2:
        return
    if phase == "start":
        FULL["started"] = time.perf_counter()
    else:
        FULL["count"] += 1
        FULL["seconds"] += time.perf_counter() - FULL["started"]


def _mhz() -> tuple[int, int]:
    """Mean and max of the cores' clocks as /proc/cpuinfo reports them (a VM may report its nominal clock only)."""
    with open("/proc/cpuinfo", encoding="ascii") as f:
        values = [float(line.split(":")[1]) for line in f if line.startswith("cpu MHz")]
    return round(sum(values) / len(values)), round(max(values))


def main() -> None:
    cuda = torch.cuda.is_available()
    out = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "rounds": []}
    freeze_long_lived()
    gc.callbacks.append(_count_full_collections)
    profile = load_profile(os.environ.get("PROBE_PROFILE", "synthetic-7b"))
    started = time.perf_counter()
    base = load_base(profile.model, profile.quantization, Path("runs/_models"))
    out["load_s"] = time.perf_counter() - started
    model = get_peft_model(base, peft_config(profile.lora, profile.variant("r16"))).eval()
    tokenizer = v3_tokenizer()
    here = Path(profile.source_file).parent
    split = load_splits({"validation": (here / profile.data.validation).resolve()})["validation"]
    example = next(e for e in split if e.id == profile.latency.prompt_id)
    prompt = encode_prompt(tokenizer, example.instruction, example.input)
    other = next(e for e in split if e.id != example.id)
    engine = HFGreedy(model, tokenizer)
    budget = float(os.environ.get("PROBE_S", "150"))
    first = int(os.environ.get("PROBE_FIRST_TOKENS", profile.latency.max_new_tokens))
    out["first_tokens"] = first
    started = time.perf_counter()
    while len(out["rounds"]) < 12 and time.perf_counter() - started < budget:
        one_round(engine, [prompt], first if not out["rounds"] else profile.latency.max_new_tokens, cuda, out,
                  prompt_id=example.id)
    if os.environ.get("PROBE_OTHER_PROMPT"):
        one_round(engine, [encode_prompt(tokenizer, other.instruction, other.input)],
                  profile.latency.max_new_tokens, cuda, out, prompt_id=other.id)
    path = Path(os.environ.get("OUT", "/tmp")) / "seed-probe.json"
    path.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")


def one_round(engine, prompts, tokens: int, cuda: bool, out: dict, prompt_id: str | None = None) -> None:
    """One timed ``generate`` of ``tokens`` tokens, appended to ``out["rounds"]`` with the host's readings."""
    full, mhz, cpu, wall = dict(FULL), _mhz(), os.times(), time.perf_counter()
    engine.generate(prompts, tokens, fixed_length=True)
    if cuda:
        torch.cuda.synchronize()
    wall, after = time.perf_counter() - wall, os.times()
    out["rounds"].append({
        "tokens": tokens, "prompt_length": len(prompts[0]), "prompt_id": prompt_id,
        "wall_s": round(wall, 3), "own_cpu_s": round(after.user + after.system - cpu.user - cpu.system, 3),
        "mhz_before": mhz, "mhz_after": _mhz(), "full_gc": FULL["count"] - full["count"],
        "full_gc_s": round(FULL["seconds"] - full["seconds"], 3),
        "reserved_gib": round(torch.cuda.memory_reserved() / 2**30, 2) if cuda else None,
        "load1": os.getloadavg()[0]})
    print(out["rounds"][-1], flush=True)


if __name__ == "__main__":
    main()
