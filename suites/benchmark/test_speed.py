"""Engines compared in one session: the seed path (NF4 + unmerged adapter, HF generate) against the fast paths,
on the same machine, the same variant (``inference.speed_variant``) and the same prompt.

Group ``speed``: each engine is one benchmark; ``extra_info`` carries p50/p95, the first call (compile) time, the
peak VRAM and the speedup over the seed path. ``test_merged_matches_seed`` is the parity check of the deployable
artifact (NF4 dequantized to bf16, adapter merged in bf16) against the model that was trained.
"""

from __future__ import annotations

import statistics

import pytest
import torch

from harness.engines import HFGreedy, MergedBase, StaticGreedy, parity
from harness.models import free_model, load_base
from harness.prompt import encode_prompt
from harness.stats import percentile
from harness.variants import ensure_adapter

pytestmark = [pytest.mark.slow, pytest.mark.benchmark]

_SEED_P50: dict[str, float] = {}




def _allocated_gib() -> float:
    return torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


class _Engines:
    """Builds each engine once for the speed variant; the NF4 model is dropped before the merged one is built."""

    def __init__(self, profile, tokenizer, runs_dir, adapter_dir, merged_base):
        self.profile, self.tokenizer, self.runs_dir = profile, tokenizer, runs_dir
        self.adapter_dir, self.merged_base, self.own_merged = adapter_dir, merged_base, None
        self.nf4, self.nf4_gib, self.built = None, None, {}

    def get(self, name: str):
        from peft import PeftModel

        if name in self.built:
            return self.built[name]
        if name in ("seed", "nf4-compiled"):
            if self.nf4 is None:
                before = _allocated_gib()
                base = load_base(self.profile.model, self.profile.quantization, self.runs_dir / "_models")
                self.nf4 = PeftModel.from_pretrained(base, str(self.adapter_dir)).eval()
                self.nf4_gib = _allocated_gib() - before
            engine = (HFGreedy(self.nf4, self.tokenizer) if name == "seed"
                      else StaticGreedy(self.nf4, self.tokenizer, name, self.profile.inference))
            engine.weights_gib = self.nf4_gib
        else:
            mb = self.merged_base
            if mb is None:
                if self.own_merged is None:
                    self.own_merged = MergedBase(self.profile, self.runs_dir / "_models", self.tokenizer)
                mb = self.own_merged
            mb.activate(f"{self.profile.inference.speed_variant} (speed)", self.adapter_dir)
            engine = mb.engine
            engine.weights_gib = mb.resident_gib
        self.built[name] = engine
        return engine

    def drop_nf4(self):
        self.built = {k: v for k, v in self.built.items() if k == "merged"}
        self.nf4 = None
        free_model()

    def close(self):
        self.built, self.nf4, self.own_merged = {}, None, None
        free_model()


@pytest.fixture(scope="module")
def engines(profile, splits, tokenizer, runs_dir, pytestconfig, merged_base):
    name = profile.inference.speed_variant
    if name not in profile.variants or profile.variant(name).is_baseline:
        pytest.skip(f"{profile.source_file}: inference.speed_variant {name!r} is not a LoRA variant of this sweep")
    path, _ = ensure_adapter(profile, profile.variant(name), splits, tokenizer, runs_dir,
                             pytestconfig.getoption("retrain"))
    holder = _Engines(profile, tokenizer, runs_dir, path / "adapter", merged_base)
    yield holder
    holder.close()


def _engine_ids(config) -> list[str]:
    from harness.plugin import PROFILE_KEY

    return list(config.stash[PROFILE_KEY].inference.speed_engines)


def pytest_generate_tests(metafunc):
    if "engine_name" in metafunc.fixturenames:
        names = _engine_ids(metafunc.config)
        metafunc.parametrize("engine_name", names, ids=names)


def test_engine_speed(benchmark, engine_name, engines, profile, splits, recorder):
    """128 greedy tokens of the speed variant, per engine; the seed path runs first and sets the ratio's base."""
    if engine_name == "merged":
        engines.drop_nf4()  # the merged engine's VRAM is its own, not its own plus the NF4 model's
    engine = engines.get(engine_name)
    lat, inf = profile.latency, profile.inference
    by_id = {e.id: e for split in splits.values() for e in split}
    example = by_id.get(lat.prompt_id) or splits["validation"][0]
    prompt = encode_prompt(engines.tokenizer, example.instruction, example.input)
    on_gpu = torch.cuda.is_available()

    def generate_once():
        out = engine.generate([prompt], lat.max_new_tokens, batch_size=1, fixed_length=True)
        if on_gpu:
            torch.cuda.synchronize()
        return out

    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    at_start = _allocated_gib()
    benchmark.group = "speed"
    out = benchmark.pedantic(generate_once, rounds=inf.speed_rounds, warmup_rounds=1, iterations=1)
    assert len(out[0]) == lat.max_new_tokens
    if benchmark.disabled:
        pytest.skip("benchmarks disabled (--benchmark-disable): no speed figures")
    samples = list(benchmark.stats.stats.data)
    p50, p95 = percentile(samples, 50), percentile(samples, 95)
    figures = {
        "engine": engine_name, "note": engine.note, "compiled": engine.compiled, "rounds": len(samples),
        "p50_s": p50, "p95_s": p95, "mean_s": statistics.fmean(samples), "new_tokens": lat.max_new_tokens,
        "tokens_per_s": lat.max_new_tokens / p50, "first_call_s": dict(engine.compile_s),
        "variant": inf.speed_variant, "prompt_id": example.id,
    }
    if on_gpu:
        decode = torch.cuda.max_memory_allocated() / 2**30 - at_start
        figures["weights_gib"] = engine.weights_gib
        figures["peak_vram_gib"] = engine.weights_gib + decode
    if engine_name == "seed":
        _SEED_P50[profile.name] = p50
    elif profile.name in _SEED_P50:
        figures["speedup_vs_seed"] = _SEED_P50[profile.name] / p50
    benchmark.extra_info.update(figures)
    recorder.record(inf.speed_variant, "speed", {engine_name: figures})
    if engine_name != inf.engine or engine_name == "seed":
        return
    if inf.speed_max_p50_s is not None:
        assert p50 <= inf.speed_max_p50_s, (f"{engine_name} p50 {p50:.3f} s is over inference.speed_max_p50_s "
                                            f"{inf.speed_max_p50_s} s ({profile.source_file})")
    if inf.speed_min_speedup is not None:
        assert "speedup_vs_seed" in figures, "run the seed engine in the same session to gate the speedup"
        assert figures["speedup_vs_seed"] >= inf.speed_min_speedup, (
            f"{engine_name} is {figures['speedup_vs_seed']:.1f}x the seed path, under inference.speed_min_speedup "
            f"{inf.speed_min_speedup}x ({profile.source_file})")


def test_merged_matches_seed(engines, profile, splits, recorder):
    """Greedy tokens of the merged bf16 artifact against NF4 + unmerged adapter on every evaluation prompt."""
    inf = profile.inference
    examples = [e for split in profile.data.eval_splits for e in splits[split]]
    prompts = [encode_prompt(engines.tokenizer, e.instruction, e.input) for e in examples]
    merged = engines.get("merged")
    seed = engines.get("seed")
    result = parity(seed, merged, engines.tokenizer, prompts, inf.parity_new_tokens, profile.eval.batch_size)
    result["merged_dtype"] = inf.merged_dtype
    recorder.record(inf.speed_variant, "speed", {"parity": result})
    assert result["max_logit_diff"] <= inf.parity_max_logit_diff, (
        f"merged vs seed: max |logit diff| {result['max_logit_diff']:.4f} over inference.parity_max_logit_diff "
        f"{inf.parity_max_logit_diff} ({profile.source_file})")
    assert result["token_agreement"] >= inf.parity_min_agreement, (
        f"merged vs seed: token agreement {result['token_agreement']:.3f} under inference.parity_min_agreement "
        f"{inf.parity_min_agreement} ({profile.source_file})")


def test_nf4_compiled_matches_seed(engines, profile, splits, recorder):
    """Same weights, another decode loop: the static-cache engine must reproduce the seed engine's greedy tokens."""
    inf = profile.inference
    if "nf4-compiled" not in inf.speed_engines:
        pytest.skip(f"{profile.source_file}: nf4-compiled is not in inference.speed_engines")
    examples = [e for split in profile.data.eval_splits for e in splits[split]]
    prompts = [encode_prompt(engines.tokenizer, e.instruction, e.input) for e in examples]
    result = parity(engines.get("seed"), engines.get("nf4-compiled"), engines.tokenizer, prompts,
                    inf.parity_new_tokens, profile.eval.batch_size)
    recorder.record(inf.speed_variant, "speed", {"parity_nf4_compiled": result})
    assert result["max_logit_diff"] <= inf.parity_max_logit_diff, result
    assert result["token_agreement"] >= inf.parity_min_agreement, result
