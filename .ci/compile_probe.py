"""Compile-time probe (issue 18): how long torch.compile takes over the merged engine's decode step, compiled whole
against per layer (harness/engines/fused.py), on a 32-layer Mistral as narrow as a test model (hidden 64), random
weights. What scales with the layer count (dynamo's trace, AOT, inductor's lowering) is the 7B's; the kernels are
small, so on a GPU Triton's compile of them would add its own seconds. Each way runs in a fresh process with
inductor's caches off.

  OUT=/tmp/probe python .ci/compile_probe.py        # writes $OUT/compile-probe.json
"""

import json
import os
import subprocess
import sys
import time

ONE = """
import time, torch
from torch._dynamo.utils import counters
from transformers import MistralConfig, MistralForCausalLM
from harness.engines.fused import FusedDecoder, fuse_projections_
cfg = MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=32, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=256, head_dim=16, sliding_window=None)
torch.manual_seed(0)
model = MistralForCausalLM(cfg).to(torch.bfloat16).eval()
dec = FusedDecoder(model, fuse_projections_(model))
args = (torch.tensor([[3]]), torch.tensor([[5]]), torch.tensor([5]), torch.ones(1, 64, dtype=torch.bool),
        dec.new_cache(1, 64))
compile = lambda f: torch.compile(f, fullgraph=True, dynamic=False, backend="{backend}")
if "{way}" == "whole":
    step = compile(dec)
else:
    layer = compile(dec.layer)
    step = lambda *a: dec.head(dec.layers(*dec.prepare(*a[:4]), a[2], a[4], layer)[:, -1])
t = time.perf_counter()
with torch.inference_mode():
    step(*args)
print(time.perf_counter() - t, counters["stats"]["unique_graphs"])
"""


def main() -> None:
    rows = []
    for backend in ("inductor", "aot_eager"):
        for way in ("whole", "per-layer"):
            env = {**os.environ, "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"}
            out = subprocess.run([sys.executable, "-c", ONE.format(way=way, backend=backend)], env=env, check=True,
                                 capture_output=True, text=True).stdout.split()
            rows.append({"backend": backend, "way": way, "first_call_s": round(float(out[-2]), 2),
                         "graphs": int(out[-1])})
            print(rows[-1], flush=True)
    import torch

    result = {"probe": "compile_probe", "config": "Mistral, 32 layers, hidden 64, random bf16 weights",
              "device": "cpu", "cpus": os.cpu_count(), "torch": torch.__version__,
              "git_sha": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
              "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows}
    path = os.path.join(os.environ.get("OUT", "."), "compile-probe.json")
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
