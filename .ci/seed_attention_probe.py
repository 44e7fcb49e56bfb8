"""Probe: is the seed path's eager decode bound by SDPA's cuDNN backend building a plan for every new KV length?

    python .ci/seed_attention_probe.py --out <dir> [--profile synthetic-7b]

The setup probe (``.ci/setup_probe.py``) found ``scaled_dot_product_attention`` taking 7.7 of 12.7 s of the parity
reference's 32-token generate (7.5 ms a call). This times, in one process, the seed path (NF4 + r16 adapter unmerged,
``model.generate``) on the latency prompt (128 tokens, batch 1) and on the parity prompts (32 tokens, batch 8), first
with torch's default SDPA backends, then with cuDNN's left out (``sdpa_kernel``), three calls each, and writes
``<dir>/seed-attention-probe.json`` with the profiler's costliest ops of an 8-token call under each (a profiled
128-token eager call ran for minutes on the H200 and cut the first run of this probe off, 2026-12-04).
"""

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from harness import Sweep
from harness.engines.decoding import HFGreedy
from harness.models.nf4 import load_nf4_with_adapter
from harness.report.atomic import atomic_write_text
from harness.train.trainer import peft_dir

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--out", type=Path, required=True)
ap.add_argument("--profile", default="synthetic-7b")
args = ap.parse_args()
args.out.mkdir(parents=True, exist_ok=True)

sweep = Sweep.prepare(args.profile, runs_dir="runs")
p = sweep.profile
adapter = peft_dir(sweep.train("r16")[0])
seed = HFGreedy(load_nf4_with_adapter(p, adapter, Path("runs/_models")), sweep.tokenizer)
latency_prompt, prompts = [sweep.latency_prompt()], sweep.eval_prompts()
calls = {"latency-128": lambda: seed.generate(latency_prompt, p.latency.max_new_tokens, 1, True),
         "parity-32": lambda: seed.generate(prompts, p.inference.parity_new_tokens, p.eval.batch_size)}
no_cudnn = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
          "cudnn_sdp_enabled": torch.backends.cuda.cudnn_sdp_enabled(), "walls_s": {}, "top_ops": {}, "tokens": {}}


def save() -> None:
    atomic_write_text(args.out / "seed-attention-probe.json", json.dumps(report, indent=2) + "\n")


for backends in ("default", "no-cudnn"):
    for name, call in calls.items():
        key = f"{backends}/{name}"
        walls = []
        for _ in range(3):
            torch.cuda.synchronize()
            start = time.perf_counter()
            with sdpa_kernel(no_cudnn) if backends == "no-cudnn" else contextlib.nullcontext():
                out = call()
            torch.cuda.synchronize()
            walls.append(round(time.perf_counter() - start, 3))
        report["walls_s"][key], report["tokens"][key] = walls, out
        print(key, walls, flush=True)
        save()  # after every figure: a run cut off keeps what it measured
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with sdpa_kernel(no_cudnn) if backends == "no-cudnn" else contextlib.nullcontext():
            seed.generate(latency_prompt, 8, 1, True)
    report["top_ops"][backends] = prof.key_averages().table(sort_by="cpu_time_total", row_limit=12)
same = {name: report["tokens"][f"default/{name}"] == report["tokens"][f"no-cudnn/{name}"] for name in calls}
report["same_tokens"] = same
print("same tokens:", same)
save()
