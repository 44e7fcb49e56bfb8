"""The ``nf4-compiled`` engine: the seed's weights (NF4 base, LoRA adapter unmerged) decoded by ``FusedGreedy``'s
loop, its step compiled per layer and captured as CUDA graphs.

A layer is the model's own module: transformers' attention and MLP, peft's LoRA layers, bitsandbytes' 4-bit products.
What changes is the KV cache it is handed. Given transformers' ``StaticCache``, a layer finds its slot by its own
``layer_idx``, a Python integer dynamo guards on, so a step compiled per layer compiles one graph for each of them
(issue 18's try 20), and a step compiled whole traces all of them (try 28: 0.9 s a layer of dynamo's time on the
CPU, 40-57 s of a cold run's first call on a GPU). ``LayerCache`` holds one layer's keys and values and ignores the
index, so one compiled layer serves every layer, as ``FusedDecoder``'s does for ``merged``.

What it costs against a step compiled whole: no fusion across a layer boundary (the residual add with the next
layer's RMSNorm), which the nested regions it replaces (``decoding.compile_layers_once``) did not fuse either.
"""

from __future__ import annotations

import torch
from torch import nn

from .decoding import StaticGreedy
from .fused import FusedGreedy, StaticDecoder

__all__ = ["LayerCache", "TransformersLayers", "nf4_compiled"]


class LayerCache:
    """What a transformers attention layer calls on its cache, for one layer: ``update`` writes this step's keys and
    values at ``cache_position`` into ``keys`` and ``values`` ([rows, kv_heads, length, head_dim], in place) and
    returns them whole; the layer index it is passed is not read."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, cache_position: torch.Tensor):
        self.keys, self.values, self.cache_position = keys, values, cache_position

    def update(self, key_states, value_states, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys.index_copy_(2, self.cache_position, key_states)
        self.values.index_copy_(2, self.cache_position, value_states)
        return self.keys, self.values


class TransformersLayers(StaticDecoder):
    """``StaticDecoder`` over ``model``'s own decoder layers (a transformers Llama-family model, peft's LoRA layers
    in it or not), each called with a ``LayerCache``; compiled per layer."""

    compile_per_layer = True
    describe = "the model's own decoder layers (NF4 + unmerged LoRA)"

    def __init__(self, model):
        super().__init__(model)
        self.decoder_layers = nn.ModuleList(model.model.layers)

    def layers(self, x, cos, sin, mask, cache_position, cache, layer=None) -> torch.Tensor:
        """The residual stream after every decoder layer, each run by ``layer`` (default ``self.layer``; a compiled
        copy of it, for ``FusedGreedy``'s regional compilation)."""
        layer = self.layer if layer is None else layer  # `or` on a method is a branch dynamo 2.11 cannot trace
        for module, (keys, values) in zip(self.decoder_layers, cache):
            x = layer(x, cos, sin, mask, cache_position, module, keys, values)
        return x

    def layer(self, x, cos, sin, mask, cache_position, module, keys, values) -> torch.Tensor:
        """Decoder layer ``module`` on the residual stream ``x`` [rows, T, hidden]; writes this step's keys and values
        into ``keys``, ``values`` at ``cache_position``. The cache goes in by position: transformers 5.17 names it
        ``past_key_values``, later releases ``cache``."""
        return module(x, mask, None, LayerCache(keys, values, cache_position), position_embeddings=(cos, sin))


def nf4_compiled(model, tokenizer, cfg, compile_on_cpu: bool = False):
    """The ``nf4-compiled`` engine over ``model`` (an NF4 base, with peft's adapter on it or not): ``FusedGreedy``
    over ``TransformersLayers``; for an architecture ``StaticDecoder`` does not take, ``StaticGreedy`` (transformers'
    static cache, the step compiled whole), with the reason in its note."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        decoder = TransformersLayers(base)
    except ValueError as e:
        engine = StaticGreedy(model, tokenizer, "nf4-compiled", cfg, compile_on_cpu=compile_on_cpu)
        engine.note += f"; not per layer: {e}"
        return engine
    return FusedGreedy(model, decoder, tokenizer, "nf4-compiled", cfg, compile_on_cpu=compile_on_cpu)
