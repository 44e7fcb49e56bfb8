"""``nf4-compiled`` (harness/engines/nf4_layers.py): the seed's weights, NF4 through bitsandbytes and an unmerged
LoRA through peft, decoded by ``FusedGreedy`` over the model's own decoder layers.

On the tiny profile's NF4 base with a random r16 adapter (nonzero from the start: ``init_lora_weights=False``), the
engine's greedy tokens are the model's own ``generate``'s on left-padded batches, and its teacher-forced logits a
plain forward's. Compiled (inductor, on the CPU), the step makes one graph for each of its three regions, one decoder
layer serving all of them; a cache that reads the layer's own index, as transformers' ``StaticCache`` does, makes one
graph a layer and is refused by name.
"""

from __future__ import annotations

import pytest
import torch
from transformers import MistralForCausalLM

from harness.config.profiles import load_profile
from harness.engines import nf4_layers
from harness.engines.decoding import HFGreedy, StaticGreedy
from harness.engines.nf4_layers import LayerCache, nf4_compiled
from harness.models.base import load_base, synthetic_config
from harness.models.nf4 import disable_cpu_bf16_4bit_kernel

pytestmark = pytest.mark.slow

PROMPTS = [[1, 5, 7, 9, 11, 13], [1, 3, 4], [1, 8, 8, 8, 8, 8, 9, 10]]  # three widths: two rows are left-padded


class Tok:
    pad_token_id, eos_token_id = 0, 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(the tiny profile's inference config, its NF4 base with a random r16 LoRA on it, unmerged, in eval mode)."""
    from peft import LoraConfig, get_peft_model

    profile = load_profile("tiny")
    base = load_base(profile.model, profile.quantization, tmp_path_factory.mktemp("models"))
    disable_cpu_bf16_4bit_kernel(base)  # compute in float32, the profile's dtype
    torch.manual_seed(0)
    lora = LoraConfig(r=16, lora_alpha=32, init_lora_weights=False, target_modules=list(profile.lora.target_modules))
    model = get_peft_model(base, lora).eval()
    model.get_base_model().generation_config.eos_token_id = None  # generate neither stops at EOS nor suppresses it
    return profile.inference, model


def test_nf4_compiled_decodes_as_the_models_own_generate(tiny):
    inf, model = tiny
    engine = nf4_compiled(model, Tok(), inf)
    assert type(engine.decoder) is nf4_layers.TransformersLayers and "own decoder layers" in engine.note
    expected = HFGreedy(model, Tok()).generate(PROMPTS, 9, batch_size=3, fixed_length=True)
    assert engine.generate(PROMPTS, 9, batch_size=3, fixed_length=True) == expected
    forced = [7, 30, 2, 400, 5]
    a = engine.forced_logits(PROMPTS[0], forced)
    b = HFGreedy(model, Tok()).forced_logits(PROMPTS[0], forced)
    assert a.shape == b.shape == (len(forced), model.config.vocab_size)
    assert (a - b).abs().max().item() <= 1e-4


def test_compiled_per_layer_one_graph_serves_every_layer_and_a_layer_indexed_cache_is_refused(tiny, monkeypatch):
    """Mutation: a cache that reads the index each layer passes it (transformers' ``StaticCache`` finds its slot by
    it) makes dynamo guard on the index and compile each layer apart: refused before any token is kept."""
    from torch._dynamo.utils import counters

    inf, model = tiny
    assert model.get_base_model().config.num_hidden_layers >= 2
    expected = HFGreedy(model, Tok()).generate(PROMPTS, 5, batch_size=3, fixed_length=True)
    engine = nf4_compiled(model, Tok(), inf, compile_on_cpu=True)
    assert engine.regions == 3 and "compiled per layer" in engine.note
    before = counters["stats"]["unique_graphs"]
    assert engine.generate(PROMPTS, 5, batch_size=3, fixed_length=True) == expected
    assert counters["stats"]["unique_graphs"] - before == 3

    class IndexedCache(LayerCache):  # as StaticCache: this layer's slot in a list, found by the layer's index
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            slots = [super().update(key_states, value_states)] * (layer_idx + 1)
            return slots[layer_idx]

    monkeypatch.setattr(nf4_layers, "LayerCache", IndexedCache)
    torch._dynamo.reset()  # as in a fresh process: the regions the first engine compiled are not reused
    engine = nf4_compiled(model, Tok(), inf, compile_on_cpu=True)
    with pytest.raises(RuntimeError, match=r"nf4-compiled: compiling the decode step for 3 rows made [4-9] graphs"):
        engine.generate(PROMPTS, 5, batch_size=3, fixed_length=True)


def test_an_architecture_the_layers_decoder_does_not_take_gets_the_static_cache_engine_and_says_why():
    config = synthetic_config("tiny")
    config.sliding_window = 16
    engine = nf4_compiled(MistralForCausalLM(config).eval(), Tok(), load_profile("tiny").inference)
    assert type(engine) is StaticGreedy and engine.name == "nf4-compiled"
    assert "not per layer: " in engine.note and "sliding_window=16" in engine.note
