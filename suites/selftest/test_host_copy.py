"""harness/models/host_copy.py: checkpoints of GPU models written through a pinned staging buffer."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralForCausalLM

from harness.models import host_copy
from harness.models.base import synthetic_config


@pytest.mark.parametrize("make", [lambda: MistralForCausalLM(synthetic_config("tiny")),
                                  lambda: LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64,
                                                                       intermediate_size=128, num_hidden_layers=2,
                                                                       num_attention_heads=2, num_key_value_heads=1,
                                                                       tie_word_embeddings=True))],
                         ids=["mistral", "llama-tied"])
def test_a_checkpoint_written_with_its_state_handed_over_is_the_models_own_bytes(tmp_path, make):
    """``save_pretrained`` hands ``save_pretrained`` the host copies as ``state_dict``: the files must be what the
    model writes by itself, a tied ``lm_head`` included (written once, or refused as a shared tensor)."""
    torch.manual_seed(0)
    model = make().to(torch.bfloat16)
    host_copy.save_pretrained(model, tmp_path / "staged")
    model.save_pretrained(tmp_path / "own", safe_serialization=True)
    own = sorted(p.name for p in (tmp_path / "own").iterdir())
    assert sorted(p.name for p in (tmp_path / "staged").iterdir()) == own
    for name in own:
        assert (tmp_path / "staged" / name).read_bytes() == (tmp_path / "own" / name).read_bytes(), name


@pytest.mark.parametrize("numel", [1, 7, 8, 9, 24, 1000])
def test_the_staged_copy_is_the_tensor_through_a_smaller_buffer(numel):
    """A tensor larger than the buffer goes through in chunks, the last one partial: every byte arrives once, in
    place. Mutation: a chunk copied from or to the wrong offset, or a last chunk dropped, fails here."""
    tensor = torch.randn(numel, dtype=torch.float32).to(torch.bfloat16).view(-1, 1) if numel % 2 else \
        torch.randn(2, numel // 2).to(torch.bfloat16)
    staging = torch.empty(6, dtype=torch.uint8)  # 3 bf16 values: most tensors here take several chunks
    copy = host_copy._through(staging, tensor)
    assert copy.shape == tensor.shape and copy.dtype == tensor.dtype
    assert torch.equal(copy.view(torch.int16), tensor.view(torch.int16))
