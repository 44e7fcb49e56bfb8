"""Decode probe (issue 17): time candidate merged engines on the Mistral-7B shape with random bf16 weights, in one
process on one GPU, so every ratio comes from one run. Not part of the harness: the winners move into
harness/engines/fused.py and are measured again by ``python -m harness.bench.decode``.

  OUT=/tmp/probe python .ci/decode_probe.py [config ...]

Writes $OUT/decode-probe.json and prints a table last. ``gemv`` times each projection's product alone (bf16 through
cuBLAS against gemlite's 4-bit kernels), replayed from a CUDA graph so launch costs stay out.
"""

import json
import os
import statistics
import sys
import time
import traceback

import torch

sys.path.insert(0, os.getcwd())
from harness.engines.decoding import StaticGreedy  # noqa: E402
from harness.engines.fused import FusedDecoder, FusedGreedy, fuse_projections_  # noqa: E402
from harness.models.base import synthetic_config  # noqa: E402

OUT = os.environ.get("OUT", "/tmp")
TOKENS, ROUNDS, BUDGET_S = 128, 10, float(os.environ.get("PROBE_BUDGET_S", 480))
START = time.time()
results: dict = {"tries": [], "gemv": [], "torch": torch.__version__}


def log(*a):
    print(f"[{time.time() - START:6.1f}s]", *a, flush=True)


def save():
    with open(os.path.join(OUT, "decode-probe.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)


class Tok:
    pad_token_id, eos_token_id = 0, 2


class Cfg:
    def __init__(self, mode, graph_tokens=16, int4_group_size=128):
        self.compile, self.compile_mode, self.compile_fullgraph, self.cache_bucket = True, mode, True, 256
        self.graph_tokens, self.int4_group_size, self.merged_dtype = graph_tokens, int4_group_size, "bfloat16"


def kernel_ms(fn) -> float:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(e.device_time_total for e in prof.events()
               if e.device_type == torch.autograd.DeviceType.CUDA) / 1e3


def time_engine(name, engine, prompt, reference=None, extra=None):
    run = lambda: engine.generate([prompt], TOKENS, batch_size=1, fixed_length=True)  # noqa: E731
    t0 = time.perf_counter()
    out = run()
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    run()
    samples = []
    for _ in range(ROUNDS):
        t = time.perf_counter()
        run()
        torch.cuda.synchronize()
        samples.append(time.perf_counter() - t)
    p50 = statistics.median(samples)
    gpu = kernel_ms(run)
    agree = None
    if reference is not None:
        agree = sum(a == b for a, b in zip(out[0], reference[0])) / TOKENS
    row = {"name": name, "p50_s": p50, "ms_per_token": p50 / TOKENS * 1e3, "kernel_ms_per_token": gpu / TOKENS,
           "first_call_s": first, "min_s": min(samples), "max_s": max(samples), "agreement_vs_first": agree,
           **(extra or {})}
    results["tries"].append(row)
    save()
    log(f"{name}: p50 {p50:.4f} s ({row['ms_per_token']:.2f} ms/token, kernels {row['kernel_ms_per_token']:.2f}), "
        f"first {first:.1f} s, agreement {agree}")
    return out


def gemv_us(mod, in_features: int) -> float:
    """Median time in us of ``mod`` on one bf16 row (four inputs in turn), replayed from a CUDA graph; the first call,
    where gemlite autotunes a shape it has no config for, runs before the capture."""
    import triton.testing

    xs = [torch.randn(1, in_features, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    mod(xs[0])
    i = [0]

    def f():
        i[0] = (i[0] + 1) % 4
        return mod(xs[i[0]])

    return triton.testing.do_bench_cudagraph(f, rep=50, return_mode="median") * 1e3


def gemv_bench(model, projections):
    """Each projection's GEMV alone at batch 1: bf16 (cuBLAS through F.linear) against the quantized candidates."""
    shapes = {"gate_up": projections[0].gate_up, "down": projections[0].down, "qkv": projections[0].qkv,
              "o": projections[0].o}
    only = os.environ.get("PROBE_QUANTIZERS")  # a comma list: time only these quantized candidates
    candidates = {"bf16": lambda lin: lin,
                  **{k: v for k, v in QUANTIZERS.items() if not only or k in only.split(",")}}
    for shape_name, lin in shapes.items():
        n, k = lin.weight.shape
        for cand, make in candidates.items():
            if time.time() - START > BUDGET_S / 2:
                log(f"gemv {shape_name} {cand}: skipped, half the probe budget spent")
                continue
            try:
                mod = make(lin)
                x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
                with torch.no_grad():
                    reference = x.float() @ lin.weight.float().T
                    error = ((mod(x).float() - reference).norm() / reference.norm()).item()
                ms = gemv_us(mod, k) / 1e3
                bytes_read = n * k * (2 if cand == "bf16" else 1 if "int8" in cand else 0.5)
                row = {"shape": shape_name, "n": n, "k": k, "candidate": cand, "us": ms * 1e3,
                       "tb_s_weights": bytes_read / (ms / 1e3) / 1e12, "relative_error": error}
                del mod
                results["gemv"].append(row)
                log(f"gemv {shape_name} {n}x{k} {cand}: {ms * 1e3:.1f} us, {row['tb_s_weights']:.2f} TB/s, "
                    f"relative error {error:.3g}")
            except Exception as e:  # noqa: BLE001
                log(f"gemv {shape_name} {cand} failed: {e!r}")
    save()


def gemv_retune(projections):
    """gemlite's int4 GEMV (the engine's kernel) per shape with the shipped H100 configs, then autotuned afresh on this
    GPU over gemlite's default config list (its configs and Triton's autotune cache cleared)."""
    from gemlite import core
    from gemlite.triton_kernels.gemv_revsplitK_kernels import gemv_revsplitK

    from harness.engines.int4 import quantize_linear

    layer = projections[0]
    mods = {name: quantize_linear(getattr(layer, name), 128) for name in ("gate_up", "down", "qkv", "o")}
    bench = lambda mod: gemv_us(mod, mod.packed.in_features)  # noqa: E731
    rows = [{"shape": n, "configs": "h100-shipped", "us": bench(m)} for n, m in mods.items()]
    core.GemLiteLinear.reset_config()
    for kernel in gemv_revsplitK.kernel:
        kernel.cache.clear()
    for n, m in mods.items():
        t0 = time.time()
        us = bench(m)
        rows.append({"shape": n, "configs": "autotuned-here", "us": us, "tune_s": time.time() - t0})
    for r in rows:
        log(f"gemv-retune {r['shape']} {r['configs']}: {r['us']:.1f} us")
    results["gemv_retune"] = rows
    core.GemLiteLinear.cache_config(os.path.join(OUT, "gemlite-configs-retuned.json"))
    save()


class Manual(torch.nn.Module):
    """A gemlite module called with a fixed kernel type instead of gemlite's choice for the row count."""

    def __init__(self, mod, matmul_type):
        super().__init__()
        self.mod, self.matmul_type = mod, matmul_type

    def forward(self, x):
        return self.mod.forward_manual(x, self.matmul_type)


class BnbNF4(torch.nn.Module):
    """bitsandbytes' NF4 (blocksize 64, double-quantized statistics) through matmul_4bit: one row takes gemv_4bit."""

    def __init__(self, lin):
        super().__init__()
        import bitsandbytes.functional as bf

        self.w, self.state = bf.quantize_4bit(lin.weight.detach(), quant_type="nf4", blocksize=64,
                                              compress_statistics=True)

    def forward(self, x):
        import bitsandbytes as bnb

        return bnb.matmul_4bit(x, self.w.t(), quant_state=self.state)


def _gemlite_int4(group, packing=None, matmul_type=None):
    def make(lin):
        from torchao.quantization.quant_primitives import _choose_qparams_and_quantize_affine_hqq
        import gemlite

        w_q, scale, zero, _ = _choose_qparams_and_quantize_affine_hqq(lin.weight.detach(), nbits=4,
                                                                      group_size=group, raw_output=True)
        mod = gemlite.helper.A16Wn(device=lin.weight.device, dtype=lin.weight.dtype,
                                   packing_bitwidth=packing).from_weights(w_q, scale, zero, 4, group, bias=None)
        return Manual(mod, matmul_type) if matmul_type else mod
    return make


def _gemlite_int8(lin):
    import gemlite

    return gemlite.helper.A16W8_INT8(device=lin.weight.device, dtype=lin.weight.dtype).from_weights(
        lin.weight.detach().clone())


def _torchao_int8(lin):
    import copy

    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    mod = copy.deepcopy(lin)
    quantize_(mod, Int8WeightOnlyConfig())
    return torch.compile(mod, fullgraph=True)


def _torchao_int4(packing, fp8_activations=False):
    """torchao's int4 weight-only tensor on mslk's CUTLASS kernels (formerly FBGEMM GenAI): ``plain`` calls
    ``bf16i4bf16_rowwise``, ``preshuffled`` ``bf16i4bf16_shuffled``; with ``fp8_activations`` each row is quantized to
    fp8 and ``f8i4bf16_shuffled`` multiplies (a quality cost beyond the weights')."""
    def make(lin):
        import copy

        from torchao.quantization import Float8DynamicActivationInt4WeightConfig, Int4WeightOnlyConfig, quantize_

        mod = copy.deepcopy(lin)
        quantize_(mod, Float8DynamicActivationInt4WeightConfig(int4_packing_format=packing) if fp8_activations
                  else Int4WeightOnlyConfig(group_size=128, int4_packing_format=packing))
        return mod
    return make


def _marlin(lin):
    """The harness's own merged-int4 projection (Marlin, harness/engines/int4.py); its kernels built in /tmp."""
    from harness.engines.int4 import quantize_linear
    from harness.engines.marlin import load

    return quantize_linear(lin, 128, load(os.environ.get("PROBE_KERNELS", "/tmp/probe-kernels")), check=True)


QUANTIZERS = {
    "int4-g128": _gemlite_int4(128),
    "int4-marlin": _marlin,
    "int4-mslk-plain": _torchao_int4("plain"),
    "int4-mslk-shuffled": _torchao_int4("preshuffled"),
    "f8i4-mslk-shuffled": _torchao_int4("preshuffled", fp8_activations=True),
    "int4-g64": _gemlite_int4(64),
    "int4-g128-p8": _gemlite_int4(128, packing=8),
    "int4-g128-GEMV": _gemlite_int4(128, matmul_type="GEMV"),
    "int4-g128-SPLITK": _gemlite_int4(128, matmul_type="GEMV_SPLITK"),
    "nf4-bnb": BnbNF4,
    "int8-gemlite": _gemlite_int8,
    "int8-torchao": _torchao_int8,
}


def quantized_engine(model, projections, cand, group=128):
    """Int4Merged's engine with another quantizer for the projections (the harness's own is QUANTIZERS['int4-g128'])."""
    from harness.engines import int4

    saved = int4.quantize_linear
    int4.quantize_linear = lambda lin, _group, **_: QUANTIZERS[cand](lin)
    try:
        return int4.Int4Merged(model, projections, Tok(), Cfg("default", int4_group_size=group))
    finally:
        int4.quantize_linear = saved


class EfficientAttention(FusedDecoder):
    def attend(self, q, keys, values, mask):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
            return torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                                                    enable_gqa=True)


class MathAttention(FusedDecoder):
    """Two small batched products and a softmax that inductor can fuse with the mask."""

    def attend(self, q, keys, values, mask):
        rows, heads, steps, dim = q.shape
        group = heads // self.kv_heads
        qg = q.reshape(rows, self.kv_heads, group * steps, dim)
        scores = (qg @ keys.transpose(-1, -2)).float() * dim ** -0.5
        scores = scores.view(rows, self.kv_heads, group, steps, -1).masked_fill(~mask[:, :, None], float("-inf"))
        probs = scores.softmax(-1).to(q.dtype).view(rows, self.kv_heads, group * steps, -1)
        return (probs @ values).view(rows, heads, steps, dim)


def best_quantizer() -> str:
    """The quantized candidate with the least GEMV time summed over the shapes every candidate finished."""
    rows = [r for r in results["gemv"] if r["candidate"] != "bf16"]
    done = {}
    for r in rows:
        done.setdefault(r["candidate"], {})[r["shape"]] = r["us"]
    shapes = set.intersection(*(set(v) for v in done.values()))
    best = min(done, key=lambda c: sum(done[c][s] for s in shapes))
    log(f"q-best: {best} ({sum(done[best][s] for s in shapes):.1f} us over {sorted(shapes)})")
    results["q_best"] = best
    return best


def pdl_engine(model, projections):
    """The fused engine with inductor's programmatic dependent launch (Hopper: a kernel starts while the previous
    one drains), where this torch has the switch."""
    import torch._inductor.config as ic

    if not hasattr(ic.triton, "enable_pdl"):
        raise RuntimeError(f"torch {torch.__version__} has no inductor triton.enable_pdl")
    return FusedGreedy(model, FusedDecoder(model, projections), Tok(), "merged", Cfg("default"),
                       inductor_options={"triton.enable_pdl": True})


def main(selected):
    results["device"] = torch.cuda.get_device_name()
    torch.manual_seed(0)
    with torch.device("cuda"):
        torch.set_default_dtype(torch.bfloat16)
        model = MistralForCausalLM(synthetic_config("mistral-7b"))
        torch.set_default_dtype(torch.float32)
    model.eval()
    log("model built", torch.cuda.memory_allocated() / 2**30, "GiB")
    projections = fuse_projections_(model)
    prompt = [1] + torch.randint(3, 32000, (30,)).tolist()
    try:
        import gemlite
        from gemlite import core

        if core.selected_tag is None:
            path = os.path.join(os.path.dirname(gemlite.__file__), "configs", "h100.json")
            log("no gemlite config for this GPU name; loading", path, core.GemLiteLinear.load_config(path))
        results["gemlite"] = getattr(gemlite, "__version__", "?")
    except Exception as e:  # noqa: BLE001
        log("gemlite import failed", repr(e))
    if "gemv" in selected:
        gemv_bench(model, projections)
    if "gemv-retune" in selected:
        gemv_retune(projections)
    reference = None
    tries = {
        "fused-cublas": lambda: FusedGreedy(model, FusedDecoder(model, projections), Tok(), "merged", Cfg("default")),
        "fused-cdt": lambda: FusedGreedy(model, FusedDecoder(model, projections), Tok(), "merged", Cfg("default"),
                                         inductor_options={"coordinate_descent_tuning": True}),
        "control-hf-step-graph": lambda: StaticGreedy(model, Tok(), "merged", Cfg("reduce-overhead")),
        "fused-efficient-attn": lambda: FusedGreedy(model, EfficientAttention(model, projections), Tok(), "merged",
                                                    Cfg("default")),
        "fused-math-attn": lambda: FusedGreedy(model, MathAttention(model, projections), Tok(), "merged",
                                               Cfg("default")),
        "fused-graph-64": lambda: FusedGreedy(model, FusedDecoder(model, projections), Tok(), "merged",
                                              Cfg("default", graph_tokens=64)),
    }
    from harness.engines.int4 import Int4Merged

    tries["int4-g128"] = lambda: Int4Merged(model, projections, Tok(), Cfg("default", int4_group_size=128))
    tries["int4-g64"] = lambda: Int4Merged(model, projections, Tok(), Cfg("default", int4_group_size=64))
    for cand in QUANTIZERS:
        tries.setdefault(f"q-{cand}", lambda cand=cand: quantized_engine(model, projections, cand))
    tries["fused-pdl"] = lambda: pdl_engine(model, projections)
    if "q-best" in selected:
        tries["q-best"] = lambda: quantized_engine(model, projections, best_quantizer())
    order = [t for t in selected if t in tries]
    for name in order:
        if time.time() - START > BUDGET_S:
            log(f"skipping {name}: probe budget spent")
            continue
        try:
            torch._dynamo.reset()
            engine = tries[name]()
            mem0 = torch.cuda.memory_allocated()
            out = time_engine(name, engine, prompt, reference, {"resident_gib": mem0 / 2**30})
            reference = reference or out
            del engine
            torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001
            tb = traceback.format_exc()
            results["tries"].append({"name": name, "error": tb[-3000:]})
            save()
            log(f"{name} FAILED:\n{tb[-2000:]}")
    try:
        from gemlite import core

        core.GemLiteLinear.cache_config(os.path.join(OUT, "gemlite-configs.json"))
    except Exception as e:  # noqa: BLE001
        log("gemlite cache_config failed", repr(e))
    print("\nname | p50 s | ms/token | kernels ms/token | first s | agreement")
    for r in results["tries"]:
        if "error" in r:
            print(f"{r['name']} | FAILED")
        else:
            print(f"{r['name']} | {r['p50_s']:.4f} | {r['ms_per_token']:.2f} | {r['kernel_ms_per_token']:.2f} | "
                  f"{r['first_call_s']:.1f} | {r['agreement_vs_first']}")


if __name__ == "__main__":
    from transformers import MistralForCausalLM

    main(sys.argv[1:] or ["fused-cublas", "int4-g128", "fused-math-attn", "fused-efficient-attn", "int4-g64",
                          "fused-graph-64", "fused-cdt", "control-hf-step-graph"])
