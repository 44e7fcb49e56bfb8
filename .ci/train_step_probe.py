"""Probe: does ``training.step: compiled`` train through trl (the harness's own trainer) on this machine?

    python .ci/train_step_probe.py [--placements inside,save-matmuls] [--attention flex|model] [--precisions fp32,bf16]

For each checkpoint placement and precision it trains the tiny profile's r8 adapter for one epoch through
``ensure_adapter`` (trl's SFTTrainer), eager and compiled, in fresh temporary folders, and prints one JSON line each:
the losses, or the error. ``--attention model`` keeps the model's own attention in the compiled step (no flex).
Written to find why the trainer's path failed on the H200 where ``harness.bench.train``'s loop did not
(docs/performance.md, issue 19, tries 4-5).
"""

import argparse
import dataclasses
import json
import tempfile
import traceback
from pathlib import Path

import torch

import harness.train.layer_compile as layer_compile
import harness.train.trainer as trainer
from harness.config.profiles import load_profile
from harness.data.dataset import load_splits
from harness.data.prompt import v3_tokenizer
from harness.train.adapters import ensure_adapter

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--placements", default="inside,save-matmuls")
ap.add_argument("--attention", choices=("flex", "model"), default="flex")
ap.add_argument("--precisions", default="fp32,bf16")
args = ap.parse_args()

tiny = load_profile("tiny")
splits = load_splits({s: tiny.data_path(s) for s in ("train", "validation", "test")})
tok = v3_tokenizer()
compile_layers = layer_compile.compile_decoder_layers
for placement in args.placements.split(","):
    def compiled_step(model, checkpointing, placement=placement):
        if args.attention == "flex" and model.device.type == "cuda":
            model.set_attn_implementation("flex_attention")
        if checkpointing:
            model.enable_input_require_grads()
        compile_layers(model.model.layers, placement if checkpointing else "none")
        return model.config._attn_implementation

    trainer.use_compiled_step = compiled_step
    for precision in args.precisions.split(","):
        for step in ("eager", "compiled"):
            torch._dynamo.reset()
            extra = {} if precision == "fp32" else {"mixed_precision": "bf16", "adapter_dtype": "bfloat16"}
            recipe = dataclasses.replace(tiny.training, epochs=1, min_optimizer_steps=0, logging_steps=1, step=step,
                                         gradient_checkpointing=True, **extra)
            profile = dataclasses.replace(tiny, training=recipe)
            try:
                _, manifest = ensure_adapter(profile, profile.variant("r8"), splits, tok, Path(tempfile.mkdtemp()))
                result = {"losses": [round(h["loss"], 5) for h in manifest["loss_history"]],
                          "attn": manifest.get("train_attn_implementation")}
            except Exception as e:  # noqa: BLE001 - a failure is this probe's finding
                result = {"error": "".join(traceback.format_exception_only(e))[-300:]}
            print(json.dumps({"placement": placement, "precision": precision, "step": step, **result}), flush=True)
