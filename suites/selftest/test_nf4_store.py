"""The 4-bit base quantized once and read back from ``runs/_models/nf4-<key>/`` (harness/models/nf4_store.py): the
same model as one quantized afresh, bit for bit, and never loaded under another key."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import harness.models.keyed_folder as keyed_folder
import harness.models.nf4_store as nf4_store
from harness.config.profiles import config_hash, load_profile
from harness.models.base import bnb_config, load_base, resolve_source
from harness.models.nf4 import disable_cpu_bf16_4bit_kernel
from harness.report import provenance


@pytest.fixture
def counted(monkeypatch):
    """The calls that quantize, by the folder they were written to."""
    made, real = [], keyed_folder.save_pretrained
    monkeypatch.setattr(keyed_folder, "save_pretrained", lambda model, tmp: made.append(tmp) or real(model, tmp))
    return made


def _fresh(profile, root):
    """The base quantized from its bf16 checkpoint at load, as every load did before the store."""
    from transformers import AutoModelForCausalLM

    q = profile.quantization
    model = AutoModelForCausalLM.from_pretrained(
        resolve_source(profile.model, root), quantization_config=bnb_config(q), dtype=getattr(torch, q.compute_dtype),
        attn_implementation=profile.model.attn_implementation, device_map={"": "cpu"})
    return model.eval()


def test_the_stored_base_is_the_freshly_quantized_one_bit_for_bit(tmp_path, counted):
    """Packed weights, absmax, quant maps and the nested constants; buffers with their dtypes (RoPE's ``inv_freq``
    stays float32); the 4-bit modules; the logits. The first load writes the folder, the second only reads it. The
    store quantizes the synthetic base from its drawn weights in memory, writing no bf16 checkpoint; the reference
    quantizes the checkpoint written to disk, so the two paths must give the same model."""
    from bitsandbytes.nn import Linear4bit

    profile, root = load_profile("tiny"), tmp_path / "_models"
    first = load_base(profile.model, profile.quantization, root)
    second = load_base(profile.model, profile.quantization, root)
    assert len(counted) == 1
    assert not list(root.glob("synthetic-*")), "the store's build wrote the bf16 checkpoint"
    fresh = _fresh(profile, root)
    expected = fresh.state_dict()
    assert any(name.endswith("weight.nested_absmax") for name in expected)  # double quantization is in the dict
    for model in (first, second):
        state = model.state_dict()
        assert state.keys() == expected.keys()
        for name, tensor in expected.items():
            assert state[name].dtype == tensor.dtype and torch.equal(state[name], tensor), name
        buffers, want = dict(model.named_buffers()), dict(fresh.named_buffers())
        assert buffers.keys() == want.keys() and buffers
        for name, buffer in want.items():
            assert buffers[name].dtype == buffer.dtype and torch.equal(buffers[name], buffer), name
        assert [type(m) for m in model.modules()] == [type(m) for m in fresh.modules()]
        assert sum(isinstance(m, Linear4bit) for m in model.modules()) == 14
    x = torch.tensor([[1, 5, 9, 200, 3000, 17, 4]])
    logits = []
    for model in (fresh, first, second):
        disable_cpu_bf16_4bit_kernel(model)
        with torch.no_grad():
            logits.append(model(x).logits)
    assert torch.equal(logits[0], logits[1]) and torch.equal(logits[0], logits[2])


def test_a_folder_of_another_key_is_never_loaded_and_a_superseded_one_is_removed(tmp_path, counted, monkeypatch):
    profile, root = load_profile("tiny"), tmp_path / "_models"
    load_base(profile.model, profile.quantization, root)
    folder = nf4_store.folder(root, config_hash(nf4_store.key_parts(profile.model, profile.quantization, "cpu")))
    key_file = folder / "key.json"
    key_file.write_text(json.dumps({**json.loads(key_file.read_text()), "key": "0" * 64}))
    load_base(profile.model, profile.quantization, root)
    assert len(counted) == 2 and folder.is_dir()
    with monkeypatch.context() as m:
        m.setattr(nf4_store, "library_versions", lambda: {**provenance.library_versions(), "bitsandbytes": "0.0.1"})
        load_base(profile.model, profile.quantization, root)
    assert len(counted) == 3 and not folder.exists()  # the other bitsandbytes' folder replaced this one
    assert len(list(root.glob("nf4-*"))) == 1


@pytest.mark.parametrize("change", ["code", "torch", "transformers", "bitsandbytes", "quantization", "base", "device"])
def test_the_nf4_key_follows_code_libraries_quantization_base_and_device(monkeypatch, tmp_path, change):
    profile, device_type = load_profile("tiny"), "cpu"
    q = profile.quantization
    before = config_hash(nf4_store.key_parts(profile.model, q, device_type))
    if change == "code":
        edited = tmp_path / "base.py"
        edited.write_text("# an edited loader\n")
        monkeypatch.setattr(nf4_store, "KEY_SOURCES", nf4_store.KEY_SOURCES + (edited,))
    elif change in ("torch", "transformers", "bitsandbytes"):
        monkeypatch.setattr(nf4_store, "library_versions", lambda: {**provenance.library_versions(), change: "0.0.1"})
    elif change == "quantization":
        q = dataclasses.replace(q, double_quant=False)
    elif change == "base":
        profile = dataclasses.replace(profile, model=dataclasses.replace(profile.model, synthetic_seed=1))
    else:
        device_type = "cuda"
    assert config_hash(nf4_store.key_parts(profile.model, q, device_type)) != before
