"""Inference engines on the tiny profile: the merged engine matches an independently built NF4 + adapter model,
the parity gate fails when the wrong adapter is merged, the static-cache loop reproduces ``generate``, a merge that
moves parameter storage is caught, and a recompile inside ``no_recompile()`` raises.

Every reference model is built separately (a fresh NF4 base with the adapter on top, unmerged), never the object
under test. The adapters are trained once for the file, at 8 epochs instead of the profile's 40: enough for r16
and r32 to differ far beyond the parity tolerance, in a fraction of the time.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from harness.config import load_profile
from harness.data import load_splits
from harness.decoding import HFGreedy, StaticGreedy, no_recompile
from harness.merged import MergedBase, load_nf4_with_adapter
from harness.models import load_tokenizer
from harness.parity import parity, parity_failures
from harness.prompt import encode_prompt
from harness.variants import ensure_adapter

pytestmark = pytest.mark.slow

QUICK_EPOCHS = 8


@dataclasses.dataclass
class Tiny:
    profile: object
    tokenizer: object
    cache_root: Path
    adapters: dict[str, Path]  # variant name -> its adapter/ directory
    prompts: list[list[int]]  # every evaluation prompt (profile.data.eval_splits)

    def reference(self, variant: str) -> HFGreedy:
        """The seed path, built from scratch: fresh NF4 base + the variant's adapter, unmerged, HF generate."""
        return HFGreedy(load_nf4_with_adapter(self.profile, self.adapters[variant], self.cache_root), self.tokenizer)

    def parity(self, reference, candidate) -> dict:
        inf = self.profile.inference
        return parity(reference, candidate, self.tokenizer, self.prompts, inf.parity_new_tokens,
                      self.profile.eval.batch_size)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Tiny:
    profile = load_profile("tiny")
    quick = dataclasses.replace(profile, training=dataclasses.replace(profile.training, epochs=QUICK_EPOCHS))
    splits = load_splits({s: profile.data_path(s) for s in ("train", "validation", "test")})
    runs_dir = tmp_path_factory.mktemp("runs")
    cache_root = runs_dir / "_models"
    tokenizer = load_tokenizer(profile.model, cache_root)
    adapters = {v: ensure_adapter(quick, quick.variant(v), splits, tokenizer, runs_dir)[0] / "adapter"
                for v in ("r16", "r32")}
    prompts = [encode_prompt(tokenizer, e.instruction, e.input)
               for split in profile.data.eval_splits for e in splits[split]]
    return Tiny(profile, tokenizer, cache_root, adapters, prompts)


@pytest.fixture(scope="module")
def merged(tiny) -> MergedBase:
    return MergedBase(tiny.profile, tiny.cache_root, tiny.tokenizer)


def test_merged_r16_matches_a_separately_built_nf4_r16(tiny, merged):
    merged.activate("r16", tiny.adapters["r16"])
    result = tiny.parity(tiny.reference("r16"), merged.engine)
    assert result["prompts"] == len(tiny.prompts) > 0
    assert result["token_agreement"] == 1.0, result
    assert result["max_logit_diff"] <= tiny.profile.inference.parity_max_logit_diff, result
    assert parity_failures(result, tiny.profile.inference) == []


def test_reference_nf4_base_computes_in_the_profile_dtype(tiny, merged):
    """Without an adapter, the NF4 reference and the dequantized base are the same numbers: the reference runs in
    quantization.compute_dtype (float32 here), not in bitsandbytes' bf16 CPU kernel (~5e-3 off on this model)."""
    merged.activate("baseline", None)
    reference = HFGreedy(load_nf4_with_adapter(tiny.profile, None, tiny.cache_root), tiny.tokenizer)
    result = tiny.parity(reference, merged.engine)
    assert result["token_agreement"] == 1.0, result
    assert result["max_logit_diff"] <= 1e-5, result


def test_parity_gate_fails_when_the_previous_variants_merge_is_still_in_the_weights(tiny, merged):
    """The bug this gate exists for: "r32" evaluated on weights that still hold r16's merge."""
    merged.activate("r16", tiny.adapters["r16"])
    result = tiny.parity(tiny.reference("r32"), merged.engine)
    failures = parity_failures(result, tiny.profile.inference, label="merged(r16) vs nf4+r32")
    assert failures, f"the parity gate passed a model with the wrong adapter merged: {result}"
    assert any("inference.parity_max_logit_diff" in f for f in failures), failures
    # the adapters differ far beyond rounding: the gate is not failing by a hair
    assert result["max_logit_diff"] > 100 * tiny.profile.inference.parity_max_logit_diff, result


def test_static_cache_engine_reproduces_generate_on_a_separate_nf4_model(tiny):
    inf = tiny.profile.inference
    candidate = StaticGreedy(load_nf4_with_adapter(tiny.profile, tiny.adapters["r16"], tiny.cache_root),
                             tiny.tokenizer, "nf4-compiled", inf)
    reference = tiny.reference("r16")
    assert candidate.model is not reference.model
    with no_recompile():  # nothing is compiled on the CPU: the block must still be valid around a decode
        result = tiny.parity(reference, candidate)
    assert result["token_agreement"] == 1.0, result
    assert result["identical_sequences"] == 1.0, result
    assert result["max_logit_diff"] <= 1e-5, result
    assert parity_failures(result, inf) == []


def test_activate_refuses_weights_whose_storage_moved(tiny):
    base = MergedBase(tiny.profile, tiny.cache_root, tiny.tokenizer)  # its own: this test breaks it on purpose
    base.activate("r16", tiny.adapters["r16"])
    name = "model.layers.1.mlp.down_proj.weight"
    param = dict(base.model.named_parameters())[name]
    param.data = param.data.clone()  # same values, new storage: a compiled graph would still read the old one
    with pytest.raises(RuntimeError, match=rf"{name}.*stale weights"):
        base.activate("r32", tiny.adapters["r32"])
    assert base.active is None


def test_parity_failures_name_value_threshold_and_profile_key():
    inf = load_profile("tiny").inference
    ok = {"prompts": 3, "new_tokens": 32, "token_agreement": 1.0, "max_logit_diff": 0.0}
    assert parity_failures(ok, inf) == []
    bad = {**ok, "token_agreement": 0.5, "max_logit_diff": 0.25}
    failures = parity_failures(bad, inf, label="merged vs seed")
    assert len(failures) == 2
    assert "0.25" in failures[0] and "inference.parity_max_logit_diff" in failures[0]
    assert f"{inf.parity_max_logit_diff:g}" in failures[0]
    assert "0.500" in failures[1] and "inference.parity_min_agreement" in failures[1]
    assert all(f.startswith("merged vs seed: ") for f in failures)
    assert len(parity_failures({**ok, "max_logit_diff": float("nan")}, inf)) == 1


def test_recompile_inside_no_recompile_raises():
    @torch.compile(backend="eager", dynamic=False)
    def step(x):
        return x * 2 + 1

    step(torch.ones(2))
    with no_recompile():
        step(torch.ones(2))  # the compiled shape: no recompile, no error
        with pytest.raises(torch._dynamo.exc.RecompileError, match="Recompiling function step"):
            step(torch.ones(3))
    assert step(torch.ones(3)).tolist() == [3.0, 3.0, 3.0]  # outside the block a recompile is allowed again
