"""The merged engines' forward (fused projections) and the decode loop, captured as CUDA graphs, that they and
``nf4-compiled`` (harness/engines/nf4_layers.py) share.

A merged Llama-family model (Mistral, Llama, SmolLM2) decodes one token as 7 matrix-vector products per layer. At batch
1 each is bound by reading its weight, and small ones (k/v: 8 MB in Mistral-7B) never reach the memory bandwidth; cuBLAS
also splits most of them along K and adds a reduce kernel. ``fuse_projections_`` moves each layer's q/k/v weights into
one tensor and gate/up into another, and makes the model's own ``q_proj.weight`` (and the others) views of those
tensors, so the model's forward, peft's in-place merges and ``MergedBase``'s restores keep working and write into the
fused storage. ``FusedDecoder`` then runs a layer as 4 products instead of 7.

``FusedGreedy`` decodes with it (or with any ``StaticDecoder``): a prefill, then decode steps that read their inputs
from device buffers and advance them in place, so a chunk of ``chunk_tokens`` steps is captured once as one CUDA graph
and replayed until the answer is long enough. The host never waits between tokens (only every chunk, and only when it
must look for EOS). On the CPU nothing is compiled or captured: the same steps run eagerly, which is what the CPU
self-tests compare with the model's own forward.

Only models whose decoder layers are the Llama/Mistral block are taken (``check_supported``): no projection biases, no
sliding window shorter than the cache, the default RoPE applied by the model's own ``rotary_emb``.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .decoding import _allow_compile, _pad_id, _trim_after_eos, padded_batches, round_up

__all__ = ["check_supported", "fuse_projections_", "StaticDecoder", "FusedDecoder", "FusedGreedy"]

SUPPORTED = ("MistralForCausalLM", "LlamaForCausalLM")


def check_supported(model) -> None:
    """Raise ValueError, saying why, when ``model`` is not a decoder that ``FusedDecoder`` computes exactly."""
    kind = type(model).__name__
    if kind not in SUPPORTED:
        raise ValueError(f"the fused merged engine supports {', '.join(SUPPORTED)}, not {kind}")
    cfg = model.config
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise ValueError(f"{kind}: projection biases are not supported by the fused merged engine")
    if getattr(cfg, "sliding_window", None):
        raise ValueError(f"{kind}: sliding_window={cfg.sliding_window} is not supported by the fused merged engine")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise ValueError(f"{kind}: hidden_act={cfg.hidden_act!r}; the fused merged engine computes SiLU")


def _fuse(modules: list[nn.Linear]) -> torch.Tensor:
    """One tensor holding ``modules``' weights stacked by rows; each module's weight becomes a view of it. A
    second call finds the views (one storage, filled by them in order) and returns a tensor over the same memory."""
    weights = [m.weight for m in modules]
    rows, cols = sum(w.shape[0] for w in weights), weights[0].shape[1]
    storage = weights[0].untyped_storage()
    offsets = [w.storage_offset() for w in weights]
    if (all(w.untyped_storage().data_ptr() == storage.data_ptr() for w in weights)
            and offsets == [sum(v.shape[0] for v in weights[:i]) * cols for i in range(len(weights))]
            and storage.nbytes() == rows * cols * weights[0].element_size()):
        return weights[0].detach().new_empty(0).set_(storage, 0, (rows, cols))
    fused = torch.cat([w.detach() for w in weights], dim=0)
    start = 0
    for m in modules:
        n = m.weight.shape[0]
        m.weight = nn.Parameter(fused[start:start + n], requires_grad=False)
        start += n
    return fused


def fuse_projections_(model) -> nn.ModuleList:
    """Fuse each decoder layer's q/k/v and gate/up weights in place (see the module docstring) and return, per
    layer, a module with four bias-free Linears ``qkv``, ``o``, ``gate_up`` and ``down`` over the model's own
    storage. Parameter addresses are fixed from here on; merges must write in place."""
    check_supported(model)
    layers = nn.ModuleList()
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        projections = nn.Module()
        for name, weight in (("qkv", _fuse([attn.q_proj, attn.k_proj, attn.v_proj])), ("o", attn.o_proj.weight),
                             ("gate_up", _fuse([mlp.gate_proj, mlp.up_proj])), ("down", mlp.down_proj.weight)):
            linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
            linear.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
            setattr(projections, name, linear)
        layers.append(projections)
    return layers


class StaticDecoder(nn.Module):
    """A Llama-family ``model``'s forward over a static KV cache, as ``FusedGreedy`` runs it: the model's own
    embeddings, RoPE, final norm and ``lm_head`` around ``layers``, which a subclass defines (``FusedDecoder``: fused
    projections; ``nf4_layers.TransformersLayers``: the model's own decoder layers). ``forward`` returns the logits of
    each row's last position. ``describe`` is what the engine's note says of the layers."""

    compile_per_layer = False
    describe = ""

    def __init__(self, model):
        super().__init__()
        check_supported(model)
        cfg = model.config
        inner = model.model
        self.embed, self.norm, self.rotary = inner.embed_tokens, inner.norm, inner.rotary_emb
        self.lm_head = model.lm_head
        self.num_layers = cfg.num_hidden_layers
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    def new_cache(self, rows: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A zeroed static KV cache: per layer (keys, values), each [rows, kv_heads, length, head_dim]."""
        like = self.lm_head.weight
        shape = (rows, self.kv_heads, length, self.head_dim)
        return [(torch.zeros(shape, dtype=like.dtype, device=like.device),
                 torch.zeros(shape, dtype=like.dtype, device=like.device)) for _ in range(self.num_layers)]

    def forward(self, ids, positions, cache_position, pad_mask, cache) -> torch.Tensor:
        """ids, positions: [rows, T]; cache_position: [T], where these tokens go in the cache; pad_mask: [rows,
        length] bool, False on left padding; cache: ``new_cache``'s list, written in place. Returns [rows, vocab]."""
        x, cos, sin, mask = self.prepare(ids, positions, cache_position, pad_mask)
        return self.head(self.layers(x, cos, sin, mask, cache_position, cache)[:, -1])

    def prepare(self, ids, positions, cache_position, pad_mask):
        """What every layer takes besides the residual stream: (the embedded ``ids``, RoPE's cos and sin at
        ``positions``, the attention mask over the cache's slots)."""
        x = self.embed(ids)
        cos, sin = self.rotary(x, positions)
        key_index = torch.arange(pad_mask.shape[1], device=ids.device)
        query_index = cache_position[:, None]
        # causal over cache slots, pads hidden; a left-pad query still sees itself, so no row is all -inf
        mask = (pad_mask[:, None, None, :] & (key_index <= query_index)) | (key_index == query_index)
        return x, cos, sin, mask

    def head(self, x) -> torch.Tensor:
        """The logits of the last positions ``x`` [rows, hidden]: ``lm_head`` of the final norm."""
        return self.lm_head(self.norm(x))


class FusedDecoder(StaticDecoder):
    """``StaticDecoder`` with ``projections`` (from ``fuse_projections_``, or a quantized copy of them) in place of
    the seven per-layer Linears; norms and RoPE are the model's own modules.

    ``compile_per_layer`` is False: a layer ends in the residual add after down and the next begins with its
    RMSNorm, which a compile of the whole step fuses into one kernel (32 launches a token fewer).
    """

    describe = "fused q/k/v and gate/up"

    def __init__(self, model, projections: nn.ModuleList):
        super().__init__(model)
        inner = model.model
        self.input_norms = nn.ModuleList(layer.input_layernorm for layer in inner.layers)
        self.post_norms = nn.ModuleList(layer.post_attention_layernorm for layer in inner.layers)
        self.projections = projections
        self.split = (self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim)

    def layers(self, x, cos, sin, mask, cache_position, cache, layer=None) -> torch.Tensor:
        """The residual stream after every decoder layer, each run by ``layer`` (default ``self.layer``; a compiled
        copy of it, for ``FusedGreedy``'s regional compilation)."""
        layer = self.layer if layer is None else layer  # `or` on a method is a branch dynamo 2.11 cannot trace
        for norm_in, norm_post, proj, (keys, values) in zip(self.input_norms, self.post_norms, self.projections,
                                                            cache):
            x = layer(x, cos, sin, mask, cache_position, norm_in, norm_post, proj, keys, values)
        return x

    def layer(self, x, cos, sin, mask, cache_position, norm_in, norm_post, proj, keys, values) -> torch.Tensor:
        """One decoder layer: the residual stream ``x`` [rows, T, hidden] after it; writes this step's keys and
        values into the layer's cache (``keys``, ``values``) at ``cache_position``."""
        x = self.attention(x, cos, sin, mask, cache_position, norm_in, proj, keys, values)
        return self.mlp(proj, norm_post, x)

    def attention(self, x, cos, sin, mask, cache_position, norm_in, proj, keys, values) -> torch.Tensor:
        """The residual stream after a layer's attention (``layer``'s first half, its cache write included)."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        rows, steps = x.shape[:2]
        q, k, v = self.qkv(proj, norm_in, x).split(self.split, dim=-1)
        q = q.view(rows, steps, self.heads, self.head_dim).transpose(1, 2)
        k = k.view(rows, steps, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(rows, steps, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        keys.index_copy_(2, cache_position, k)
        values.index_copy_(2, cache_position, v)
        attn = self.attend(q, keys, values, mask)
        return self.attention_out(proj, attn.transpose(1, 2).reshape(rows, steps, -1), x)

    # the layer's products, each with what comes right before or after it: a subclass may compute them otherwise
    def qkv(self, proj, norm, x) -> torch.Tensor:
        """q, k and v side by side: the q/k/v product of the normed residual stream ``x``."""
        return proj.qkv(norm(x))

    def attention_out(self, proj, attn, x) -> torch.Tensor:
        """The residual stream after attention: ``x`` plus the o product of ``attn``."""
        return x + proj.o(attn)

    def mlp(self, proj, norm, x) -> torch.Tensor:
        """The residual stream after the MLP: ``x`` plus down(SiLU(gate) * up) of the normed ``x``."""
        gate, up = proj.gate_up(norm(x)).chunk(2, dim=-1)
        return x + proj.down(F.silu(gate) * up)

    def attend(self, q, keys, values, mask) -> torch.Tensor:
        """Attention of q [rows, heads, T, dim] over the whole cache under ``mask`` (grouped KV heads)."""
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)


class _Shape:
    """The static buffers of one (rows, cache length) shape: the KV cache, the step's inputs, the output tokens,
    and (on CUDA) the captured graphs."""

    def __init__(self, decoder: StaticDecoder, rows: int, length: int):
        head, dev = decoder.lm_head.weight, decoder.lm_head.weight.device
        self.cache = decoder.new_cache(rows, length)
        self.pad_mask = torch.zeros((rows, length), dtype=torch.bool, device=dev)
        self.token = torch.zeros((rows, 1), dtype=torch.long, device=dev)
        self.position = torch.zeros((rows, 1), dtype=torch.long, device=dev)
        self.cache_position = torch.zeros((1,), dtype=torch.long, device=dev)
        self.out = torch.zeros((rows, length), dtype=torch.long, device=dev)
        self.out_index = torch.zeros((1,), dtype=torch.long, device=dev)
        self.logits = torch.zeros((rows, head.shape[0]), dtype=head.dtype, device=dev)
        self.graph: Any = None  # CUDA: one chunk of decode steps, and one step (forced_logits)
        self.step_graph: Any = None
        self.compiled = False  # whether the step is compiled for this shape (and on CUDA a chunk captured)


class FusedGreedy:
    """Greedy decoding over a ``StaticDecoder``; same interface as ``decoding.StaticGreedy``.

    Per (batch rows, cache length) shape: the decode step is compiled once (``cfg.compile_mode`` without CUDA
    graphs of its own; ``inductor_options`` on top), then ``cfg.graph_tokens`` steps are captured as one CUDA graph.
    The cache length is ``max_new_tokens`` past the prompt rounded up to ``cfg.cache_bucket``, with room for the
    last chunk's overshoot (whose tokens are dropped).

    The step is compiled whole, or in three regions when ``decoder.compile_per_layer`` says nothing between two
    layers is worth fusing: ``prepare``, one decoder layer (one graph serves every layer: they share a shape) and
    ``_finish``. A region compiles a thirty-second of a 32-layer step, and the CUDA graph replays the same kernels
    either way. ``compile_on_cpu`` compiles on the CPU too (the self-tests); nothing is captured there.
    """

    def __init__(self, model, decoder: StaticDecoder, tokenizer, name: str, cfg,
                 inductor_options: dict[str, Any] | None = None, compile_on_cpu: bool = False):
        self.model, self.decoder, self.tokenizer, self.name, self.cfg = model, decoder, tokenizer, name, cfg
        self.chunk_tokens = chunk_tokens = cfg.graph_tokens
        self.device = decoder.lm_head.weight.device
        self.compiled = bool(cfg.compile) and (self.device.type == "cuda" or compile_on_cpu)
        self.regions = 3 if self.compiled and decoder.compile_per_layer else 1  # graphs compiled per shape
        self.note = (f"{decoder.describe}, static KV cache, decode step compiled "
                     f"{'per layer' if self.regions > 1 else 'whole'}, {chunk_tokens} steps per CUDA graph"
                     if self.compiled else
                     f"{decoder.describe}, static KV cache, eager: compilation and CUDA graphs need CUDA")
        self.compile_s: dict[str, float] = {}
        self._shapes: dict[tuple[int, int], _Shape] = {}
        self._prepare, self._layer, self._finish_step = decoder.prepare, decoder.layer, self._finish
        self._step = self._decode_one
        if self.compiled:
            from torch._inductor import list_mode_options

            options = {**list_mode_options(cfg.compile_mode), "triton.cudagraphs": False, **(inductor_options or {})}

            def compiled(fn):
                return torch.compile(fn, fullgraph=True, dynamic=False, options=options)

            if self.regions > 1:
                self._prepare, self._layer, self._finish_step = map(compiled, (decoder.prepare, decoder.layer,
                                                                              self._finish))
            else:
                self._step = compiled(self._decode_one)

    def _decode_one(self, s: _Shape) -> None:
        x, cos, sin, mask = self._prepare(s.token, s.position, s.cache_position, s.pad_mask)
        self._finish_step(s, self.decoder.layers(x, cos, sin, mask, s.cache_position, s.cache, self._layer))

    def _finish(self, s: _Shape, x: torch.Tensor) -> None:
        """The step's end after the last layer (``x``): the logits, their argmax, the buffers advanced a token."""
        s.logits.copy_(self.decoder.head(x[:, -1]))
        s.token.copy_(s.logits.argmax(-1, keepdim=True))
        s.out.index_copy_(1, s.out_index, s.token)
        s.position.add_(1)
        s.cache_position.add_(1)
        s.out_index.add_(1)

    def _chunk(self, s: _Shape) -> None:
        for _ in range(self.chunk_tokens):
            self._step(s)

    def _compile_shape(self, s: _Shape) -> None:
        """Compile the step for ``s``'s shape (a warm-up chunk; on CUDA on a side stream, as CUDA graph capture
        requires), check that it made no more graphs than its regions, then on CUDA capture one chunk, and one step
        for ``forced_logits``. The warm-up writes into the cache and buffers; a prefill overwrites what it uses."""
        from torch._dynamo.utils import counters

        cuda = self.device.type == "cuda"
        side = self._side_stream() if cuda else None
        before = counters["stats"]["unique_graphs"]
        if cuda:
            side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # a None stream: a no-op, as on the CPU
            self._chunk(s)
        if cuda:
            torch.cuda.current_stream().wait_stream(side)
        made = counters["stats"]["unique_graphs"] - before
        if made > self.regions:  # a layer that guards on its own weights compiles 32 times, or falls back to eager
            raise RuntimeError(f"{self.name}: compiling the decode step for {len(s.token)} rows made {made} graphs, "
                               f"where its {self.regions} region(s) make one each: something in it recompiles "
                               f"per layer or per token (run with TORCH_LOGS=recompiles to see the guard)")
        if cuda:
            s.graph, s.step_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
            with torch.cuda.graph(s.graph, stream=side):
                self._chunk(s)
            with torch.cuda.graph(s.step_graph, stream=side):
                self._step(s)
        s.compiled = True

    def _side_stream(self) -> torch.cuda.Stream:
        """The stream the warm-up runs and the graph is captured on: a new one."""
        return torch.cuda.Stream()

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 8,
                 fixed_length: bool = False) -> list[list[int]]:
        eos_id = None if fixed_length else self.tokenizer.eos_token_id
        out: list[list[int]] = []
        for chunk, ids, mask in padded_batches(prompts, _pad_id(self.tokenizer), batch_size, self.compiled):
            new = self._generate_batch(ids, mask, max_new_tokens, eos_id)
            out.extend(_trim_after_eos(row, eos_id) for row in new[:len(chunk)].tolist())
        return out

    def cache_length(self, width: int, max_new_tokens: int) -> int:
        """Cache slots for a ``width``-token prompt and ``max_new_tokens`` new ones, the last graph's overshoot
        included, rounded up to ``cfg.cache_bucket``: one captured shape per bucket."""
        steps = round_up(max(max_new_tokens - 1, 1), self.chunk_tokens)  # a chunk at least: the warm-up's
        return round_up(width + steps + 1, self.cfg.cache_bucket)

    def _shape(self, rows: int, width: int, max_new_tokens: int) -> _Shape:
        key = (rows, self.cache_length(width, max_new_tokens))
        if key not in self._shapes:
            self._shapes[key] = _Shape(self.decoder, *key)
        return self._shapes[key]

    def _generate_batch(self, ids, mask, max_new_tokens: int, eos_id: int | None) -> torch.Tensor:
        rows, width = ids.shape
        s = self._shape(rows, width, max_new_tokens)
        label = f"{rows}x{s.pad_mask.shape[1]}"
        first = label not in self.compile_s
        t0 = time.perf_counter()
        if self.compiled and not s.compiled:  # not on first use alone: forced_logits may have made the shape
            # dynamo keys compiled code on _decode_one, which every FusedGreedy shares: a new engine's first
            # compile counts as a recompile, which timed rounds forbid (decoding.no_recompile); it is never timed
            with _allow_compile(True):
                self._compile_shape(s)
        dev = self.device
        mask = mask.to(dev)
        s.pad_mask.zero_()
        s.pad_mask[:, :width] = mask.bool()
        s.pad_mask[:, width:] = True  # slots for new tokens; the causal rule hides the ones not yet written
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = self.decoder(ids.to(dev), positions, torch.arange(width, device=dev), s.pad_mask, s.cache)
        s.token.copy_(logits.argmax(-1, keepdim=True))
        s.position.copy_(positions[:, -1:] + 1)
        s.cache_position.fill_(width)
        s.out_index.zero_()
        first_token = s.token.clone()
        done = 1
        while done < max_new_tokens:
            if s.graph is not None:
                s.graph.replay()
            else:
                self._chunk(s)
            done += self.chunk_tokens
            if eos_id is not None and done < max_new_tokens:
                seen = torch.cat([first_token, s.out[:, :done - 1]], dim=1)
                if bool((seen == eos_id).any(1).all()):
                    break
        if first:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            self.compile_s[label] = time.perf_counter() - t0
        return torch.cat([first_token, s.out[:, :min(done, max_new_tokens) - 1]], dim=1).cpu()

    @torch.inference_mode()
    def forced_logits(self, prompt: list[int], forced: list[int]) -> torch.Tensor:
        """Teacher-forced logits through this engine's own decode step: [len(forced), vocab] float32 on the CPU.

        The prompt is prefilled as ``generate`` does (one row); then each forced token goes through the step that
        greedy decoding runs (on a shape ``generate`` captured, its one-step graph: the chunk's kernels, launched at
        once rather than one by one from Python), and row i holds the logits after ``prompt + forced[:i + 1]``, as
        ``HFGreedy.forced_logits`` gives them."""
        dev = self.device
        s = self._shape(1, len(prompt), len(forced) + 1)
        s.pad_mask.fill_(True)
        at = torch.arange(len(prompt), device=dev)
        self.decoder(torch.tensor([prompt], device=dev), at[None], at, s.pad_mask, s.cache)
        s.position.fill_(len(prompt))
        s.cache_position.fill_(len(prompt))
        s.out_index.zero_()
        rows = []
        with _allow_compile(self.compiled):  # never timed: a shape not yet captured compiles here
            for token in forced:
                s.token.fill_(token)
                s.step_graph.replay() if s.step_graph is not None else self._step(s)
                rows.append(s.logits[0].float().cpu().clone())  # s.logits is overwritten by the next step
        return torch.stack(rows)
