"""Merge-rounding probe (CPU): how far a bf16 merge alone moves SmolLM2's logits from the seed path, by rank, with no
gemv.cu in the path. The question from results/h100/smollm2-135m-bf16/cf91d8a-parity-fail/: r32's max |logit diff|
5.22 over ``inference.parity_max_logit_diff`` 3.0, the errors growing with rank on gemv.cu's engine.

Adapters are trained by the fp32 profile (``smollm2-135m``: the same recipe, data and seed as the bf16 one; bf16
training on 2 cores takes hours), then each is checked as the bf16 profile checks it: the merged engine (NF4 base
dequantized to bf16, the adapter merged in bf16, ``FusedDecoder``'s eager steps: the CPU's matmuls) against the
seed path (NF4 computing in bf16, the adapter unmerged), ``harness.measure.parity`` on every evaluation prompt.

  OUT=results/cpu python .ci/merge_rounding_probe.py      # ~30 minutes on 2 cores (31 min with another job beside it)

Writes $OUT/merge-rounding-probe.json after each variant.
"""

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.getcwd())
from harness.config.profiles import load_profile  # noqa: E402
from harness.engines.decoding import HFGreedy  # noqa: E402
from harness.engines.merged import MergedBase  # noqa: E402
from harness.measure.memory import free_memory  # noqa: E402
from harness.measure.parity import parity  # noqa: E402
from harness.models.nf4 import load_nf4_with_adapter  # noqa: E402
from harness.report.atomic import atomic_write_text  # noqa: E402
from harness.report.provenance import git_sha  # noqa: E402
from harness.sweep import Sweep  # noqa: E402
from harness.train.trainer import peft_dir  # noqa: E402

KEYS = ("max_logit_diff", "engine_error_rms", "adapter_effect_rms", "relative_error", "token_agreement",
        "token_agreement_exact", "near_ties", "max_abs_logit")


def main() -> None:
    start = time.time()
    trainer = Sweep.prepare("smollm2-135m", session_id=f"merge-rounding-{int(start)}")
    trainer.train_selected()
    bf16 = load_profile("smollm2-135m-bf16")
    cache_root, prompts, inf = trainer.runs_dir / "_models", trainer.eval_prompts(), bf16.inference
    merged = MergedBase(bf16, cache_root, trainer.tokenizer)
    out = {"probe": "merge_rounding_probe", "trained_by": "smollm2-135m", "checked_as": bf16.name, "device": "cpu",
           "git_sha": git_sha(),
           "engine_note": merged.engine.note, "prompts": len(prompts), "variants": {}}
    path = Path(os.environ.get("OUT", ".")) / "merge-rounding-probe.json"
    for name in bf16.variants:
        adapter = None if bf16.variant(name).is_baseline else peft_dir(trainer.adapter(name)[0])
        merged.activate(name, adapter)
        reference = HFGreedy(load_nf4_with_adapter(bf16, adapter, cache_root), trainer.tokenizer)
        result = parity(reference, merged.engine, trainer.tokenizer, prompts, inf.parity_new_tokens,
                        bf16.eval.batch_size, inf.parity_tie_logits)
        out["variants"][name] = {k: result.get(k) for k in KEYS}
        out["wall_s"] = round(time.time() - start, 1)
        print(name, json.dumps(out["variants"][name]), flush=True)
        atomic_write_text(path, json.dumps(out, indent=1) + "\n")  # rewritten a variant at a time
        del reference
        free_memory()


if __name__ == "__main__":
    main()
