"""The merged engines' fused decoder (harness/engines/fused.py) computes what the model's own forward computes.

On the CPU the same decoder, cache and step run eagerly (no compile, no CUDA graphs), so these tests hold the code
path that the GPU captures: fused projections, the static cache written in place, positions advanced by the step
itself, left padding, the EOS trim and teacher-forced logits. Each is compared with transformers' own forward and
``generate`` on the same weights, for a Mistral (grouped KV heads, untied) and a Llama (tied embeddings, three heads
over one KV head, the SmolLM2 layout).
"""

from __future__ import annotations

from types import SimpleNamespace

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
    check_kernel(right, dequantized, torch.float32)

    off = torch.nn.Linear(16, 24, bias=False)
    off.weight.data.copy_(dequantized * 1.1)
    with pytest.raises(RuntimeError, match=r"24x16 projection at 1 rows \(relative error 0\.1"):
        check_kernel(off, dequantized, torch.float32)

    class NanPastOneRow(torch.nn.Linear):
        def forward(self, x):
            y = super().forward(x)
            return y if x.shape[0] == 1 else y * float("nan")

    nan = NanPastOneRow(16, 24, bias=False)
    nan.weight.data.copy_(dequantized)
    with pytest.raises(RuntimeError, match=rf"at {CHECK_ROWS[1]} rows \(relative error nan"):
        check_kernel(nan, dequantized, torch.float32)


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


def test_int4_pads_to_the_kernels_tiles_and_the_padding_changes_no_real_output():
    """``padded_shape``: the prefill GEMM computes outputs in tiles of 128 and inputs in two halves of 128-input tiles,
    so SmolLM2's projections (576 wide) are padded and Mistral-7B's keep their shapes. The padded weight is zero, so
    its dequantized rows and columns past the real ones are zero, and an input padded with zeros gives the real
    outputs the product with the real weight's dequantized values. Mutation: aligning inputs to 128 alone leaves 640,
    which the split-K GEMM would compute only 512 of (its halves are whole tiles)."""
    from harness.engines.int4 import folded, padded_shape, quantize

    smol = {(960, 576): (1024, 768), (576, 576): (640, 768), (3072, 576): (3072, 768), (576, 1536): (640, 1536)}
    assert {shape: padded_shape(*shape) for shape in smol} == smol
    mistral = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]
    assert [padded_shape(*shape) for shape in mistral] == mistral
    torch.manual_seed(0)
    w = torch.randn(576, 576) * 0.02
    rows, columns = padded_shape(576, 576)
    q, scale, zero = quantize(torch.nn.functional.pad(w, (0, columns - 576, 0, rows - 576)), group_size=128)
    scales, zeros = folded(scale, zero)
    dequantized = q * scales.float().repeat_interleave(128, 1) + zeros.float().repeat_interleave(128, 1)
    assert torch.equal(dequantized[576:], torch.zeros(rows - 576, columns))
    assert torch.equal(dequantized[:, 640:], torch.zeros(rows, columns - 640))  # whole padded groups: zero
    assert (dequantized[:576, :576] - w).abs().max() <= scale.max() * 0.5 + 1e-3
    x = torch.randn(3, 576)
    padded_out = torch.nn.functional.pad(x, (0, columns - 576)) @ dequantized.T
    assert torch.allclose(padded_out[:, :576], x @ dequantized[:576, :576].T, atol=1e-5)


def test_int4_folded_zero_point_gives_the_quantizers_weight():
    """``folded``: ``q * scale + (-scale * zero)`` in AWQ's float16 is ``(q - zero) * scale`` to float16's rounding,
    every value of q and zero included. Mutation: folding ``+scale * zero`` is off by twice the zero point."""
    from harness.engines.int4 import folded, quantize

    torch.manual_seed(0)
    w = torch.randn(16, 256) * torch.logspace(-3, 0, 16).view(16, 1)
    q, scale, zero = quantize(w, group_size=128)
    scales, zeros = folded(scale, zero)
    assert scales.dtype == zeros.dtype == torch.float16
    got = q.view(16, 2, 128) * scales.float().unsqueeze(-1) + zeros.float().unsqueeze(-1)
    want = (q.view(16, 2, 128) - zero.unsqueeze(-1)) * scale.unsqueeze(-1)
    assert ((got - want).abs() <= 2e-3 * scale.unsqueeze(-1) * 16).all()


def test_awq_build_key_changes_with_sources_builder_torch_nvcc_and_gpu(tmp_path, monkeypatch):
    """The built kernels' folder is keyed by everything that changes the library (harness/engines/awq_kernels.py): the
    source archive's sha256, the builder module (its binding and flags with it), torch's version, nvcc's and the GPU's
    capability each give a new key, so a library built from other code or for another torch is never loaded.
    Mutation: leaving the builder module out of the key keeps the key when the build recipe changes."""
    from harness.engines import awq_kernels

    args = ("Cuda compilation tools, release 13.0", (9, 0))
    keys = {"first": awq_kernels.build_key(awq_kernels.SDIST_SHA256, *args)}
    assert awq_kernels.build_key(awq_kernels.SDIST_SHA256, *args) == keys["first"]
    keys["sources"] = awq_kernels.build_key("0" * 64, *args)
    builder = tmp_path / "awq_builder.py"
    builder.write_bytes(awq_kernels.BUILDER.read_bytes() + b"# another build recipe\n")
    monkeypatch.setattr(awq_kernels, "BUILDER", builder)
    keys["builder"] = awq_kernels.build_key(awq_kernels.SDIST_SHA256, *args)
    monkeypatch.setattr(torch, "__version__", torch.__version__ + "+other")
    keys["torch"] = awq_kernels.build_key(awq_kernels.SDIST_SHA256, *args)
    keys["nvcc"] = awq_kernels.build_key(awq_kernels.SDIST_SHA256, "Cuda compilation tools, release 13.1", (9, 0))
    keys["gpu"] = awq_kernels.build_key(awq_kernels.SDIST_SHA256, args[0], (8, 0))
    assert len(set(keys.values())) == len(keys), keys


def _archive(path, files: dict[str, str]) -> None:
    import io
    import tarfile

    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))


def test_awq_sources_are_the_checked_archive_and_missing_tools_are_named(tmp_path, monkeypatch):
    """The kernels are built only from gptqmodel's archive with the pinned sha256: a missing archive names the
    command that fetches it, another archive is refused with both digests; without nvcc the error says so. The
    extraction takes the AWQ sources and the text of ``pack_intweight`` alone, never running its module (which imports
    gptqmodel); a module without the function is refused. Mutation: taking the whole module's text would carry its
    gptqmodel import into pack.py."""
    from torch.utils import cpp_extension

    from harness.engines import awq_kernels
    from harness.engines.kernel_build import CompilerMissing, nvcc

    monkeypatch.delenv("QLORA_GPTQMODEL_SDIST", raising=False)
    with pytest.raises(RuntimeError, match="pip download --no-deps gptqmodel==7.7.0 -d runs/_kernels"):
        awq_kernels.sdist(tmp_path)
    archive = tmp_path / awq_kernels.SDIST
    pack = "def pack_intweight(unpacked_qweight, interleave, kstride):\n    return unpacked_qweight[::interleave]"
    module = f"from ...quantization import FORMAT\n\n\n{pack}\n\n\nclass AwqGEMVFastLinear:\n    pass\n"
    _archive(archive, {"gptqmodel-7.7.0/gptqmodel_ext/awq/gemv_fast_cuda_entry.cu": "// kernel",
                       "gptqmodel-7.7.0/gptqmodel/__init__.py": "raise ImportError",
                       f"gptqmodel-7.7.0/{awq_kernels.PACK_MODULE}": module})
    with pytest.raises(RuntimeError, match=f"sha256 [0-9a-f]{{64}}, not gptqmodel 7.7.0's {awq_kernels.SDIST_SHA256}"):
        awq_kernels.sdist(tmp_path)
    sources, text = awq_kernels._extract(archive, tmp_path / "src")
    assert [p.name for p in sources.iterdir()] == ["gemv_fast_cuda_entry.cu"] and text == pack
    assert not (tmp_path / "src" / "gptqmodel-7.7.0" / "gptqmodel" / "__init__.py").exists()
    scope: dict = {}
    exec(text, scope)
    assert scope["pack_intweight"]([1, 2, 3, 4, 5], 2, 64) == [1, 3, 5]
    bare = tmp_path / "bare.tar.gz"
    _archive(bare, {f"gptqmodel-7.7.0/{awq_kernels.PACK_MODULE}": "import torch\n"})
    with pytest.raises(RuntimeError, match="defines no pack_intweight"):
        awq_kernels._extract(bare, tmp_path / "bare")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)  # what torch found: none on this machine
    with pytest.raises(CompilerMissing, match="merged-int4 compiles CUDA kernels .* put nvcc on the PATH or set CUDA"):
        nvcc("merged-int4")


def test_gemv_build_key_changes_with_kernel_source_builder_torch_nvcc_and_gpu(tmp_path, monkeypatch):
    """The merged engine's GEMV library is keyed by everything that changes it (harness/engines/gemv.py): gemv.cu,
    the module that builds and binds it, torch's version, nvcc's and the GPU's capability each give a new key, so a
    library built from other code or for another torch is never loaded. Mutation: leaving gemv.cu out of the key keeps
    the key when a kernel changes."""
    from harness.engines import gemv

    args = ("Cuda compilation tools, release 13.0", (9, 0))
    keys = {"first": gemv.build_key(*args)}
    assert gemv.build_key(*args) == keys["first"]
    source = tmp_path / "gemv.cu"
    source.write_bytes(gemv.SOURCE.read_bytes() + b"// another kernel\n")
    monkeypatch.setattr(gemv, "SOURCE", source)
    keys["source"] = gemv.build_key(*args)
    builder = tmp_path / "gemv.py"
    builder.write_bytes(gemv.BUILDER.read_bytes() + b"# another binding\n")
    monkeypatch.setattr(gemv, "BUILDER", builder)
    keys["builder"] = gemv.build_key(*args)
    monkeypatch.setattr(torch, "__version__", torch.__version__ + "+other")
    keys["torch"] = gemv.build_key(*args)
    keys["nvcc"] = gemv.build_key("Cuda compilation tools, release 13.1", (9, 0))
    keys["gpu"] = gemv.build_key(args[0], (8, 0))
    assert len(set(keys.values())) == len(keys), keys


def test_gemv_op_shapes_follow_its_epilogue():
    """torch.compile traces ``qlora::gemv`` through its fake: one row of n outputs, or n / 2 with ``silu_pairs`` (the
    gate/up product becomes down's input). Mutation: a fake that ignores ``silu_pairs`` gives down a 2x-wide input."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from harness.engines.gemv import gemv

    with FakeTensorMode():
        x, w = torch.empty(1, 1, 64, dtype=torch.bfloat16), torch.empty(96, 64, dtype=torch.bfloat16)
        assert gemv(x, w, None, 0.0, None, False, True).shape == (1, 96)
        assert gemv(x, w, torch.empty(64, dtype=torch.bfloat16), 1e-5, None, True, True).shape == (1, 48)


def test_gemv_decoder_off_cuda_computes_the_fused_decoders_products(model):
    """Off CUDA ``GemvDecoder`` goes through ``FusedDecoder``'s own products, for a prompt and for one-token steps
    alike (on CUDA a one-token step runs gemv.cu), so the CPU self-tests cover the layer code the GPU runs around the
    kernels. Mutation: sending one-token steps to the CUDA op whatever the device fails here."""
    from harness.engines.gemv import GemvDecoder

    layers = fuse_projections_(model)
    fused, hand = FusedDecoder(model, layers), GemvDecoder(model, layers)
    mask = torch.ones(1, 8, dtype=torch.bool)
    with torch.no_grad():
        for ids, start in ((torch.tensor([[1, 5, 9, 14]]), 0), (torch.tensor([[7]]), 4)):
            at = torch.arange(start, start + ids.shape[1])
            torch.testing.assert_close(hand(ids, at[None], at, mask, hand.new_cache(1, 8)),
                                       fused(ids, at[None], at, mask, fused.new_cache(1, 8)), rtol=0, atol=0)


def test_gemv_decoder_check_passes_its_own_products_and_refuses_a_wrong_or_nan_one(model):
    """``GemvDecoder.check`` (run when the merged engine is built on CUDA) holds each product to ``FusedDecoder``'s,
    the residual stream compared by what a layer adds to it. On the CPU the products are the fused decoder's and pass;
    mutations: an MLP adding a tenth too much, and a head returning NaN, each named."""
    from harness.engines.gemv import GemvDecoder

    layers = fuse_projections_(model)
    GemvDecoder(model, layers).check()

    class TenthTooMuch(GemvDecoder):
        def mlp(self, proj, norm, x):
            return x + (super().mlp(proj, norm, x) - x) * 1.1

    with pytest.raises(RuntimeError, match=r"kernel for gate/up and down is wrong \(relative error 0\.1"):
        TenthTooMuch(model, layers).check()

    class NanHead(GemvDecoder):
        def head(self, x):
            return super().head(x) * float("nan")

    with pytest.raises(RuntimeError, match=r"kernel for lm_head is wrong \(relative error nan"):
        NanHead(model, layers).check()


def test_a_step_compiled_per_layer_makes_one_graph_a_region_and_decodes_as_the_model(model):
    """``GemvDecoder`` asks ``FusedGreedy`` to compile its step per layer: prepare, one decoder layer for all of them,
    and the step's end, each compiled once per shape (inductor, here on the CPU). The tokens are ``generate``'s.
    Mutation: a layer that reads a number of its own layer (so dynamo guards on it and compiles each layer apart) is
    refused by name before any token is kept."""
    from torch._dynamo.utils import counters

    from harness.engines.gemv import GemvDecoder

    expected = _hf_greedy(model, 9)
    decoder = GemvDecoder(model, fuse_projections_(model))
    engine = FusedGreedy(model, decoder, Tok(), "merged", Cfg(), compile_on_cpu=True)
    assert engine.regions == 3 and "compiled per layer" in engine.note
    before = counters["stats"]["unique_graphs"]
    assert engine.generate(PROMPTS, 9, batch_size=3, fixed_length=True) == expected
    assert counters["stats"]["unique_graphs"] - before == 3

    class GuardsOnItsLayer(GemvDecoder):
        def layer(self, x, *args):
            return super().layer(x, *args) * (1 + 0 * args[-3].number)  # args[-3]: the layer's projections

    decoder = GuardsOnItsLayer(model, fuse_projections_(model))
    for number, proj in enumerate(decoder.projections):
        proj.number = number
    engine = FusedGreedy(model, decoder, Tok(), "merged", Cfg(), compile_on_cpu=True)
    with pytest.raises(RuntimeError, match=r"merged: compiling the decode step for 3 rows made [4-9] graphs, where "
                                           r"its 3 region\(s\) make one each"):
        engine.generate(PROMPTS, 9, batch_size=3, fixed_length=True)


def test_a_step_compiled_whole_makes_one_graph_and_decodes_as_the_model(model):
    """``FusedDecoder`` (the generic layout: cuBLAS's products) has its step compiled whole, fullgraph (inductor, on the
    CPU): one graph per shape, the tokens ``generate``'s. Mutation: ``layers`` choosing its layer function with
    ``layer or self.layer`` (a branch on a bound method) fails to compile under torch 2.11, the GPU image's
    (``bash .ci/device_libs``), as it did on the H200 at 6b8d020; torch 2.13's dynamo traces it."""
    from torch._dynamo.utils import counters

    expected = _hf_greedy(model, 9)
    engine = FusedGreedy(model, FusedDecoder(model, fuse_projections_(model)), Tok(), "merged-int4", Cfg(),
                         compile_on_cpu=True)
    assert engine.regions == 1 and "compiled whole" in engine.note
    before = counters["stats"]["unique_graphs"]
    assert engine.generate(PROMPTS, 9, batch_size=3, fixed_length=True) == expected
    assert counters["stats"]["unique_graphs"] - before == 1


def _int4_projections_on_the_cpu(model):
    """merged-int4's ``Int4Linear`` projections of ``model``, multiplied on the CPU: AWQ's kernels are CUDA only, so
    ``awq_linear`` gets a CPU kernel computing the product with the dequantized weight, and the packing is left out
    (the identity): what is checked is the decoder around the kernel, as with ``_gemv_standin``."""
    from harness.engines.awq_kernels import GROUP_SIZE, awq_linear
    from harness.engines.int4 import int4_projections

    def product(x, qweight, scales, zeros, out_features):
        weight = (qweight * scales.t().float().repeat_interleave(GROUP_SIZE, 1)
                  + zeros.t().float().repeat_interleave(GROUP_SIZE, 1))
        return (x.float() @ weight.T).half()

    awq_linear.register_kernel("cpu")(product)
    return int4_projections(fuse_projections_(model), SimpleNamespace(pack_intweight=lambda q, bits, interleave: q))


def test_the_int4_step_compiled_per_layer_makes_one_graph_a_region_and_decodes_as_the_whole_layout(model):
    """merged-int4's ``Int4Decoder`` hands each layer's down product, float16 as AWQ's kernel leaves it, to the next
    layer's region, which adds it to the residual stream before its RMSNorm: compiled per layer (inductor, here on the
    CPU) it makes one graph a region, and its greedy tokens and teacher-forced logits are those of ``FusedDecoder``'s
    layout (each layer adding its own product) over the same 4-bit projections, run eagerly. Mutations: a layer that
    drops the product it is handed, or a ``layers`` that drops the last one, changes the tokens."""
    from torch._dynamo.utils import counters

    from harness.engines.int4 import Int4Decoder

    projections = _int4_projections_on_the_cpu(model)
    whole = FusedGreedy(model, FusedDecoder(model, projections), Tok(), "merged-int4", Cfg())
    expected = whole.generate(PROMPTS, 9, batch_size=3, fixed_length=True)
    engine = FusedGreedy(model, Int4Decoder(model, projections), Tok(), "merged-int4", Cfg(), compile_on_cpu=True)
    assert engine.regions == 3 and "compiled per layer" in engine.note
    before = counters["stats"]["unique_graphs"]
    assert engine.generate(PROMPTS, 9, batch_size=3, fixed_length=True) == expected
    assert counters["stats"]["unique_graphs"] - before == 3
    forced = [4, 8, 15, 16, 23, 42]
    torch.testing.assert_close(engine.forced_logits(PROMPTS[0], forced), whole.forced_logits(PROMPTS[0], forced),
                               rtol=1e-4, atol=1e-4)


def _gemv_standin(x, weight, norm_weight, eps, residual, silu_pairs, pdl):
    """What gemv.cu's ``gemv`` computes, composed in torch (the model's own RMSNorm arithmetic)."""
    x = x.reshape(1, -1)
    if norm_weight is not None:
        h = x.float()
        x = norm_weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    y = torch.nn.functional.linear(x, weight)
    if silu_pairs:
        gate, up = y.chunk(2, dim=-1)
        y = torch.nn.functional.silu(gate) * up
    return y if residual is None else residual.reshape(1, -1) + y


def test_the_code_around_the_one_row_kernels_decodes_as_the_model(model, monkeypatch):
    """The CPU never runs gemv.cu, so the Python around its op (which norm, residual and epilogue each product gets)
    is checked here: the op replaced by a torch composition of what the kernel computes, one-row steps sent to it as
    on CUDA, the greedy tokens must be ``generate``'s. Mutation: a residual or a norm left out changes the
    tokens."""
    import harness.engines.gemv as hand

    monkeypatch.setattr(hand, "gemv", _gemv_standin)
    monkeypatch.setattr(hand.GemvDecoder, "_one_row", staticmethod(lambda x: x.numel() == x.shape[-1]))
    expected = _hf_greedy(model, 10)
    decoder = hand.GemvDecoder(model, fuse_projections_(model))
    engine = FusedGreedy(model, decoder, Tok(), "merged", Cfg())
    assert [engine.generate([p], 10, batch_size=1, fixed_length=True)[0] for p in PROMPTS] == expected


def test_a_shape_made_by_forced_logits_is_still_compiled_and_captured_before_generate_uses_it(model, monkeypatch):
    """Parity's ``forced_logits`` can make a shape before ``generate`` first uses it (the latency prompt's 1 x 256 is
    also a parity shape): ``generate`` must still compile and capture it, or the timed rounds would run uncaptured
    steps from Python. torch.compile is stubbed here (nothing is compiled on the CPU); what is checked is that the
    shape goes through ``_compile_shape``. Mutation: deciding on the shape's first use instead fails here."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    engine = FusedGreedy(model, FusedDecoder(model, fuse_projections_(model)), Tok(), "merged", Cfg(),
                         compile_on_cpu=True)
    prompt = PROMPTS[0]
    engine.forced_logits(prompt, [4, 8, 15, 16, 23, 42])
    (shape,) = engine._shapes.values()
    assert not shape.compiled
    expected = FusedGreedy(model, FusedDecoder(model, fuse_projections_(model)), Tok(), "merged", Cfg()).generate(
        [prompt], 10, batch_size=1, fixed_length=True)
    assert engine.generate([prompt], 10, batch_size=1, fixed_length=True) == expected
    assert list(engine._shapes.values()) == [shape] and shape.compiled


def test_forced_logits_replays_the_one_step_graph_of_a_captured_shape(model):
    """On CUDA a captured shape also holds a one-step graph, and ``forced_logits`` replays it for each forced token
    instead of launching the step's kernels one by one from Python (parity's teacher forcing). Nothing is captured on
    the CPU, so a stand-in that runs the step and counts its replays takes the graph's place: the logits must be the
    step's own, one replay a token. Mutation: ignoring the graph (always the step from Python) replays nothing."""
    engine = FusedGreedy(model, FusedDecoder(model, fuse_projections_(model)), Tok(), "merged", Cfg())
    prompt, forced = PROMPTS[0], [4, 8, 15, 16, 23, 42]
    expected = engine.forced_logits(prompt, forced)
    (shape,) = engine._shapes.values()
    replays = []
    shape.step_graph = SimpleNamespace(replay=lambda: replays.append(engine._step(shape)))
    assert torch.equal(engine.forced_logits(prompt, forced), expected)
    assert len(replays) == len(forced)


def test_the_cache_holds_the_warm_up_chunk_even_for_one_new_token(model, monkeypatch):
    """The warm-up that compiles a shape decodes one whole chunk from slot 0, so the cache must hold a chunk even when
    only one token is asked for and the bucket is smaller than a chunk. Mutation: sizing it for the asked tokens alone
    writes past the cache's end (an index error here; on CUDA a write out of bounds)."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    cfg = Cfg()
    cfg.cache_bucket, cfg.graph_tokens = 1, 4
    engine = FusedGreedy(model, FusedDecoder(model, fuse_projections_(model)), Tok(), "merged", cfg,
                         compile_on_cpu=True)
    assert engine.cache_length(2, 1) >= 2 + cfg.graph_tokens
    assert len(engine.generate([[1, 5]], 1, batch_size=1, fixed_length=True)[0]) == 1
