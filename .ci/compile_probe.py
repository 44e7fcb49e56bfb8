"""Compile-time probe (issue 18): how long torch.compile takes over a decode step, on a 32-layer Mistral as narrow
as a test model (hidden 64), random weights, each way in a fresh process with inductor's caches off:

  merged  the merged engine's step (harness/engines/fused.py), compiled whole against per layer (``FusedGreedy``'s
          regions: one graph serves every layer)
  nf4     ``nf4-compiled``'s step (NF4 through bitsandbytes, r16 LoRA unmerged through peft, transformers' static
          cache), compiled whole against with its layers one nested region (``decoding.compile_layers_once``), and
          against each transformers layer through one compiled forward, the rest eager (``per-layer``: what a step
          captured by hand around compiled layers, as ``FusedGreedy``'s, would compile)

What scales with the layer count (dynamo's trace, AOT, inductor's lowering) is the 7B's; the kernels are small, so on
a GPU Triton's compile of them adds its own seconds.

  OUT=/tmp/probe python .ci/compile_probe.py        # writes $OUT/compile-probe.json
"""

import json
import os
import subprocess
import sys
import time

CONFIG = """
import time, torch
from torch._dynamo.utils import counters
from transformers import MistralConfig, MistralForCausalLM
cfg = MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=32, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=256, head_dim=16, sliding_window=None)
torch.manual_seed(0)
model = MistralForCausalLM(cfg).to(torch.bfloat16).eval()
compile = lambda f: torch.compile(f, fullgraph=True, dynamic=False, backend="{backend}")
"""

MERGED = CONFIG + """
from harness.engines.fused import FusedDecoder, fuse_projections_
dec = FusedDecoder(model, fuse_projections_(model))
args = (torch.tensor([[3]]), torch.tensor([[5]]), torch.tensor([5]), torch.ones(1, 64, dtype=torch.bool),
        dec.new_cache(1, 64))
if "{way}" == "whole":
    step = compile(dec)
else:
    layer = compile(dec.layer)
    step = lambda *a: dec.head(dec.layers(*dec.prepare(*a[:4]), a[2], a[4], layer)[:, -1])
"""

NF4 = CONFIG + """
import tempfile
from peft import LoraConfig, get_peft_model
from transformers import BitsAndBytesConfig, StaticCache
from harness.engines.decoding import compile_layers_once
path = tempfile.mkdtemp()
model.save_pretrained(path)
quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
model = MistralForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.bfloat16)
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                             "gate_proj", "up_proj", "down_proj"]))
model.eval()
cache = StaticCache(config=cfg, max_cache_len=64)
with torch.inference_mode():
    model(input_ids=torch.tensor([[3, 4, 5]]), past_key_values=cache, cache_position=torch.arange(3))
if "{way}" == "nested":
    compile_layers_once(model)
forward = lambda tok, pos, at, mask: model(input_ids=tok, position_ids=pos, cache_position=at,  # noqa: E731
                                           attention_mask=mask, past_key_values=cache).logits[:, -1]
if "{way}" == "per-layer":  # each decoder layer through one compiled forward, the rest eager; graphs: how many
    import functools  # that one forward made (a layer that guards on its own index makes one a layer)
    torch._dynamo.config.cache_size_limit = 64
    layers = model.get_base_model().model.layers
    layer_step = compile(type(layers[0]).forward)
    for layer in layers:
        layer.forward = functools.partial(layer_step, layer)
    step = forward
else:
    step = compile(forward)
args = (torch.tensor([[7]]), torch.tensor([[3]]), torch.tensor([3]), torch.ones(1, 64, dtype=torch.long))
"""

TIME = """
t = time.perf_counter()
with torch.inference_mode():
    step(*args)
print(time.perf_counter() - t, counters["stats"]["unique_graphs"])
"""

WAYS = {"merged": (MERGED, ("whole", "per-layer")), "nf4": (NF4, ("whole", "nested", "per-layer"))}


def main() -> None:
    rows = []
    for step, (code, ways) in WAYS.items():
        for backend in ("inductor", "aot_eager"):
            for way in ways:
                env = {**os.environ, "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"}
                done = subprocess.run([sys.executable, "-c", (code + TIME).format(way=way, backend=backend)], env=env,
                                      capture_output=True, text=True)
                if done.returncode:  # the way cannot compile: its last error line is the finding
                    error = [line for line in done.stderr.splitlines() if line.strip()][-1]
                    rows.append({"step": step, "backend": backend, "way": way, "error": error[:300]})
                else:
                    out = done.stdout.split()
                    rows.append({"step": step, "backend": backend, "way": way,
                                 "first_call_s": round(float(out[-2]), 2), "graphs": int(out[-1])})
                print(rows[-1], flush=True)
    import torch

    result = {"probe": "compile_probe",
              "config": "Mistral, 32 layers, hidden 64, random bf16 weights (nf4: quantized, r16 LoRA)",
              "device": "cpu", "cpus": os.cpu_count(), "torch": torch.__version__,
              "git_sha": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
              "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows}
    path = os.path.join(os.environ.get("OUT", "."), "compile-probe.json")
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
