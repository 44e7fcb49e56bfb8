"""The merged engines' fused decoder (harness/engines/fused.py) computes what the model's own forward computes.

On the CPU the same decoder, cache and step run eagerly (no compile, no CUDA graphs), so these tests hold the code
path that the GPU captures: fused projections, the static cache written in place, positions advanced by the step
itself, left padding, the EOS trim and teacher-forced logits. Each is compared with transformers' own forward and
``generate`` on the same weights, for a Mistral (grouped KV heads, untied) and a Llama (tied embeddings, three heads
over one KV head, the SmolLM2 layout).
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralForCausalLM

from harness.engines.decoding import HFGreedy, left_pad
from harness.engines.fused import FusedDecoder, FusedGreedy, check_supported, fuse_projections_
from harness.models.base import synthetic_config

PROMPTS = [[1, 5, 7, 9, 11], [1, 3, 4], [1, 8, 8, 8, 8, 8, 9]]  # three widths: two rows are left-padded


class Cfg:  # the InferenceConfig fields the engine reads
    compile, compile_mode, cache_bucket, graph_tokens = True, "default", 32, 4


class Tok:
    pad_token_id, eos_token_id = 0, 2


def _mistral():
    return MistralForCausalLM(synthetic_config("tiny"))


def _llama():
    return LlamaForCausalLM(LlamaConfig(vocab_size=500, hidden_size=96, intermediate_size=256, num_hidden_layers=2,
                                        num_attention_heads=3, num_key_value_heads=1, head_dim=32, rope_theta=1e5,
                                        tie_word_embeddings=True, pad_token_id=0, eos_token_id=2))


@pytest.fixture(params=[_mistral, _llama], ids=["mistral", "llama"])
def model(request):
    torch.manual_seed(0)
    m = request.param().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.5)  # large weights: logits far apart, so greedy tokens are decided by the function
    return m


def _hf_greedy(model, tokens: int) -> list[list[int]]:
    """``generate``'s greedy tokens with no EOS at all: neither stopped at nor suppressed (min_new_tokens would)."""
    ids, mask = left_pad(PROMPTS, 0, len(PROMPTS))
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=tokens,
                             pad_token_id=0)
    return out[:, ids.shape[1]:].tolist()


def test_fused_greedy_decoding_is_the_models_own_on_left_padded_batches(model):
    """Same tokens as ``generate``, over 5 graph chunks (4 steps each, the last one overshooting): a wrong position,
    cache slot, mask or split of the fused q/k/v would change them."""
    expected = _hf_greedy(model, 18)
    engine = FusedGreedy(model, FusedDecoder(model, fuse_projections_(model)), Tok(), "merged", Cfg())
    assert engine.generate(PROMPTS, 18, batch_size=3, fixed_length=True) == expected
    assert _hf_greedy(model, 18) == expected  # the model's own forward still runs on the fused storage


def test_forced_logits_are_the_models_teacher_forced_logits(model):
    engine = FusedGreedy(model, FusedDecoder(model, fuse_projections_(model)), Tok(), "merged", Cfg())
    prompt, forced = PROMPTS[0], [4, 8, 15, 16, 23, 42]
    with torch.no_grad():
        reference = HFGreedy(model, Tok()).forced_logits(prompt, forced)
    got = engine.forced_logits(prompt, forced)
    assert got.shape == reference.shape == (len(forced), model.config.vocab_size)
    assert (got - reference).abs().max().item() < 1e-4 * reference.abs().max().item()


def test_fusing_makes_the_projections_views_so_in_place_merges_reach_the_decoder(model):
    """peft merges by adding into ``q_proj.weight`` in place; the fused tensor the decoder reads must see it, and
    fusing twice must not copy again (the CUDA graphs hold the fused tensors' addresses)."""
    projections = fuse_projections_(model)
    attn = model.model.layers[0].self_attn
    qkv = projections[0].qkv.weight
    with torch.no_grad():
        attn.k_proj.weight.add_(1.0)
    start = attn.q_proj.weight.shape[0]
    assert torch.equal(qkv[start:start + attn.k_proj.weight.shape[0]], attn.k_proj.weight)
    assert fuse_projections_(model)[0].qkv.weight.data_ptr() == qkv.data_ptr()


def test_greedy_decoding_stops_at_eos_and_trims_after_it(model):
    """Without ``fixed_length`` every row ends at its first EOS, whichever chunk produced it."""
    engine = FusedGreedy(model, FusedDecoder(model, fuse_projections_(model)), Tok(), "merged", Cfg())
    free = engine.generate(PROMPTS, 18, batch_size=3, fixed_length=True)
    eos = free[1][5]  # pretend the sixth token of the second row is EOS
    Tok.eos_token_id = eos
    try:
        rows = engine.generate(PROMPTS, 18, batch_size=3)
    finally:
        Tok.eos_token_id = 2
    for row, full in zip(rows, free, strict=True):
        cut = full.index(eos) + 1 if eos in full else len(full)
        assert row == full[:cut]


def test_architectures_the_fused_decoder_does_not_compute_are_refused_with_the_reason():
    cfg = synthetic_config("tiny")
    cfg.sliding_window = 16
    with pytest.raises(ValueError, match="sliding_window=16"):
        check_supported(MistralForCausalLM(cfg))
    with pytest.raises(ValueError, match="supports MistralForCausalLM, LlamaForCausalLM"):
        check_supported(torch.nn.Linear(2, 2))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here: merged-int4 runs")
def test_merged_int4_says_it_needs_cuda_on_a_cpu():
    from harness.engines.int4 import Int4Merged

    model = _mistral()
    with pytest.raises(RuntimeError, match="merged-int4 runs on CUDA only"):
        Int4Merged(model, fuse_projections_(model), Tok(), Cfg())


def test_int4_kernel_check_passes_the_right_product_and_refuses_a_wrong_or_nan_one():
    """``check_kernel`` (run by ``Int4Merged`` on each projection shape when it is built) passes a module computing
    the dequantized product and names the shape and row count of one that does not. Mutations: a kernel off by a
    tenth of its weight, and one returning NaN from 2 rows on (as gemlite's split-K GEMM did at 8 rows)."""
    from harness.engines.int4 import CHECK_ROWS, check_kernel

    torch.manual_seed(0)
    dequantized = torch.randn(24, 16) * 0.02
    right = torch.nn.Linear(16, 24, bias=False)
    right.weight.data.copy_(dequantized)
    check_kernel(right, dequantized)

    off = torch.nn.Linear(16, 24, bias=False)
    off.weight.data.copy_(dequantized * 1.1)
    with pytest.raises(RuntimeError, match=r"24x16 projection at 1 rows \(relative error 0\.1"):
        check_kernel(off, dequantized)

    class NanPastOneRow(torch.nn.Linear):
        def forward(self, x):
            y = super().forward(x)
            return y if x.shape[0] == 1 else y * float("nan")

    nan = NanPastOneRow(16, 24, bias=False)
    nan.weight.data.copy_(dequantized)
    with pytest.raises(RuntimeError, match=rf"at {CHECK_ROWS[1]} rows \(relative error nan"):
        check_kernel(nan, dequantized)


def test_int4_dequantize_is_w_minus_zero_times_scale_per_group_with_bf16_scales():
    """The reference ``check_kernel`` holds gemlite to (and ``.ci/int4_check.py`` too): HQQ's raw output, two groups
    of 4 inputs per row, scales and zeros rounded to bf16 as gemlite stores them."""
    from harness.engines.int4 import dequantize

    w_q = torch.tensor([[0, 1, 2, 3, 15, 14, 13, 12], [5, 5, 5, 5, 0, 0, 0, 0]], dtype=torch.uint8).view(-1, 4)
    scale = torch.tensor([[0.1], [0.2], [1.0], [0.5]], dtype=torch.float16)
    zero = torch.tensor([[1.0], [7.5], [5.0], [0.25]], dtype=torch.float16)
    w = dequantize(w_q, scale, zero, (2, 8), 4, torch.bfloat16)
    s, z = scale.to(torch.bfloat16).float().view(2, 2, 1), zero.to(torch.bfloat16).float().view(2, 2, 1)
    assert w.dtype == torch.float32 and w.shape == (2, 8)
    assert torch.equal(w, ((w_q.float().view(2, 2, 4) - z) * s).view(2, 8))
    assert w[1, 4].item() == -0.25 * 0.5 and w[0, 0].item() == -1.0 * torch.tensor(0.1).bfloat16().item()
