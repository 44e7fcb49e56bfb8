"""Parity probe (issue 17): is the merged engine's logit error against the seed path gemv.cu's, or the merge's?

At cf91d8a SmolLM2's r32 failed ``inference.parity_max_logit_diff`` (5.22 against 3.0; rms 0.275, relative 0.027 under
0.10) on an H100, and the adapters' errors grew with rank (0.220 / 0.239 / 0.275) where cuBLAS's engine, on adapters
trained before the EOS fix, read 0.198-0.212 flat (results/h100/smollm2-135m-bf16/cf91d8a-parity-fail/). This takes
each variant the way the sweep does (the same adapters, trained or reused from ``runs/``; the same merged base) and
teacher-forces the merged engine's own greedy tokens through three decoders on those merged weights: gemv.cu's
(``GemvDecoder``, as shipped), cuBLAS's (``FusedDecoder``, compiled the same way) and the model's plain forward
(``HFGreedy``, no decode step), each against the seed path (a fresh NF4 base with the adapter unmerged). If cuBLAS's
error is gemv.cu's, the kernel is as exact as cuBLAS and the error is the merge's; the plain forward separates the
decode step from both. Not part of the harness: run it after ``bash .ci/gpu smollm2-bf16`` on the same machine.

  OUT=/tmp/probe python .ci/parity_probe.py [profile]      (default smollm2-135m-bf16; ``tiny`` runs on the CPU)

Writes $OUT/parity-probe.json (after every variant) and prints one line a variant.
"""

import json
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.getcwd())
from harness.engines.decoding import HFGreedy  # noqa: E402
from harness.engines.fused import FusedDecoder, FusedGreedy  # noqa: E402
from harness.measure.memory import free_memory  # noqa: E402
from harness.models.nf4 import load_nf4_with_adapter  # noqa: E402
from harness.report.atomic import atomic_write_text  # noqa: E402
from harness.report.provenance import git_sha  # noqa: E402
from harness.sweep import Sweep  # noqa: E402
from harness.train.trainer import peft_dir  # noqa: E402

OUT = Path(os.environ.get("OUT", "/tmp"))


def errors(reference: list[torch.Tensor], candidate: list[torch.Tensor]) -> dict:
    """rms and max |difference| pooled over every teacher-forced logit, and where the max is (prompt, row)."""
    square, count, worst = 0.0, 0, (0.0, None, None)
    for i, (a, b) in enumerate(zip(reference, candidate, strict=True)):
        d = (a - b).abs()
        square += d.double().pow(2).sum().item()
        count += d.numel()
        if d.max().item() > worst[0]:
            worst = (d.max().item(), i, int(d.max(dim=-1).values.argmax()))
    return {"rms": math.sqrt(square / count), "max": worst[0], "max_at_prompt": worst[1], "max_at_row": worst[2]}


def main(profile: str) -> None:
    sweep = Sweep.prepare(profile, session_id=f"parity-probe-{int(time.time())}")
    sweep.train_selected()
    prompts, inf = sweep.eval_prompts(), sweep.profile.inference
    results = {"profile": profile, "git_sha": git_sha(), "torch": torch.__version__, "variants": {},
               "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    others = None  # built once: the merged base merges each variant into the same tensors, as the shipped engine's
    for name in sweep.profile.variants:
        loaded = sweep.load(name)
        merged = sweep.state.merged
        tokens = loaded.engine.generate(prompts, inf.parity_new_tokens, sweep.profile.eval.batch_size)
        others = others or {"cublas": FusedGreedy(merged.model, FusedDecoder(merged.model, merged.projections),
                                                  sweep.tokenizer, "cublas", inf),
                            "plain": HFGreedy(merged.model, sweep.tokenizer)}
        decoders = {"shipped": loaded.engine, **others}
        logits = {k: [e.forced_logits(p, t) for p, t in zip(prompts, tokens, strict=True)]
                  for k, e in decoders.items()}
        adapter = None if loaded.variant.is_baseline else peft_dir(sweep.adapter(name)[0])
        reference = HFGreedy(load_nf4_with_adapter(sweep.profile, adapter, sweep.runs_dir / "_models"),
                             sweep.tokenizer)
        seed = [reference.forced_logits(p, t) for p, t in zip(prompts, tokens, strict=True)]
        decoder = getattr(loaded.engine, "decoder", loaded.engine)  # StaticGreedy (not fused) has none
        row = {"engine_note": loaded.engine.note, "decoder": type(decoder).__name__,
               **{f"{k}_vs_seed": errors(seed, v) for k, v in logits.items()},
               "shipped_vs_cublas": errors(logits["cublas"], logits["shipped"])}
        results["variants"][name] = row
        print(name, row["decoder"], "; ".join(f"{k} rms {v['rms']:.3g} max {v['max']:.3g}"
                                              for k, v in row.items() if isinstance(v, dict)), flush=True)
        atomic_write_text(OUT / "parity-probe.json", json.dumps(results, indent=1))  # rewritten a variant at a time
        del reference, decoders, logits, seed
        free_memory()
    sweep.close()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m-bf16")
