"""FSDP-QLoRA on 2 GPUs against one GPU, on tiny with learned answers: python .ci/fsdp_check.py OUT_JSON.

Trains r16 with ``distributed: {mode: fsdp, num_processes: 2}`` (quant_storage = compute dtype) and with one
process, evaluates each saved adapter through the sweep (train EM must reach the profile's gate), and writes both
runs' per-GPU training peaks and EM. A failed launch prints the failing rank's traceback and the kept log folder.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fixtures.user_runs import write_profile  # noqa: E402
from harness.report.atomic import atomic_write_text  # noqa: E402
from harness.sweep import Sweep  # noqa: E402

out, results = Path(sys.argv[1]), {}
for mode in ("fsdp", "none"):
    dist = {"mode": mode, "num_processes": 2 if mode == "fsdp" else 1}
    profile = write_profile(Path(f"/tmp/fsdp-{mode}"), {
        "name": f"tiny-{mode}", "distributed": dist, "variants": ["baseline", "r16"],
        "quality_gates": [{"variants": ["r16"], "split": "train", "metric": "em", "min": 0.9}],
        "quantization": {"quant_storage": "float32"}, "training": {"batch_size": 2 if mode == "fsdp" else 4}})
    sweep = Sweep.prepare(profile, runs_dir=f"/tmp/fsdp-runs-{mode}", card=f"/tmp/fsdp-card-{mode}/MODEL_CARD.md")
    try:
        manifest = sweep.train("r16")[1]
        ev = sweep.evaluate("r16")
        results[mode] = {"train_em": ev.summary("train")["em"], "gate_failures": ev.quality_failures,
                         "train_memory": manifest["train_memory"], "world_size": manifest.get("world_size"),
                         "optimizer_steps": manifest.get("optimizer_steps"), "train_wall_s": manifest["train_wall_s"],
                         "git_sha": manifest.get("git_sha"), "device": manifest.get("device")}
    except Exception as e:  # noqa: BLE001 - the point is to see it
        results[mode] = {"error": str(e)[-4000:]}
    print(mode, json.dumps(results[mode], indent=1)[:3000], flush=True)
    sweep.close()
atomic_write_text(out, json.dumps(results, indent=2) + "\n")
