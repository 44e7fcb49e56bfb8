"""Training mechanics: optimizer-step arithmetic, the degenerate-recipe warning, packed-row isolation, the 7B
trainable-parameter counts, and the content-hash cache (reuse, no key collisions, no partial artifacts)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from harness.config.profiles import config_hash, load_profile
from harness.data.dataset import load_splits
from harness.data.prompt import training_rows, v3_tokenizer
from harness.models.base import lora_trainable_params, synthetic_config
from harness.train.adapters import artifact_key, ensure_adapter
from harness.train.trainer import DegenerateRecipeWarning, _check_recipe, optimizer_steps

# The 7B shape, all 7 targets: 2,621,440 trainable params per unit of rank.
SEVEN_B_TRAINABLE = [("r8", 20_971_520), ("r16", 41_943_040), ("r32", 83_886_080)]


@pytest.fixture(scope="module")
def tiny():
    return load_profile("tiny")


@pytest.fixture(scope="module")
def tiny_splits(tiny):
    return load_splits({s: tiny.data_path(s) for s in ("train", "validation", "test")})


@pytest.mark.parametrize(("variant", "expected"), SEVEN_B_TRAINABLE, ids=[v for v, _ in SEVEN_B_TRAINABLE])
def test_7b_shape_trainable_params_match_peft(variant, expected):
    profile = load_profile("synthetic-7b")
    assert lora_trainable_params("mistral-7b", profile.lora, profile.variant(variant)) == expected


def test_7b_shape_has_7_248b_params():
    from transformers import MistralForCausalLM

    with torch.device("meta"):
        model = MistralForCausalLM(synthetic_config("mistral-7b"))
    assert sum(p.numel() for p in model.parameters()) == 7_248_023_552


@pytest.mark.parametrize(("rows", "batch", "accum", "epochs", "steps"),
                         [(1, 1, 8, 3, 3), (20, 4, 1, 40, 200), (20, 1, 8, 3, 9), (21, 4, 2, 1, 3)])
def test_optimizer_steps_follow_the_trainer(rows, batch, accum, epochs, steps):
    assert optimizer_steps(rows, batch, accum, epochs) == steps


def test_seed_recipe_warns_that_it_is_degenerate(tiny_splits):
    """The seed's packing + grad-accum 8 on 20 short examples packs into one row: 3 optimizer steps in 3 epochs."""
    profile = load_profile("mistral-7b")
    rows = training_rows(v3_tokenizer(), tiny_splits["train"], profile.training.max_length)
    with pytest.warns(DegenerateRecipeWarning, match=r"only 3 optimizer step.*packing: false"):
        packing, n_rows, steps = _check_recipe(profile, rows)
    assert (packing, n_rows, steps) == (True, 1, 3)


@pytest.mark.parametrize("attention", ["sdpa", "flex_attention"])
def test_packed_examples_do_not_attend_to_each_other(attention):
    """Logits of two examples packed in one row (position ids restart, no mask) equal their logits alone, with the
    attention of the eager step (sdpa) and of the compiled one on CUDA (flex_attention)."""
    from transformers import MistralForCausalLM

    torch.manual_seed(0)
    model = MistralForCausalLM(synthetic_config("tiny")).eval()
    model.set_attn_implementation(attention)
    a, b = torch.randint(5, 32000, (1, 7)), torch.randint(5, 32000, (1, 5))
    packed = torch.cat([a, b], dim=1)
    pos = torch.cat([torch.arange(7), torch.arange(5)]).unsqueeze(0)
    with torch.no_grad():
        joint = model(input_ids=packed, position_ids=pos, use_cache=False).logits
        alone_b = model(input_ids=b, use_cache=False).logits
    torch.testing.assert_close(joint[:, 7:], alone_b, atol=1e-4, rtol=1e-4)


def test_artifact_keys_differ_across_variants_and_data(tiny, tiny_splits):
    """A cache that can hand r8's adapter to r16, or one trained on other data, is a bug."""
    train = tiny_splits["train"]
    edited = [dataclasses.replace(train[0], output=train[0].output + " x"), *train[1:]]
    keys = {
        config_hash(artifact_key(tiny, tiny.variant(v), data))
        for v in ("r8", "r16", "r32") for data in (train, edited)
    }
    assert len(keys) == 6
    lr = dataclasses.replace(tiny, training=dataclasses.replace(tiny.training, learning_rate=1e-3))
    assert config_hash(artifact_key(lr, tiny.variant("r16"), train)) not in keys


@pytest.mark.slow
def test_second_run_reuses_the_artifact_and_never_loads_a_partial_one(tiny, tiny_splits, tmp_path):
    quick = dataclasses.replace(tiny, training=dataclasses.replace(tiny.training, epochs=1, min_optimizer_steps=0))
    variant = quick.variant("r8")
    tok = v3_tokenizer()
    # A killed writer leaves a .tmp-* dir: it must be swept, never loaded.
    path, manifest = ensure_adapter(quick, variant, tiny_splits, tok, tmp_path)
    partial = path.parent / f".tmp-{path.name}-killed"
    partial.mkdir()
    again_path, again = ensure_adapter(quick, variant, tiny_splits, tok, tmp_path)
    assert again_path == path and again["train_finished"] == manifest["train_finished"]
    log = (tmp_path / quick.name / "train.log").read_text().splitlines()
    assert [line.split()[2] for line in log] == ["train-start", "train-done", "reuse"]
    done = dict(kv.split("=") for kv in log[1].split()[4:])  # where the training's seconds went, beside its steps
    parts = dict(kv.split(":") for kv in done.pop("prepare_parts").split(","))
    assert list(done) == ["wall_s", "prepare_s", "save_s"] and all(float(v) >= 0 for v in done.values()), log[1]
    assert list(parts) == ["data", "trainer", "adapter", "mask", "memory"], log[1]
    assert abs(sum(map(float, parts.values())) - float(done["prepare_s"])) <= 0.3, log[1]  # five 0.1 s roundings
    on_disk = json.loads((path / "manifest.json").read_text())
    for key in ("key_hash", "versions", "git_sha", "device", "seed", "train_wall_s", "train_prepare_s",
                "train_save_s", "train_tokens_per_s", "loss_history", "optimizer_steps", "train_memory", "config_hash"):
        assert key in on_disk, f"manifest lacks {key!r}"
    assert (path / "config.yaml").is_file() and (path / "adapter" / "adapter_model.safetensors").is_file()
    # The same recipe copied under a new profile name (a user's own copy) reuses the adapter instead of training.
    copy = dataclasses.replace(quick, name="my-copy", description="my copy of tiny")
    copy_path, copy_manifest = ensure_adapter(copy, copy.variant("r8"), tiny_splits, tok, tmp_path)
    assert copy_path == path and copy_manifest["train_finished"] == manifest["train_finished"]
    log = (tmp_path / "my-copy" / "train.log").read_text().splitlines()
    assert [line.split()[2:] for line in log] == [["reuse", f"{quick.name}/{path.name}"]]


@pytest.mark.slow
@pytest.mark.parametrize("packing", [False, True], ids=["batches", "packed"])
def test_compiled_step_trains_like_the_eager_one(tiny, tiny_splits, tmp_path, packing):
    """training.step: compiled (compiled layers, the checkpoint inside the graph, every batch padded to one shape,
    flex attention on CUDA) changes speed, not the training: the same losses as the eager step, step by step. LoRA
    dropout is off here, because compiled and eager code draw different masks; with it off the two differ by float
    rounding only (1e-7 apart). A compiled step that sent a wrong gradient (odd hidden channels cut from the
    backward: relative loss differences up to 8e-3) or a wrong loss would part from the eager losses."""
    from torch._dynamo.utils import counters

    tok = v3_tokenizer()
    losses, manifests = {}, {}
    counters.clear()
    for step in ("eager", "compiled"):
        recipe = dataclasses.replace(tiny.training, epochs=3 if packing else 1, min_optimizer_steps=0, logging_steps=1,
                                     step=step, gradient_checkpointing=True, packing=packing)
        quick = dataclasses.replace(tiny, training=recipe, lora=dataclasses.replace(tiny.lora, dropout=0.0))
        _, manifests[step] = ensure_adapter(quick, quick.variant("r8"), tiny_splits, tok, tmp_path / step)
        losses[step] = [h["loss"] for h in manifests[step]["loss_history"]]
    assert counters["stats"]["unique_graphs"] >= 1, "step: compiled compiled nothing"
    assert counters["graph_break"].total() == 0, f"the compiled layer breaks its graph: {dict(counters['graph_break'])}"
    want_attention = "flex_attention" if torch.cuda.is_available() else tiny.model.attn_implementation
    assert manifests["compiled"]["train_attn_implementation"] == want_attention
    assert len(losses["compiled"]) == len(losses["eager"]) == manifests["eager"]["optimizer_steps"] > 1
    # measured: 1e-7 apart (CPU, torch 2.11 and 2.13)
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-5)
