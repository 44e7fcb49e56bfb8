"""QLoRA training-step benchmark: one packed row of ``--tokens`` tokens, LoRA on the profile's base, several setups.

    python -m harness.bench.train --profile synthetic-7b --variant r16 --tokens 2048 --out runs/train_bench.json

Each setup loads the base afresh, applies peft the way trl does for a quantized model
(``prepare_model_for_kbit_training`` then ``get_peft_model``), and times ``steps`` optimizer steps after
``warmup`` untimed ones. The row is the train split tokenized in Mistral's format and packed end to end with
restarting position ids, as trl's BFD packing does. Setups:

  seed           gradient checkpointing on every layer, bf16 autocast (the seed's recipe; ``training.step: eager``)
  compiled       ``training.step: compiled``, the harness's own call (harness/train/layer_compile.py): compiled
                 layers, checkpoint inside the graph, flex attention on CUDA
  ckpt-skip-N    checkpointing off on the last N layers (memory for speed)
  no-dropout     lora_dropout 0 (peft skips the dropout copy of every adapter input)
  no-kbit-prep   skip prepare_model_for_kbit_training (norms and embeddings stay bf16, not fp32)
  compile-layers torch.compile each decoder layer (regional compilation: one graph serves all 32; fuses the
                 casts and LoRA elementwise work, fewer kernel launches); transformers' checkpointing wraps it
  ckpt-inside    compiled layers with the checkpoint inside the compiled region (harness/train/layer_compile.py)
  save-matmuls   compiled layers, selective checkpointing: matmul and attention outputs kept, the rest recomputed
  no-ckpt        compiled layers, no checkpointing (memory for speed)
  cudagraphs     compiled layers replayed as CUDA graphs (mode="reduce-overhead")
  flex           attention through flex_attention: the packed row's block-diagonal mask skips the blocks between
                 examples, where sdpa computes the whole causal square under a dense mask
  a+b            both changes

Compile time lands in the warm-up steps: ``pays_after_steps`` is how many steps the saving per step takes to repay
the extra warm-up over the seed's. A setup that raises is recorded with its error and the next one runs.
The results (step time, tokens/s, peak allocated and reserved memory, graph count and breaks, and for every setup a
profiler table of one step with its GPU busy time) are written as JSON; docs/performance.md records what they
showed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
import traceback
from pathlib import Path

import torch
from torch._dynamo.utils import counters

from ..config.profiles import load_profile
from ..data.dataset import load_splits
from ..data.prompt import training_rows
from ..measure.memory import free_memory
from ..models.base import load_base, load_tokenizer, peft_config
from ..models.revision import pin_revision
from ..report.atomic import atomic_write_json
from ..report.provenance import provenance
from ..train.layer_compile import compile_decoder_layers, use_compiled_step
from ..train.oom import is_out_of_memory

__all__ = ["SETUPS", "packed_row", "run_setup", "main"]

SETUPS = ("seed", "compiled")
FEATURES = ("seed", "compiled", "no-dropout", "no-kbit-prep", "compile-layers", "ckpt-inside", "save-matmuls",
            "no-ckpt", "cudagraphs", "flex")
_CHECKPOINTING = {"ckpt-inside": "inside", "save-matmuls": "save-matmuls", "no-ckpt": "none"}


def packed_row(profile, tokenizer, tokens: int) -> dict[str, torch.Tensor]:
    splits = load_splits({s: profile.data_path(s) for s in ("train", "validation", "test")})
    rows = training_rows(tokenizer, splits["train"], profile.training.max_length)
    ids, pos, labels = [], [], []
    while len(ids) < tokens:
        for r in rows:
            ids += r["input_ids"]
            pos += list(range(len(r["input_ids"])))
            labels += [t if m else -100 for t, m in zip(r["input_ids"], r["completion_mask"], strict=True)]
    as_t = lambda xs: torch.tensor([xs[:tokens]])  # noqa: E731
    return {"input_ids": as_t(ids), "position_ids": as_t(pos), "labels": as_t(labels)}


def run_setup(profile, variant, name: str, batch: dict, steps: int, warmup: int, profile_kernels: bool) -> dict:
    from peft import get_peft_model, prepare_model_for_kbit_training

    lora = profile.lora
    features = set(name.split("+"))
    torch._dynamo.reset()  # each setup compiles afresh: another setup's graphs and recompile budget never carry over
    if "no-dropout" in features:
        lora = dataclasses.replace(lora, dropout=0.0)
    cache_root = Path("runs") / "_models"
    model = load_base(profile.model, profile.quantization, cache_root)
    model.config.use_cache = False
    if "flex" in features:
        model.set_attn_implementation("flex_attention")
    if "no-kbit-prep" not in features:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, peft_config(lora, variant))
    for feature in features:
        if feature.startswith("ckpt-skip-"):
            layers = model.base_model.model.model.layers
            for layer in layers[len(layers) - int(feature.rsplit("-", 1)[1]):]:
                layer.gradient_checkpointing = False
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(getattr(torch, profile.training.adapter_dtype))
    placement = next((_CHECKPOINTING[f] for f in features if f in _CHECKPOINTING), "outside")
    if "compiled" in features:
        placement = "inside"
        use_compiled_step(model.get_base_model(), gradient_checkpointing=True)
    elif features & {"compile-layers", "cudagraphs", *_CHECKPOINTING}:
        compile_decoder_layers(model.base_model.model.model.layers, placement, cudagraphs="cudagraphs" in features)
    mark_step = torch.compiler.cudagraph_mark_step_begin if "cudagraphs" in features else (lambda: None)
    model.train()
    dev = next(model.parameters()).device
    batch = {k: v.to(dev) for k, v in batch.items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=profile.training.learning_rate)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=profile.training.mixed_precision == "bf16")

    def step():
        mark_step()
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    counters.clear()
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    warmup_s = time.perf_counter() - t0
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    tokens = batch["input_ids"].numel()
    out = {"setup": name, "step_s_median": times[len(times) // 2], "step_s_min": times[0],
           "tokens": tokens, "tokens_per_s": tokens / times[len(times) // 2], "loss": float(loss),
           "steps": steps, "lora_dropout": lora.dropout, "warmup_s": warmup_s, "checkpointing": placement,
           "attn_implementation": model.config._attn_implementation, "total_s": warmup_s + sum(times),
           "graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values())}
    if dev.type == "cuda":  # CUDA graphs replay into a private pool that counts as reserved, not allocated
        out["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    if profile_kernels:
        from torch.profiler import ProfilerActivity, profile as torch_profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with torch_profile(activities=acts) as prof:
            step()
            sync()
        key = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
        events = prof.key_averages()
        out["profile_top"] = events.table(sort_by=key, row_limit=25)
        if dev.type == "cuda":  # kernel time: the step is launch-bound while this is well below step_s_median
            kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
            out["profiled_gpu_busy_s"] = sum(e.self_device_time_total for e in kernels) / 1e6
    del model, opt
    free_memory()
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="synthetic-7b")
    ap.add_argument("--variant", default="r16")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--setups", default=",".join(SETUPS))
    ap.add_argument("--out", type=Path, default=Path("runs/train_bench.json"))
    args = ap.parse_args(argv)
    profile = pin_revision(load_profile(args.profile))  # a folder source keyed by its content (nf4_store)
    tokenizer = load_tokenizer(profile.model, Path("runs") / "_models")
    batch = packed_row(profile, tokenizer, args.tokens)
    results = {"profile": profile.name, "variant": args.variant, "tokens": args.tokens, **provenance(), "setups": []}
    for name in args.setups.split(","):
        unknown = [f for f in name.split("+") if f not in FEATURES and not f.startswith("ckpt-skip-")]
        if unknown:
            ap.error(f"unknown setup feature(s) {unknown} in {name!r}; known: {list(FEATURES)} and ckpt-skip-N")
    for name in args.setups.split(","):
        error = None
        try:
            r = run_setup(profile, profile.variant(args.variant), name, batch, args.steps, args.warmup,
                          profile_kernels=True)
        except Exception as e:  # noqa: BLE001 - a setup that fails is a result; the next setup still runs
            error = (f"out of memory: {str(e).splitlines()[0]}" if is_out_of_memory(e)
                     else "".join(traceback.format_exception(e)[-6:]))
        if error:  # freed outside the except: its traceback would keep the failed setup's model alive
            free_memory()
            r = {"setup": name, "error": error}
        results["setups"].append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "profile_top"}), flush=True)
        atomic_write_json(args.out, results)
    seed = next((r for r in results["setups"] if r["setup"] == "seed" and "tokens_per_s" in r), None)
    if seed:
        for r in results["setups"]:
            if "tokens_per_s" in r:
                r["speedup_vs_seed"] = r["tokens_per_s"] / seed["tokens_per_s"]
                saving = seed["step_s_median"] - r["step_s_median"]
                if r is not seed and saving > 0:
                    r["pays_after_steps"] = math.ceil(max(0.0, r["warmup_s"] - seed["warmup_s"]) / saving)
        atomic_write_json(args.out, results)
        print(seed.get("profile_top", ""))


if __name__ == "__main__":
    main()
