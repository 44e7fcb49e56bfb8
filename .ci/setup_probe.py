"""Probe: where the GPU command's setup seconds go, outside the timed rounds (issue 18).

    python .ci/setup_probe.py --out <dir> [--profile synthetic-7b]

On a fresh ``runs/`` it profiles (cProfile, cumulative) the pieces ``phases.log`` shows only as one figure each: the
synthetic checkpoint's write with the first NF4 load, two trainings (the first and a later one), the parity
reference's load, its greedy generation and teacher-forced logits; then it times the seed path's first 128-token call
and a later one with a plain clock. Writes ``<dir>/setup-probe.json`` (wall times) and one ``profile-<piece>.txt``
(the 40 costliest calls by cumulative time) per piece.
"""

import argparse
import cProfile
import io
import json
import pstats
import time
from pathlib import Path

import torch

from harness import Sweep
from harness.engines.decoding import HFGreedy
from harness.models.base import load_base
from harness.models.nf4 import load_nf4_with_adapter
from harness.report.atomic import atomic_write_text
from harness.train.trainer import peft_dir

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--out", type=Path, required=True)
ap.add_argument("--profile", default="synthetic-7b")
args = ap.parse_args()
args.out.mkdir(parents=True, exist_ok=True)
walls: dict[str, float] = {}
sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)


def profiled(piece: str, fn, *a):
    prof = cProfile.Profile()
    sync()
    start = time.perf_counter()
    result = prof.runcall(fn, *a)
    sync()
    walls[piece] = round(time.perf_counter() - start, 2)
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(40)
    atomic_write_text(args.out / f"profile-{piece}.txt", text.getvalue())
    print(piece, walls[piece], flush=True)
    return result


def clocked(piece: str, fn, *a):
    sync()
    start = time.perf_counter()
    result = fn(*a)
    sync()
    walls[piece] = round(time.perf_counter() - start, 2)
    print(piece, walls[piece], flush=True)
    return result


sweep = Sweep.prepare(args.profile, runs_dir="runs")
p = sweep.profile
tok = sweep.tokenizer
base = profiled("checkpoint-and-first-load", load_base, p.model, p.quantization, Path("runs/_models"))
del base
torch.cuda.empty_cache()
profiled("load-again", load_base, p.model, p.quantization, Path("runs/_models"))
profiled("train-r8-first", sweep.train, "r8")
profiled("train-r16", sweep.train, "r16")
adapter = peft_dir(sweep.adapter("r16")[0])
ref = profiled("reference-load", load_nf4_with_adapter, p, adapter, Path("runs/_models"))
seed = HFGreedy(ref, tok)
prompts = sweep.eval_prompts()
out = profiled("reference-generate", seed.generate, prompts, p.inference.parity_new_tokens, p.eval.batch_size)
profiled("reference-forced", lambda: [seed.forced_logits(q, r) for q, r in zip(prompts, out)])
with ref.disable_adapter():
    clocked("reference-forced-no-adapter", lambda: [seed.forced_logits(q, r) for q, r in zip(prompts, out)])
latency_prompt = sweep.latency_prompt()
n = p.latency.max_new_tokens
clocked("seed-first-128", seed.generate, [latency_prompt], n, 1, True)
clocked("seed-second-128", seed.generate, [latency_prompt], n, 1, True)
clocked("seed-4-tokens", seed.generate, [latency_prompt], 4, 1, True)
clocked("seed-third-128", seed.generate, [latency_prompt], n, 1, True)
device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
atomic_write_text(args.out / "setup-probe.json", json.dumps({"walls_s": walls, "device": device}, indent=2) + "\n")
