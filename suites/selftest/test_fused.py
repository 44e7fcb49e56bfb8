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
def test_merged_int4_says_it_needs_cuda_on_a_cpu(tmp_path):
    from harness.engines.int4 import Int4Merged

    model = _mistral()
    with pytest.raises(RuntimeError, match="merged-int4 runs on CUDA only"):
        Int4Merged(model, fuse_projections_(model), Tok(), Cfg(), tmp_path)


def test_int4_kernel_check_passes_the_right_product_and_refuses_a_wrong_or_nan_one():
    """``check_kernel`` (run by ``Int4Merged`` on each projection shape when it is built) passes a module computing
    the dequantized product and names the shape and row count of one that does not. Mutations: a kernel off by a
    tenth of its weight, and one returning NaN from 2 rows on (as gemlite's split-K GEMM, this engine's earlier
    kernel, did at 8 rows)."""
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


def test_int4_quantize_rounds_each_group_to_16_levels_with_an_integer_zero_point():
    """``quantize``: per group of inputs, q in 0..15, an integer zero point and ``(q - zero) * scale`` within half a
    step of the weight; each group's extremes land on levels 0 and 15. Mutation: a scale of ``(max - min) / 16``
    puts the maximum past level 15, so clamping moves it by more than half a step."""
    from harness.engines.int4 import quantize

    torch.manual_seed(0)
    w = torch.randn(6, 16) * torch.tensor([0.01, 1.0, 30.0, 0.5, 2.0, 0.001]).view(6, 1)
    q, scale, zero = quantize(w, group_size=8)
    assert q.shape == (6, 16) and scale.shape == zero.shape == (6, 2)
    assert torch.equal(q, q.round()) and q.min() >= 0 and q.max() <= 15
    assert torch.equal(zero, zero.round()) and zero.min() >= 0 and zero.max() <= 15
    w_hat = (q.view(6, 2, 8) - zero.unsqueeze(-1)) * scale.unsqueeze(-1)
    assert ((w_hat - w.view(6, 2, 8)).abs() <= scale.unsqueeze(-1) * 0.5 + 1e-6).all()
    assert (q.view(6, 2, 8).amin(-1) == 0).all() and (q.view(6, 2, 8).amax(-1) == 15).all()


def test_int4_pads_outputs_to_marlins_tile_only_where_neither_size_is_a_multiple_of_128():
    """``marlin_rows``: SmolLM2's q/k/v (960x576) and o (576x576), which crashed Marlin on the H200 (b0afe53), get
    zero rows up to 1024 and 640; the shapes that ran there unpadded, and Mistral-7B's, keep their rows. The zero rows
    quantize to zero, so the rows kept are the unpadded weight's. Mutation: padding on the outputs alone would pad
    576x1536 (SmolLM2's down), which ran as it is."""
    from harness.engines.int4 import marlin_rows, quantize

    crashed = {(960, 576): 1024, (576, 576): 640}
    ran = [(3072, 576), (576, 1536), (1024, 576), (1152, 576), (6144, 4096), (4096, 4096), (28672, 4096),
           (4096, 14336)]
    assert {shape: marlin_rows(*shape) for shape in crashed} == crashed
    assert [marlin_rows(*shape) for shape in ran] == [out for out, _ in ran]
    w = torch.randn(576, 576)
    q, scale, zero = quantize(torch.nn.functional.pad(w, (0, 0, 0, marlin_rows(576, 576) - 576)), group_size=64)
    padded = (q - zero.repeat_interleave(64, 1)) * scale.repeat_interleave(64, 1)
    assert torch.equal(padded[576:], torch.zeros(64, 576))
    q_alone, scale_alone, zero_alone = quantize(w, group_size=64)
    assert torch.equal(q[:576], q_alone) and torch.equal(scale[:576], scale_alone)
    assert torch.equal(zero[:576], zero_alone)


def test_int4_pack_puts_eight_values_a_word_the_first_in_the_low_bits():
    """``_pack`` along inputs (GPTQ's layout, which Marlin's repack reads) and along outputs (zero points): every
    value comes back from its word, 15 included in the sign bit. Mutation: shifting by ``4 * (7 - j)`` (the first
    value in the high bits) fails the round trip."""
    from harness.engines.int4 import _pack

    q = torch.randint(0, 16, (32, 24))
    q[7::8, :] = 15  # the high nibble of every word along dim 0: the int32's sign
    along_rows, along_cols = _pack(q, 0), _pack(q, 1)
    assert along_rows.dtype == along_cols.dtype == torch.int32
    assert along_rows.shape == (4, 24) and along_cols.shape == (32, 3)
    shifts = torch.arange(8) * 4
    rows = (along_rows.to(torch.int64).unsqueeze(1) >> shifts.view(1, 8, 1)) & 15
    cols = (along_cols.to(torch.int64).unsqueeze(-1) >> shifts) & 15
    assert torch.equal(rows.reshape(32, 24), q) and torch.equal(cols.reshape(32, 24), q)


def test_marlin_build_key_changes_with_sources_builder_torch_nvcc_and_gpu(tmp_path, monkeypatch):
    """The built kernels' folder is keyed by everything that changes the library (harness/engines/marlin.py): the
    source archive's sha256, the builder module, torch's version, nvcc's and the GPU's capability each give a new
    key, so a library built from other code or for another torch is never loaded. Mutation: leaving the builder
    module out of the key keeps the key when the build recipe changes."""
    from harness.engines import marlin

    args = ("Cuda compilation tools, release 13.0", (9, 0))
    keys = {"first": marlin.build_key(marlin.SDIST_SHA256, *args)}
    assert marlin.build_key(marlin.SDIST_SHA256, *args) == keys["first"]
    keys["sources"] = marlin.build_key("0" * 64, *args)
    builder = tmp_path / "marlin_builder.py"
    builder.write_bytes(marlin.BUILDER.read_bytes() + b"# another build recipe\n")
    monkeypatch.setattr(marlin, "BUILDER", builder)
    keys["builder"] = marlin.build_key(marlin.SDIST_SHA256, *args)
    monkeypatch.setattr(torch, "__version__", torch.__version__ + "+other")
    keys["torch"] = marlin.build_key(marlin.SDIST_SHA256, *args)
    keys["nvcc"] = marlin.build_key(marlin.SDIST_SHA256, "Cuda compilation tools, release 13.1", (9, 0))
    keys["gpu"] = marlin.build_key(marlin.SDIST_SHA256, args[0], (8, 0))
    assert len(set(keys.values())) == len(keys), keys


def test_marlin_sources_are_the_checked_archive_and_missing_tools_are_named(tmp_path, monkeypatch):
    """The kernels are built only from gptqmodel's archive with the pinned sha256: a missing archive names the
    command that fetches it, another archive is refused with both digests; without nvcc the error says so. The
    extraction takes the Marlin sources and the ScalarType module alone."""
    import io
    import tarfile

    from torch.utils import cpp_extension

    from harness.engines import marlin

    monkeypatch.delenv("QLORA_MARLIN_SDIST", raising=False)
    with pytest.raises(RuntimeError, match="pip download --no-deps gptqmodel==7.7.0 -d runs/_kernels"):
        marlin.sdist(tmp_path)
    archive = tmp_path / marlin.SDIST
    with tarfile.open(archive, "w:gz") as tar:
        for name in ("gptqmodel-7.7.0/gptqmodel_ext/marlin/gptq_marlin.cu", "gptqmodel-7.7.0/gptqmodel/__init__.py",
                     "gptqmodel-7.7.0/gptqmodel/utils/marlin_scalar_type.py"):
            info = tarfile.TarInfo(name)
            info.size = len(name)
            tar.addfile(info, io.BytesIO(name.encode()))
    with pytest.raises(RuntimeError, match=f"sha256 [0-9a-f]{{64}}, not gptqmodel 7.7.0's {marlin.SDIST_SHA256}"):
        marlin.sdist(tmp_path)
    sources, types = marlin._extract(archive, tmp_path / "src")
    assert [p.name for p in sources.iterdir()] == ["gptq_marlin.cu"] and types.is_file()
    assert not (tmp_path / "src" / "gptqmodel-7.7.0" / "gptqmodel" / "__init__.py").exists()
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)  # what torch found: none on this machine
    with pytest.raises(RuntimeError, match="put nvcc on the PATH or set CUDA_HOME"):
        marlin._nvcc()
