"""Decode probe (issue 17): time candidate changes to the merged engines on the Mistral-7B shape with random bf16
weights, in one process on one GPU, so every ratio comes from one run. Not part of the harness: a winner moves into
harness/engines/ and is measured again by the user's GPU command (`bash .ci/gpu synthetic`).

  QLORA_GPTQMODEL_SDIST=<gptqmodel-7.7.0.tar.gz> OUT=/tmp/probe python .ci/decode_probe.py [try ...]

Writes $OUT/decode-probe.json and prints a table last. Tries (the defaults, in order): the shipped engines and their
attention replaced (``ATTENTION``), each bf16 (``fused-*``) and over ``merged-int4``'s 4-bit projections (``int4-*``,
AWQ's kernels), a last suffix from ``INDUCTOR`` adding inductor options; ``census-*`` lists the kernels of one decoded
token; ``gemv`` times each 4-bit projection alone against cuBLAS (``int4_gemv_bench``); ``fastgemv-*`` runs the bf16
one-row products through fbgemm-gpu-genai's ``bf16_fast_gemv``, ``*-mqa`` decode attention through its ``mqa_attn``,
``gemv-bf16`` and ``attention`` time those kernels alone (the wheel on ``PYTHONPATH``); ``smol-shapes`` checks the
4-bit kernels on SmolLM2's padded projections; ``hand-*`` are the merged engine's own one-row kernels
(harness/engines/gemv.cu: ``hand`` as shipped with inductor's kernels launched without PDL, ``hand-ipdl`` with it as
the merged engine does, ``hand-nopdl`` without any, ``hand-whole`` as ``hand-ipdl`` with the step compiled whole
instead of per layer; ``gemv-hand`` times each product alone, ``hand-variants`` other block shapes of the kernel,
``hand-forced`` compares logits, ``hand-smol`` checks SmolLM2's shapes); ``int4-layers`` is ``merged-int4`` as
shipped, its step compiled per layer (``Int4Decoder``), where ``int4`` compiles ``FusedDecoder``'s step whole (for
their first calls run with ``TORCHINDUCTOR_FORCE_DISABLE_CACHES=1``: the second would reuse the first's Triton
kernels); ``nf4-nested`` times ``nf4-compiled``'s step compiled whole against with its layers one nested region,
``nf4-layers`` the nested region against ``nf4_layers.nf4_compiled`` (bitsandbytes and peft on ``PYTHONPATH``; run
first, without the 7B model or the kernels' build). The 4-bit kernels are built in the background while the bf16 tries
run. Earlier tries' candidates are in this file's history: gemlite, mslk and bitsandbytes at a2494d1, Marlin's options
and gptqmodel's AWQ GEMV against Marlin at fda6cda, a one-row attention kernel at f006e2b, RoPE folded into the q/k/v
kernel (``hand-rope``) at 34dff5a.
"""

import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, os.getcwd())
from harness.bench.decode import _kernels  # noqa: E402
from harness.engines import awq_kernels  # noqa: E402
from harness.engines import gemv as hand  # noqa: E402
from harness.engines import kernel_build  # noqa: E402
from harness.engines.fused import FusedDecoder, FusedGreedy, fuse_projections_  # noqa: E402
from harness.engines.int4 import Int4Decoder, Int4Merged, int4_projections, quantize_linear  # noqa: E402
from harness.models.base import synthetic_config  # noqa: E402
from harness.report.atomic import atomic_write_text  # noqa: E402
from harness.report.provenance import git_sha  # noqa: E402

OUT = os.environ.get("OUT", "/tmp")
KERNELS = Path(os.environ.get("PROBE_KERNELS", "runs/_kernels"))
TOKENS, ROUNDS, BUDGET_S = 128, 10, float(os.environ.get("PROBE_BUDGET_S", 480))
START = time.time()
results: dict = {"tries": [], "gemv": [], "census": {}, "torch": torch.__version__, "git_sha": git_sha()}


def log(*a):
    print(f"[{time.time() - START:6.1f}s]", *a, flush=True)


def save():
    atomic_write_text(Path(OUT) / "decode-probe.json", json.dumps(results, indent=1, default=str))


class Tok:
    pad_token_id, eos_token_id = 0, 2


class Cfg:
    compile, compile_mode, compile_fullgraph, cache_bucket, merged_dtype = True, "default", True, 256, "bfloat16"

    def __init__(self, graph_tokens=16):
        self.graph_tokens = graph_tokens


# --- attention candidates: FusedDecoder with another ``attend`` (and, where it needs one, another mask) -----------

class FloatBias(FusedDecoder):
    """The mask turned into an additive float bias once per step (SDPA converts a boolean one in each layer)."""

    def prepare(self, ids, positions, cache_position, pad_mask):  # every step's start, decode steps included
        self._bias = None
        return super().prepare(ids, positions, cache_position, pad_mask)

    def bias(self, q, mask):
        if self._bias is None:
            self._bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
        return self._bias


class FoldedCudnn(FloatBias):
    """One token's query heads folded onto their KV head (4 query rows per KV head): no grouped-query path."""

    def attend(self, q, keys, values, mask):
        rows, heads, steps, dim = q.shape
        if steps != 1:
            return super().attend(q, keys, values, mask)
        qg = q.reshape(rows, self.kv_heads, heads // self.kv_heads, dim)
        bias = self.bias(q, mask).expand(rows, self.kv_heads, heads // self.kv_heads, -1)
        return self.kernel(qg, keys, values, bias).reshape(rows, heads, 1, dim)

    def kernel(self, q, keys, values, bias):
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=bias)


class FoldedEfficient(FoldedCudnn):
    """As ``FoldedCudnn`` through the memory-efficient (CUTLASS) kernel."""

    def kernel(self, q, keys, values, bias):
        return torch.ops.aten._scaled_dot_product_efficient_attention(q, keys, values, bias, False)[0]


class Flex(FusedDecoder):
    """flex_attention for the decode step (inductor's flex-decoding kernel, grouped heads), the mask as a score_mod."""

    def attend(self, q, keys, values, mask):
        from torch.nn.attention.flex_attention import flex_attention

        if q.shape[2] != 1:
            return super().attend(q, keys, values, mask)

        def score_mod(score, b, h, q_idx, kv_idx):
            return torch.where(mask[b, 0, q_idx, kv_idx], score, -float("inf"))

        return flex_attention(q, keys, values, score_mod=score_mod, enable_gqa=True)


class FlashSeqused(FusedDecoder):
    """Decode attention through FlashAttention-2's varlen kernel (torch's ``_flash_attention_forward``), reading only
    the cache slots written so far (``seqused_k``) instead of masking the rest: one row without left padding."""

    def prepare(self, ids, positions, cache_position, pad_mask):  # every step's start, decode steps included
        self._used = (cache_position[-1:] + 1).to(torch.int32)
        return super().prepare(ids, positions, cache_position, pad_mask)

    def attend(self, q, keys, values, mask):
        rows, heads, steps, dim = q.shape
        if steps != 1 or rows != 1:
            return super().attend(q, keys, values, mask)
        length = keys.shape[2]
        cu_q = torch.tensor([0, 1], dtype=torch.int32, device=q.device)
        cu_k = torch.tensor([0, length], dtype=torch.int32, device=q.device)
        out = torch.ops.aten._flash_attention_forward(
            q.reshape(1, heads, dim), keys[0].transpose(0, 1), values[0].transpose(0, 1), cu_q, cu_k, 1, length, 0.0,
            False, False, seqused_k=self._used)[0]
        return out.reshape(1, heads, 1, dim)


# --- fbgemm-gpu-genai's batch-1 kernels (fbgemm-gpu-genai 1.6.0, the release for torch 2.11, carried as a wheel) ---
# bf16_fast_gemv: one warp row-blocks over K, no split-K reduce; mqa_attn: decode attention of one query position
# over the slots up to it, one block per (sequence, query head). Wrapped as custom ops so that dynamo traces them.

def load_fbgemm() -> None:
    import fbgemm_gpu.experimental.gen_ai  # noqa: F401  (registers torch.ops.fbgemm.*)


@torch.library.custom_op("probe::fast_gemv", mutates_args=())
def fast_gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.ops.fbgemm.bf16_fast_gemv(x, w)


@fast_gemv.register_fake
def _(x, w):
    return x.new_empty(x.shape[0], w.shape[0])


@torch.library.custom_op("probe::mqa", mutates_args=())
def mqa(xq: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, seq_positions: torch.Tensor,
        scale: float) -> torch.Tensor:
    return torch.ops.fbgemm.mqa_attn(xq, keys, values, seq_positions, scale)


@mqa.register_fake
def _(xq, keys, values, seq_positions, scale):
    return torch.empty_like(xq)


class FastGemvLinear(torch.nn.Module):
    """A bf16 Linear whose one-row products go through fbgemm's ``bf16_fast_gemv`` (K a multiple of 256); other
    row counts (the prefill) through cuBLAS, as before."""

    def __init__(self, lin: torch.nn.Linear):
        super().__init__()
        self.weight = lin.weight
        self.n, self.k = lin.weight.shape
        if self.k % 256:
            raise ValueError(f"bf16_fast_gemv needs K % 256 == 0 (block 32 x 8 per thread), not {self.k}")

    def forward(self, x):
        flat = x.reshape(-1, self.k)
        if flat.shape[0] != 1:
            return F.linear(x, self.weight)
        return fast_gemv(flat, self.weight).reshape(*x.shape[:-1], self.n)


class Mqa(FusedDecoder):
    """Decode attention through fbgemm's ``mqa_attn``: each KV head is a sequence of its own with its 4 query heads,
    and attends to the cache slots up to the current one (one row, no left padding; head_dim 128)."""

    def prepare(self, ids, positions, cache_position, pad_mask):  # every step's start, decode steps included
        self._seq = cache_position[-1:].to(torch.int32).expand(self.kv_heads).contiguous()
        return super().prepare(ids, positions, cache_position, pad_mask)

    def attend(self, q, keys, values, mask):
        rows, heads, steps, dim = q.shape
        if steps != 1 or rows != 1 or dim != 128:
            return super().attend(q, keys, values, mask)
        group = heads // self.kv_heads
        xq = q.reshape(self.kv_heads, group, 1, dim).transpose(1, 2)  # [kv_heads, 1, group, dim]
        out = mqa(xq, keys[0].unsqueeze(2), values[0].unsqueeze(2), self._seq, dim ** -0.5)
        return out.transpose(1, 2).reshape(1, heads, 1, dim)


def attention_bench():
    """Decode attention alone (graph replay), Mistral-7B's heads, at cache lengths a 128-token answer reaches."""
    for used in (32, 160, 512):
        length = 256 if used <= 256 else 768
        q = torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
        keys = torch.randn(1, 8, length, 128, device="cuda", dtype=torch.bfloat16)
        values = torch.randn_like(keys)
        mask = (torch.arange(length, device="cuda") < used)[None, None, None, :]
        seq = torch.full((8,), used - 1, dtype=torch.int32, device="cuda")
        sdpa = lambda: F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)  # noqa: E731
        xq = q.reshape(8, 4, 1, 128).transpose(1, 2)
        fb = lambda: mqa(xq, keys[0].unsqueeze(2), values[0].unsqueeze(2), seq, 128 ** -0.5)  # noqa: E731
        reference = sdpa().float()
        got = fb().transpose(1, 2).reshape(1, 32, 1, 128).float()
        error = ((got - reference).norm() / reference.norm()).item()
        import triton.testing

        for cand, fn in (("sdpa-cudnn", sdpa), ("fbgemm-mqa", fb)):
            us = triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median") * 1e3
            row = {"attention": cand, "used_slots": used, "cache_length": length, "us": us,
                   "relative_error_vs_sdpa": error if cand != "sdpa-cudnn" else 0.0}
            results["gemv"].append(row)
            log(f"attention {cand} used {used}/{length}: {us:.1f} us, error {row['relative_error_vs_sdpa']:.3g}")
    save()


def attention_check():
    """mqa_attn against SDPA under layouts and position conventions, to find why its output differed (0.44-0.51
    relative in the first run): one KV head alone; the query contiguous; positions as lengths; KV heads repeated to
    one per query head (the kernel's non-multiquery path)."""
    torch.manual_seed(1)
    length, used = 256, 160
    q = torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    keys = torch.randn(1, 8, length, 128, device="cuda", dtype=torch.bfloat16)
    values = torch.randn_like(keys)
    mask = (torch.arange(length, device="cuda") < used)[None, None, None, :]
    reference = F.scaled_dot_product_attention(q.float(), keys.float(), values.float(), attn_mask=mask,
                                               enable_gqa=True)

    def err(got):
        return ((got.float() - reference).norm() / reference.norm()).item()

    def call(xq, k, v, pos):
        return torch.ops.fbgemm.mqa_attn(xq, k, v, torch.full((xq.shape[0],), pos, dtype=torch.int32,
                                                              device="cuda"), 128 ** -0.5)

    xq = q.reshape(8, 4, 1, 128).transpose(1, 2)
    k1, v1 = keys[0].unsqueeze(2), values[0].unsqueeze(2)
    back = lambda o: o.transpose(1, 2).reshape(1, 32, 1, 128)  # noqa: E731
    rows = {
        "as-engine": back(call(xq, k1, v1, used - 1)),
        "query-contiguous": back(call(xq.contiguous(), k1, v1, used - 1)),
        "positions-as-lengths": back(call(xq.contiguous(), k1, v1, used)),
        "kv-contiguous-copies": back(call(xq.contiguous(), k1.contiguous().clone(), v1.contiguous().clone(),
                                          used - 1)),
    }
    rep_k = keys.repeat_interleave(4, dim=1).transpose(1, 2).contiguous()  # [1, L, 32, 128]
    rep_v = values.repeat_interleave(4, dim=1).transpose(1, 2).contiguous()
    rows["one-kv-head-per-query-head"] = call(q.transpose(1, 2).contiguous(), rep_k, rep_v, used - 1).transpose(1, 2)
    single = F.scaled_dot_product_attention(q[:, :1].float(), keys[:, :1, :used].float(), values[:, :1, :used].float())
    one = call(q[:, :1].transpose(1, 2).contiguous(), k1[:1].contiguous(), v1[:1].contiguous(), used - 1)
    out = {name: err(got) for name, got in rows.items()}
    out["single-head"] = ((one.transpose(1, 2).float() - single).norm() / single.norm()).item()
    out["sdpa-bf16"] = err(F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True))
    results["attention_check"] = out
    log("attention check:", json.dumps(out))
    save()


def bf16_gemv_bench(bf16_layer, lm_head):
    """Each bf16 projection alone (graph replay): cuBLAS (F.linear) against fbgemm's bf16_fast_gemv, and fbgemm's
    fp8-weight GEMV (per-tensor scale) for the record."""
    shapes = [(name, getattr(bf16_layer, name).weight) for name in ("gate_up", "down", "qkv", "o")]
    for name, w in shapes + [("lm_head", lm_head.weight)]:
        n, k = w.shape
        scale = (w.float().abs().amax() / 448.0).reshape(1)
        w8 = (w.float() / scale).to(torch.float8_e4m3fn)
        cands = (("cublas", 2, lambda x: F.linear(x, w)), ("fbgemm-fast-gemv", 2, lambda x: fast_gemv(x, w)),
                 ("fbgemm-fp8-gemv", 1, lambda x: torch.ops.fbgemm.bf16fp8bf16_fast_gemv(x, w8, scale)))
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        reference = x.float() @ w.float().T
        for cand, bytes_per, fn in cands:
            try:
                error = ((fn(x).float() - reference).norm() / reference.norm()).item()
                us = gemv_us(fn, k)
            except Exception as e:  # noqa: BLE001
                log(f"gemv {name} {cand} FAILED: {e!r}"[:400])
                continue
            row = {"shape": name, "n": n, "k": k, "candidate": cand, "us": us,
                   "tb_s_weights": n * k * bytes_per / us / 1e6, "relative_error": error}
            results["gemv"].append(row)
            log(f"gemv {name} {n}x{k} {cand}: {us:.1f} us, {row['tb_s_weights']:.2f} TB/s, error {error:.3g}")
    save()


class Int4Greedy(FusedGreedy):
    """FusedGreedy capturing on the stream AWQ's kernels launch on: ``Int4Merged``'s own choice."""

    _side_stream = Int4Merged._side_stream


def graph_us(calls, stream) -> float:
    """Per call, the replay of a CUDA graph of the ``calls`` cycled 4 times, captured on ``stream``, median of 20."""
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for _ in range(4):
            for call in calls:
                call()
    samples = []
    for _ in range(21):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / (4 * len(calls)))
    return statistics.median(samples[1:])


def call_times(calls, stream, repeats: int) -> dict:
    """Per call of ``calls`` (each after one warm-up): kernel time and launches from the profiler over ``repeats``
    passes, and replay time of a graph of them captured on ``stream``."""
    for call in calls:
        call()
    kernels = _kernels(lambda: [call() for _ in range(repeats) for call in calls])
    return {"kernel_us": sum(ms for ms, _ in kernels.values()) * 1e3 / (repeats * len(calls)),
            "kernels_per_call": sum(c for _, c in kernels.values()) / (repeats * len(calls)),
            "graph_us": graph_us(calls, stream)}


def int4_gemv_bench(bf16_layer, int4_layer):
    """Each projection alone, cuBLAS bf16 against the 4-bit one of ``merged-int4`` (AWQ's GEMV): kernel time per call
    (profiler, eager) and replay time per call (a graph captured on the per-thread default stream), each over copies
    of the weight that together exceed the L2 cache."""
    import copy

    stream = awq_kernels.capture_stream()
    for name in ("gate_up", "down", "qkv", "o"):
        lin, q = getattr(bf16_layer, name), getattr(int4_layer, name)
        n, k = lin.weight.shape
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        copies = max(2, -(-256 * 2**20 // (n * k // 2)))  # 4-bit copies over 256 MiB
        bf16_copies = max(2, -(-256 * 2**20 // (n * k * 2)))
        cands = {
            "cublas-bf16": (2, [lambda w=w: F.linear(x, w) for w in
                                [lin.weight] + [lin.weight.clone() for _ in range(bf16_copies - 1)]]),
            "int4": (0.5, [lambda m=m: m(x) for m in [q] + [copy.deepcopy(q) for _ in range(copies - 1)]]),
        }
        for cand, (bytes_per, calls) in cands.items():
            row = {"shape": name, "n": n, "k": k, "candidate": cand, "copies": len(calls)}
            with torch.no_grad():
                row.update(call_times(calls, stream, 8))
            row["tb_s_weights_kernel"] = n * k * bytes_per / row["kernel_us"] / 1e6
            row["tb_s_weights_graph"] = n * k * bytes_per / row["graph_us"] / 1e6
            results["gemv"].append(row)
            log(f"gemv {name} {n}x{k} {cand}: kernels {row['kernel_us']:.1f} us ({row['tb_s_weights_kernel']:.2f} "
                f"TB/s, {row['kernels_per_call']:.0f}/call), graph {row['graph_us']:.1f} us")
            save()
        del cands, calls
        torch.cuda.empty_cache()


def bf16_products(bf16_layer, model):
    """Per bf16 product of a layer and ``lm_head``: its name, weight, copies of it past L2 (256 MiB in all) and a
    random input row."""
    shapes = [(name, getattr(bf16_layer, name).weight) for name in ("gate_up", "down", "qkv", "o")]
    for name, w in shapes + [("lm_head", model.lm_head.weight)]:
        n, k = w.shape
        copies = [w] + [w.clone() for _ in range(max(1, -(-256 * 2**20 // (n * k * 2))) - 1)]
        yield name, w, copies, torch.randn(1, k, device="cuda", dtype=torch.bfloat16)


def hand_gemv_bench(bf16_layer, model):
    """Each bf16 product alone (graph replay over weight copies past L2): cuBLAS against gemv.cu's kernel, plain and
    with its prologue or epilogue (RMSNorm before q/k/v, gate/up and lm_head; SiLU(gate) * up before down; the
    residual after o and down), with and without programmatic dependent launch."""
    stream = torch.cuda.Stream()
    for name, w, copies, x in bf16_products(bf16_layer, model):
        n, k = w.shape
        res = torch.randn(1, n, device="cuda", dtype=torch.bfloat16)
        nw = torch.randn(k, device="cuda", dtype=torch.bfloat16)
        fused = {"gate_up": ("rmsnorm-silu", lambda c, pdl: hand.gemv(x, c, nw, 1e-5, None, True, pdl)),
                 "qkv": ("rmsnorm", lambda c, pdl: hand.gemv(x, c, nw, 1e-5, None, False, pdl)),
                 "lm_head": ("rmsnorm", lambda c, pdl: hand.gemv(x, c, nw, 1e-5, None, False, pdl)),
                 "down": ("residual", lambda c, pdl: hand.gemv(x, c, None, 0.0, res, False, pdl)),
                 "o": ("residual", lambda c, pdl: hand.gemv(x, c, None, 0.0, res, False, pdl))}[name]
        cands = {"cublas": lambda c: F.linear(x, c),
                 "hand": lambda c: hand.gemv(x, c, None, 0.0, None, False, False),
                 "hand-pdl": lambda c: hand.gemv(x, c, None, 0.0, None, False, True),
                 f"hand-{fused[0]}": lambda c: fused[1](c, False),
                 f"hand-{fused[0]}-pdl": lambda c: fused[1](c, True)}
        reference = x.float() @ w.float().T
        for cand, fn in cands.items():
            row = {"shape": name, "n": n, "k": k, "candidate": cand, "copies": len(copies)}
            try:
                if cand in ("cublas", "hand", "hand-pdl"):
                    row["relative_error"] = ((fn(w).float() - reference).norm() / reference.norm()).item()
                row.update(call_times([lambda c=c: fn(c) for c in copies], stream, 4))
                row["tb_s_graph"] = n * k * 2 / row["graph_us"] / 1e6
            except Exception as e:  # noqa: BLE001
                row["error"] = repr(e)[:400]
            results["gemv"].append(row)
            log(f"gemv {name} {n}x{k} {cand}: " + ", ".join(f"{a} {b:.4g}" if isinstance(b, float) else f"{a} {b}"
                                                            for a, b in row.items() if a not in ("shape", "n", "k")))
            save()
        del copies
        torch.cuda.empty_cache()


# gemv.cu's choices tried against the shipped one (w8b8: 8 warps, 8 16-byte chunks a lane a batch, registers sized for
# 2 blocks an SM, GEMV_LOAD 0, GEMV_CONTIGUOUS 0; gemv.cu's head says what each means), each built as its own library
SHAPES = {"w4b8": (4, 8, 4, 0, 0), "w8b16": (8, 16, 1, 0, 0), "w4b16": (4, 16, 2, 0, 0), "w16b4": (16, 4, 1, 0, 0),
          "w8b8_cs": (8, 8, 2, 1, 0), "w8b8_ldg": (8, 8, 2, 2, 0), "w8b8_contig": (8, 8, 2, 0, 1)}


def hand_variants(bf16_layer, model):
    """Each projection alone (graph replay over weight copies past L2, programmatic dependent launch) through gemv.cu
    built with each of ``SHAPES`` (in parallel), the shipped shape (w8b8) and cuBLAS."""
    import subprocess

    script = ("import sys, torch.utils.cpp_extension as c; c.load(name=sys.argv[1], sources=[sys.argv[2]], "
              "extra_cuda_cflags=sys.argv[3].split(), build_directory=sys.argv[4], is_python_module=False)")
    env = {**os.environ, "TORCH_CUDA_ARCH_LIST": "9.0"}
    procs = {}
    for name, (warps, batch, blocks, load, contiguous) in SHAPES.items():
        lib, where = f"qlora_gemv_{name}", Path(f"runs/_probe/{name}")
        where.mkdir(parents=True, exist_ok=True)
        flags = (f"-O3 -std=c++17 -DGEMV_WARPS={warps} -DGEMV_BATCH={batch} -DGEMV_MIN_BLOCKS={blocks} "
                 f"-DGEMV_LIBRARY={lib} -DGEMV_LOAD={load} -DGEMV_CONTIGUOUS={contiguous}")
        procs[name] = subprocess.Popen([sys.executable, "-c", script, lib, str(hand.SOURCE), flags, str(where)],
                                       env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ops = {"cublas": None, "w8b8": torch.ops.qlora_gemv.gemv}
    for name, proc in procs.items():
        out = proc.communicate()[0]
        if proc.returncode:
            log(f"variant {name} did not build: {out[-1500:]}")
            continue
        torch.ops.load_library(f"runs/_probe/{name}/qlora_gemv_{name}.so")
        ops[name] = getattr(torch.ops, f"qlora_gemv_{name}").gemv
    log(f"variants built: {list(ops)}")
    stream = torch.cuda.Stream()
    for shape, w, copies, x in bf16_products(bf16_layer, model):
        n, k = w.shape
        reference = x.float() @ w.float().T
        line = []
        for name, op in ops.items():
            fn = (lambda c: F.linear(x, c)) if op is None else (lambda c, op=op: op(x, c, None, 0.0, None, False, True))
            try:
                error = ((fn(w).float() - reference).norm() / reference.norm()).item()
                us = graph_us([lambda c=c: fn(c) for c in copies], stream)
            except Exception as e:  # noqa: BLE001
                log(f"variant {name} {shape} FAILED: {e!r}"[:300])
                continue
            results["gemv"].append({"shape": shape, "n": n, "k": k, "candidate": name, "graph_us": us,
                                    "tb_s_graph": n * k * 2 / us / 1e6, "relative_error": error})
            line.append(f"{name} {us:.1f} us ({n * k * 2 / us / 1e6:.2f} TB/s, err {error:.1e})")
        log(f"variants {shape} {n}x{k}: " + "; ".join(line))
        save()
        del copies
        torch.cuda.empty_cache()


def hand_forced(model, layers, prompt, tokens):
    """Teacher-forced logits of the compiled FusedDecoder against GemvDecoder's and against its own eager steps, on the
    same tokens (the fused engine's greedy ones): how often the argmaxes agree, and the logits' relative difference.
    The eager pair says how far summation order and inductor's fusions alone move the logits on these weights."""
    eager = Cfg()
    eager.compile = False
    rows = {}
    for name, decoder, cfg in (("fused", FusedDecoder(model, layers), Cfg()),
                               ("hand", hand.GemvDecoder(model, layers), Cfg()),
                               ("eager", FusedDecoder(model, layers), eager)):
        rows[name] = FusedGreedy(model, decoder, Tok(), name, cfg).forced_logits(prompt, tokens)
    a = rows["fused"]
    top2 = a.topk(2, dim=-1).values
    results["hand_forced"] = {"fused_top2_gap_median": statistics.median((top2[:, 0] - top2[:, 1]).tolist())}
    for name in ("hand", "eager"):  # the compiled fused engine against the kernels, and against its own eager steps
        b = rows[name]
        rel = ((a - b).norm(dim=-1) / a.norm(dim=-1)).tolist()
        results["hand_forced"][name] = {"argmax_agreement": (a.argmax(-1) == b.argmax(-1)).float().mean().item(),
                                        "relative_difference_max": max(rel),
                                        "relative_difference_median": statistics.median(rel)}
    log("hand forced:", json.dumps(results["hand_forced"]))
    save()


def nf4_ways(ways):
    """``nf4-compiled``'s step on a random Mistral of 32 layers at hidden 1024 (NF4 through bitsandbytes, a random
    r16 LoRA through peft), built each of ``ways`` after an eager reference: ``whole`` (``StaticGreedy``,
    ``reduce-overhead``, its layers not marked), ``nested`` (``StaticGreedy`` with its layers one nested region, as
    shipped until try 32) and ``layers`` (``nf4_layers.nf4_compiled``: ``FusedGreedy`` over the model's own decoder
    layers, one compiled layer for all). First call, graphs compiled, p50, and tokens against the eager step, and
    (torch 2.11's hierarchical-compile log) how many layer subgraphs dynamo installed. Needs bitsandbytes and peft
    (the wheels on ``PYTHONPATH``)."""
    import logging
    import tempfile

    from peft import LoraConfig, get_peft_model
    from torch._dynamo.utils import counters
    from transformers import BitsAndBytesConfig, MistralConfig

    from harness.engines import decoding
    from harness.engines.nf4_layers import nf4_compiled

    config = MistralConfig(hidden_size=1024, intermediate_size=3584, num_hidden_layers=32, num_attention_heads=8,
                           num_key_value_heads=2, head_dim=128, vocab_size=32768, sliding_window=None)
    path = tempfile.mkdtemp(prefix="nf4-probe-", dir=KERNELS.parent)
    torch.manual_seed(0)
    MistralForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    prompt = [1] + list(range(100, 130))
    installed = []

    class Installed(logging.Handler):
        def emit(self, record):
            if "Installing subgraph" in record.getMessage():
                installed.append(record.getMessage())

    torch._logging.set_logs(hierarchical_compile=True)
    for module in ("higher_order_ops", "invoke_subgraph"):  # where torch 2.11 and later releases log it
        logging.getLogger(f"torch._dynamo.variables.{module}.__hierarchical_compile").addHandler(Installed())
    shipped = decoding.compile_layers_once
    reference = None
    try:
        for way in ("eager", *ways):
            torch._dynamo.reset()
            model = MistralForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.bfloat16,
                                                       device_map={"": 0})
            torch.manual_seed(1)
            model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, init_lora_weights=False, target_modules=[
                "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])).eval()
            cfg = Cfg()
            cfg.compile, cfg.compile_mode, cfg.compile_fullgraph = way != "eager", "reduce-overhead", False
            decoding.compile_layers_once = shipped if way == "nested" else (lambda model: None)
            try:
                engine = (nf4_compiled(model, Tok(), Cfg()) if way == "layers" else
                          decoding.StaticGreedy(model, Tok(), "nf4-compiled", cfg))
            finally:
                decoding.compile_layers_once = shipped
            if way == "eager":
                reference = engine.generate([prompt], TOKENS, batch_size=1, fixed_length=True)
            else:
                before = counters["stats"]["unique_graphs"]
                installed.clear()
                time_engine(f"nf4-{way}", engine, prompt, reference)
                results["tries"][-1].update(graphs=counters["stats"]["unique_graphs"] - before,
                                            subgraphs_installed=len(installed))
                save()
            del engine, model
            torch.cuda.empty_cache()
    finally:
        torch._logging.set_logs()  # the log back to its defaults for the tries after


def hand_check_smol():
    """gemv.cu's kernels on SmolLM2-135M's shapes (2 layers, random weights): GemvDecoder's own check, then 48 greedy
    tokens, eager, against FusedDecoder's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=2,
                      num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5, tie_word_embeddings=True,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device("cuda"):
        smol = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    layers = fuse_projections_(smol)
    prompt = [1] + torch.randint(3, 49152, (20,)).tolist()
    eager = Cfg()
    eager.compile = False
    outs = {}
    for name, decoder in (("fused", FusedDecoder(smol, layers)), ("hand", hand.GemvDecoder(smol, layers))):
        outs[name] = FusedGreedy(smol, decoder, Tok(), name, eager).generate([prompt], 48, 1, fixed_length=True)[0]
    agree = sum(a == b for a, b in zip(outs["fused"], outs["hand"])) / 48
    results["smol_hand"] = {"check": "passed", "agreement": agree, "tokens": outs}
    log(f"smol hand: check passed, agreement {agree}")
    save()


ATTENTION = {"": FusedDecoder, "-folded-cudnn": FoldedCudnn, "-folded-eff": FoldedEfficient, "-flex": Flex,
             "-flash": FlashSeqused, "-mqa": Mqa}

# inductor options on top of the engine's (a name's last suffix): combo kernels launch independent kernels of one
# graph (q-RoPE, k-RoPE with the k-cache write, the v-cache write) as one; coordinate descent tunes inductor's own
# kernels (norms, RoPE, SiLU; on bf16 it also decomposes the GEMVs, try 2: use it over the 4-bit ones only)
INDUCTOR = {"combo-mixed": {"combo_kernels": True, "combo_kernel_allow_mixed_sizes": 2},
            "combo-cdt": {"combo_kernels": True, "coordinate_descent_tuning": True},
            "combo": {"combo_kernels": True}, "cdt": {"coordinate_descent_tuning": True}}

def split_suffix(rest: str, table: dict):
    """``rest`` less the longest key of ``table`` it ends with, and that key's value (``rest`` and None if none)."""
    for suffix in sorted(table, key=len, reverse=True):
        if rest.endswith(suffix):
            return rest[:-len(suffix)].rstrip("-"), table[suffix]
    return rest, None


def map_projections(make, *layer_lists):
    """Per layer, a module whose four projections are ``make(the same projection of each list's layer...)``."""
    out = torch.nn.ModuleList()
    for layers in zip(*layer_lists):
        layer = torch.nn.Module()
        for name in ("qkv", "o", "gate_up", "down"):
            setattr(layer, name, make(*(getattr(x, name) for x in layers)))
        out.append(layer)
    return out


# --- measuring --------------------------------------------------------------------------------------------------

def time_engine(name, engine, prompt, reference=None, census=False):
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
    kernels = _kernels(run)  # name -> [ms, launches]
    gpu_ms = sum(ms for ms, _ in kernels.values())
    launches = sum(n for _, n in kernels.values())
    agree = None if reference is None else sum(a == b for a, b in zip(out[0], reference[0])) / TOKENS
    row = {"name": name, "p50_s": p50, "ms_per_token": p50 / TOKENS * 1e3, "kernel_ms_per_token": gpu_ms / TOKENS,
           "kernels_per_token": launches / TOKENS, "first_call_s": first, "min_s": min(samples), "max_s": max(samples),
           "agreement_vs_control": agree}
    results["tries"].append(row)
    if census:
        results["census"][name] = sorted(
            ({"kernel": k[:160], "per_token": n / TOKENS, "us_per_token": ms * 1e3 / TOKENS} for k, (ms, n) in
             kernels.items()), key=lambda r: -r["us_per_token"])
        for r in results["census"][name][:40]:
            log(f"  {r['us_per_token']:8.1f} us/token  x{r['per_token']:6.1f}  {r['kernel']}")
    save()
    log(f"{name}: p50 {p50:.4f} s ({row['ms_per_token']:.2f} ms/token, kernels {row['kernel_ms_per_token']:.2f} in "
        f"{row['kernels_per_token']:.0f} launches), first {first:.1f} s, agreement {agree}")
    return out


def gemv_us(mod, in_features: int) -> float:
    import triton.testing

    xs = [torch.randn(1, in_features, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    mod(xs[0])
    i = [0]

    def f():
        i[0] = (i[0] + 1) % 4
        return mod(xs[i[0]])

    return triton.testing.do_bench_cudagraph(f, rep=50, return_mode="median") * 1e3


NF4_TRIES = {"nf4-nested": ("whole", "nested"), "nf4-layers": ("layers", "nested")}


def main(selected):
    results["device"] = torch.cuda.get_device_name()
    for name in [n for n in selected if n in NF4_TRIES]:  # their own small models, before the 7B and the kernels
        try:
            nf4_ways(NF4_TRIES[name])
        except Exception:  # noqa: BLE001
            failed(name)
    selected = [n for n in selected if n not in NF4_TRIES]
    if not selected:
        return print_table()
    if any("hand" in name for name in selected):
        t0 = time.time()
        hand.load(KERNELS)
        log(f"gemv.cu built and loaded in {time.time() - t0:.1f} s")
    kernel_build.build_in_background(awq_kernels.build, KERNELS)
    torch.manual_seed(0)
    with torch.device("cuda"):
        torch.set_default_dtype(torch.bfloat16)
        model = MistralForCausalLM(synthetic_config("mistral-7b"))
        torch.set_default_dtype(torch.float32)
    model.eval()
    projections = fuse_projections_(model)
    log("model built", round(torch.cuda.memory_allocated() / 2**30, 2), "GiB")
    prompt = [1] + torch.randint(3, 32000, (30,)).tolist()
    state: dict = {}

    def int4_layers():
        if "q" not in state:
            t0 = time.time()
            state["q"] = int4_projections(projections, awq_kernels.load(KERNELS))
            log(f"int4 projections ready after {time.time() - t0:.1f} s")
        return state["q"]

    def engine(name):
        kind, _, rest = name.partition("-")
        attention, inductor = split_suffix(rest, INDUCTOR)
        layers = projections
        if kind == "fastgemv":
            load_fbgemm()
            layers = map_projections(FastGemvLinear, projections)
        if "mqa" in attention:
            load_fbgemm()
        if kind == "int4":
            layers = int4_layers()
            if rest == "layers":  # merged-int4 as shipped: compiled per layer (Int4Decoder), against int4's whole
                return Int4Greedy(model, Int4Decoder(model, layers), Tok(), name, Cfg())
        if kind == "hand":  # gemv.cu's kernels; -nopdl: without programmatic dependent launch; -ipdl: inductor's
            # own kernels launched with it too (as shipped); -whole: -ipdl with the step compiled whole, not per layer
            decoder = hand.GemvDecoder(model, layers, pdl=rest != "nopdl")
            decoder.compile_per_layer = rest != "whole"
            options = {"triton.enable_pdl": True} if rest in ("ipdl", "whole") else None
            return FusedGreedy(model, decoder, Tok(), name, Cfg(), inductor_options=options)
        decoder = ATTENTION["-" + attention if attention else ""](model, layers)
        greedy = Int4Greedy if kind == "int4" else FusedGreedy
        return greedy(model, decoder, Tok(), name, Cfg(), inductor_options=inductor)

    reference: dict = {}
    for name in selected:
        if time.time() - START > BUDGET_S:
            log(f"skipping {name}: probe budget spent")
            continue
        try:
            if name == "gemv-bf16":
                load_fbgemm()
                bf16_gemv_bench(projections[0], model.lm_head)
                continue
            if name == "attention-check":
                load_fbgemm()
                attention_check()
                continue
            if name == "attention":
                load_fbgemm()
                attention_bench()
                continue
            if name == "gemv-hand":
                hand_gemv_bench(projections[0], model)
                continue
            if name == "hand-variants":
                hand_variants(projections[0], model)
                continue
            if name == "hand-forced":
                hand_forced(model, projections, prompt, reference["fused"][0][:64])
                continue
            if name == "hand-smol":
                hand_check_smol()
                continue
            if name == "gemv":
                int4_gemv_bench(projections[0], int4_layers()[0])
                continue
            if name == "smol-shapes":  # SmolLM2's projections, padded (harness/engines/int4.py): the kernels' check
                kernels = awq_kernels.load(KERNELS)
                for out_f, in_f in ((960, 576), (576, 576), (3072, 576), (576, 1536)):
                    lin = torch.nn.Linear(in_f, out_f, bias=False, device="cuda", dtype=torch.bfloat16)
                    quantize_linear(lin, kernels, check=True)
                    log(f"smol-shapes {out_f}x{in_f}: check passed")
                results["smol_shapes"] = "check passed"
                save()
                continue
            census = name.startswith("census-")
            name = name.removeprefix("census-")
            torch._dynamo.reset()
            kind = name.partition("-")[0]
            control = "fused" if kind in ("fastgemv", "hand") else kind  # the same weights: agreement against bf16's
            out = time_engine(name, engine(name), prompt, reference.get(control), census)
            reference.setdefault(control, out)
            torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001
            failed(name)
    print_table()


def failed(name):
    """Record try ``name``'s exception (being handled) as its row, and log it."""
    tb = traceback.format_exc()
    results["tries"].append({"name": name, "error": tb[-3000:]})
    save()
    log(f"{name} FAILED:\n{tb[-2000:]}")


def print_table():
    print("\nname | p50 s | ms/token | kernels ms/token | launches/token | first s | agreement")
    for r in results["tries"]:
        if "error" in r:
            print(f"{r['name']} | FAILED")
        else:
            print(f"{r['name']} | {r['p50_s']:.4f} | {r['ms_per_token']:.2f} | {r['kernel_ms_per_token']:.2f} | "
                  f"{r['kernels_per_token']:.0f} | {r['first_call_s']:.1f} | {r['agreement_vs_control']}")


if __name__ == "__main__":
    from transformers import MistralForCausalLM

    main(sys.argv[1:] or ["gemv", "census-fused", "census-int4"])
