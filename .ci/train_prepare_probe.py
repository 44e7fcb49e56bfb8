"""Probe: why trl's ``SFTTrainer`` takes longer to build for a sweep's later trainings (issue 18, try 29's lead).

    python .ci/train_prepare_probe.py --out <dir> [--profile synthetic-7b]

Trains every LoRA variant of the profile on a fresh ``runs/`` as the sweep does, with ``SFTTrainer.__init__`` under
cProfile each time. Writes ``<dir>/sfttrainer-init-<n>.txt`` (its wall time, then the 45 costliest calls by cumulative
time) per training and ``<dir>/train-prepare-probe.json`` (the wall times).
"""

import argparse
import cProfile
import io
import json
import pstats
import time
from pathlib import Path

import trl

from harness import Sweep
from harness.report.atomic import atomic_write_text

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--out", type=Path, required=True)
ap.add_argument("--profile", default="synthetic-7b")
args = ap.parse_args()
args.out.mkdir(parents=True, exist_ok=True)
walls: list[float] = []
build = trl.SFTTrainer.__init__


def profiled_build(self, *a, **kw):
    prof = cProfile.Profile()
    start = time.perf_counter()
    prof.runcall(build, self, *a, **kw)
    walls.append(round(time.perf_counter() - start, 2))
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(45)
    atomic_write_text(args.out / f"sfttrainer-init-{len(walls)}.txt", f"wall {walls[-1]} s\n{text.getvalue()}")
    print("SFTTrainer.__init__", len(walls), walls[-1], flush=True)


trl.SFTTrainer.__init__ = profiled_build
sweep = Sweep.prepare(args.profile, runs_dir="runs")
for name in sweep.profile.variants:
    if not sweep.profile.variant(name).is_baseline:
        sweep.train(name)
atomic_write_text(args.out / "train-prepare-probe.json", json.dumps({"sfttrainer_init_s": walls}, indent=2) + "\n")
