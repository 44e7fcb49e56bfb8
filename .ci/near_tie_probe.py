"""Near-tie probe (CPU): where the merged engine's greedy tokens part from the seed path's choices on SmolLM2's
baseline in bf16 (profile smollm2-135m-bf16, no adapter), how far below its own choice the seed path scores the
engine's token there (``HFGreedy.teacher_forced``'s deficits), and the token agreement for several
``inference.parity_tie_logits``. What the bf16 profiles' tolerance was chosen from (harness/measure/parity.py).

  OUT=results/cpu python .ci/near_tie_probe.py      # about 30 minutes on 2 cores (bf16 decoding on the CPU)

Writes $OUT/near-tie-probe.json.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.getcwd())
from harness.config.profiles import load_profile  # noqa: E402
from harness.data.dataset import load_splits  # noqa: E402
from harness.data.prompt import encode_prompt  # noqa: E402
from harness.engines.decoding import HFGreedy  # noqa: E402
from harness.engines.merged import MergedBase  # noqa: E402
from harness.measure.parity import agreement_past_near_ties, token_agreement  # noqa: E402
from harness.models.base import load_tokenizer  # noqa: E402
from harness.models.nf4 import load_nf4_with_adapter  # noqa: E402
from harness.report.atomic import atomic_write_text  # noqa: E402

TOLERANCES = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0)


def main() -> None:
    start = time.time()
    profile = load_profile("smollm2-135m-bf16")
    cache_root = Path("runs/_models")
    tokenizer = load_tokenizer(profile.model, cache_root)
    splits = load_splits({s: profile.data_path(s) for s in ("train", "validation", "test")})
    prompts = [encode_prompt(tokenizer, e.instruction, e.input) for s in profile.data.eval_splits for e in splits[s]]
    merged = MergedBase(profile, cache_root, tokenizer)
    merged.activate("baseline", None)
    reference = HFGreedy(load_nf4_with_adapter(profile, None, cache_root), tokenizer)
    tokens = merged.engine.generate(prompts, profile.inference.parity_new_tokens, 1)
    rows = []
    for prompt, own in zip(prompts, tokens, strict=True):
        choices, deficits, _ = reference.teacher_forced(prompt, own)
        rows.append({"exact": token_agreement([choices], [own]), "deficits": deficits})
    out = {"probe": "near_tie_probe", "profile": profile.name, "variant": "baseline", "device": "cpu",
           "prompts": len(prompts), "new_tokens": profile.inference.parity_new_tokens,
           "git_sha": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
           "token_agreement_exact": sum(r["exact"] for r in rows) / len(rows),
           "first_difference_deficits": [next((d for d in r["deficits"] if d > 0), None) for r in rows],
           "positive_deficits": sorted(d for r in rows for d in r["deficits"] if d > 0),
           "agreement_by_tie_logits": {}, "wall_s": None}
    for tie in TOLERANCES:
        shares = [agreement_past_near_ties(r["deficits"], tie) for r in rows]
        out["agreement_by_tie_logits"][str(tie)] = {"token_agreement": sum(s for s, _ in shares) / len(shares),
                                                     "near_ties": sum(n for _, n in shares)}
    out["wall_s"] = round(time.time() - start, 1)
    path = Path(os.environ.get("OUT", ".")) / "near-tie-probe.json"
    atomic_write_text(path, json.dumps(out, indent=1) + "\n")
    print(json.dumps(out["agreement_by_tie_logits"]), out["positive_deficits"], f"{out['wall_s']} s")


if __name__ == "__main__":
    main()
