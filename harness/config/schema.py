"""The profile schema: frozen dataclasses, one per profile section, with each field's doc, default and bounds.

``_spec`` attaches the metadata (doc, lo/hi bounds, choices) that ``harness.config.profiles`` checks a YAML value
against and that the error messages quote. Nothing here reads a file; ``harness.config.profiles.load_profile``
builds these.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "ModelConfig",
    "QuantConfig",
    "LoraConfig",
    "Variant",
    "TrainConfig",
    "DataConfig",
    "EvalConfig",
    "LatencyConfig",
    "InferenceConfig",
    "DistributedConfig",
    "Gate",
    "Profile",
    "headline_split",
]


def _spec(doc: str = "", *, default: Any = dataclasses.MISSING, lo=None, hi=None, choices=None, lo_open=False,
          hi_open=False, per_device=False, filled=False):
    # per_device: one number for every device, or {device: number} (matching rule in harness.gates)
    # filled: set by the harness after loading, never read from YAML (a YAML key of that name is unknown)
    meta = {"doc": doc, "lo": lo, "hi": hi, "choices": choices, "lo_open": lo_open, "hi_open": hi_open,
            "per_device": per_device, "filled": filled}
    if default is dataclasses.MISSING:
        return field(metadata=meta)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ModelConfig:
    source: str = _spec("hub id, local checkpoint dir, or synthetic:tiny / synthetic:mistral-7b")
    revision: str | None = _spec("hub revision (commit, tag or branch)", default=None)
    tokenizer: str = _spec("'v3' (Mistral v3 from mistral-common) or 'auto' (from the source)", default="v3",
                           choices=("v3", "auto"))
    attn_implementation: str = _spec("attention kernel", default="sdpa",
                                     choices=("sdpa", "eager", "flash_attention_2", "flash_attention_3"))
    synthetic_seed: int = _spec("seed for synthetic weights", default=0, lo=0)
    content: str | None = _spec("a local checkpoint folder's sha256 (harness/models/folder_digest.py), pinned before "
                                "anything is keyed; null for other sources", default=None, filled=True)


@dataclass(frozen=True)
class QuantConfig:
    load_in_4bit: bool = _spec("quantize the base to 4 bit with bitsandbytes")
    quant_type: str = _spec("4-bit data type", default="nf4", choices=("nf4", "fp4"))
    double_quant: bool = _spec("quantize the quantization constants too", default=True)
    compute_dtype: str = _spec("dtype of the 4-bit matmuls", default="bfloat16",
                               choices=("bfloat16", "float16", "float32"))
    quant_storage: str = _spec("dtype the packed 4-bit weights are stored in (bnb_4bit_quant_storage); FSDP needs "
                               "it equal to compute_dtype", default="uint8",
                               choices=("uint8", "bfloat16", "float16", "float32"))


@dataclass(frozen=True)
class LoraConfig:
    dropout: float = _spec("LoRA dropout", lo=0.0, hi=1.0)
    target_modules: tuple[str, ...] = _spec("module names that get adapters")


@dataclass(frozen=True)
class Variant:
    name: str
    r: int | None = _spec("LoRA rank; null = no adapter (baseline)", default=None, lo=1)
    alpha: int | None = _spec("LoRA alpha; scaling is alpha / r", default=None, lo=1)
    description: str = _spec("one line for the card", default="")

    @property
    def is_baseline(self) -> bool:
        return self.r is None

    @property
    def label(self) -> str:
        return "Baseline" if self.is_baseline else f"LoRA r{self.r}/a{self.alpha}"


@dataclass(frozen=True)
class TrainConfig:
    seed: int = _spec("seed for init, shuffling and dropout", lo=0)
    learning_rate: float = _spec("peak learning rate", lo=0.0, hi=1.0, lo_open=True)
    epochs: int = _spec("passes over the train split", lo=1)
    batch_size: int = _spec("per-device micro-batch size", lo=1)
    grad_accum: int = _spec("micro-batches per optimizer step", lo=1)
    max_length: int = _spec("max tokens per training sequence (packed row when packing)", lo=8)
    packing: bool = _spec("pack examples into rows of max_length")
    lr_scheduler: str = _spec("learning-rate schedule", default="constant",
                              choices=("constant", "linear", "cosine", "constant_with_warmup"))
    warmup_ratio: float = _spec("fraction of steps for warm-up", default=0.0, lo=0.0, hi=1.0)
    weight_decay: float = _spec("AdamW weight decay", default=0.0, lo=0.0)
    optim: str = _spec("optimizer", default="adamw_torch",
                       choices=("adamw_torch", "adamw_torch_fused", "paged_adamw_8bit", "paged_adamw_32bit"))
    gradient_checkpointing: bool = _spec("recompute activations to save memory", default=False)
    step: str = _spec("how a training step runs: 'eager' is transformers' own; 'compiled' compiles each decoder "
                      "layer with its activation checkpoint inside the graph, pads every batch to max_length (one "
                      "shape to compile) and, on CUDA, attends through flex_attention (harness/train/layer_compile.py)",
                      default="eager", choices=("eager", "compiled"))
    mixed_precision: str = _spec("autocast dtype for training", default="no", choices=("no", "bf16", "fp16"))
    adapter_dtype: str = _spec("dtype of the LoRA weights while training", default="float32",
                               choices=("float32", "bfloat16"))
    logging_steps: int = _spec("log the loss every N optimizer steps", default=1, lo=1)
    min_optimizer_steps: int = _spec("warn below this many optimizer steps", default=10, lo=0)


@dataclass(frozen=True)
class DataConfig:
    train: str = _spec("train JSONL, relative to the profile file")
    validation: str = _spec("validation JSONL, relative to the profile file")
    test: str = _spec("test JSONL, relative to the profile file")
    eval_splits: tuple[str, ...] = _spec("splits the quality suite scores", default=("validation",),
                                         choices=("train", "validation", "test"))
    headline_split: str | None = _spec("split of the card's headline table and quality plot; default: the held-out "
                                       "one, test if evaluated, else validation", default=None,
                                       choices=("train", "validation", "test"))

    @property
    def headline(self) -> str:
        return headline_split(self.headline_split, self.eval_splits)


def headline_split(chosen: str | None, eval_splits) -> str:
    """The split a card headlines: the one chosen, else the held-out one (test, then validation) the profile
    evaluates, else its first. Also applied to results files written before the key existed."""
    if chosen:
        return chosen
    return next((s for s in ("test", "validation") if s in eval_splits), (list(eval_splits) or ["validation"])[0])


@dataclass(frozen=True)
class EvalConfig:
    max_new_tokens: int = _spec("greedy tokens per answer", lo=1)
    batch_size: int = _spec("prompts per generate call (left padded)", default=8, lo=1)
    bootstrap_resamples: int = _spec("bootstrap resamples for CIs", default=1000, lo=100)
    confidence: float = _spec("CI level", default=0.95, lo=0.5, hi=1.0, lo_open=True)
    bootstrap_seed: int = _spec("seed of the bootstrap", default=0, lo=0)
    max_f1_regression: float = _spec("--quality-compare fails a variant whose paired ΔF1 CI against the saved run "
                                     "lies wholly below minus this", default=0.0, lo=0.0, hi=0.5)


@dataclass(frozen=True)
class LatencyConfig:
    rounds: int = _spec("timed generate calls", lo=1)
    max_new_tokens: int = _spec("tokens per call, forced with min_new_tokens", lo=1)
    warmup_rounds: int = _spec("untimed calls first", default=1, lo=0)
    prompt_id: str = _spec("dataset id of the fixed latency prompt", default="")
    max_p50_s: float | dict | None = _spec("most seconds a variant's p50 may take, per device ({H100: 1.0}) or one "
                                           "number for all", default=None, lo=0.0, lo_open=True, per_device=True)
    reuse_confirm_rounds: int = _spec("fresh rounds that must confirm a figure timed earlier on this machine under the "
                                      "same key before it is reused (harness/measure/reuse.py); 0: time every round",
                                      default=5, lo=0)
    reuse_tolerance: float = _spec("how far the confirming rounds' median may be from the reused p50 (relative)",
                                   default=0.03, lo=0.0, lo_open=True, hi=1.0)


@dataclass(frozen=True)
class DistributedConfig:
    mode: str = _spec("'none' (one process), 'ddp' (data parallel: every process holds the base) or 'fsdp' "
                      "(shard the 4-bit base across processes)", default="none", choices=("none", "ddp", "fsdp"))
    num_processes: int = _spec("processes accelerate launches (GPUs, or CPU processes on the gloo backend)",
                               default=1, lo=1)
    main_process_port: int | None = _spec("rendezvous port; null picks a free one", default=None, lo=1, hi=65535)
    timeout_s: int = _spec("give up on a launched training run after this many seconds", default=3600, lo=1)


@dataclass(frozen=True)
class InferenceConfig:
    engine: str = _spec("how eval and latency decode: seed (NF4 + unmerged adapter, HF generate), nf4-compiled, "
                        "or merged (dequantized base + merged adapter); see harness/engines/decoding.py and "
                        "harness/engines/merged.py",
                        default="seed",
                        choices=("seed", "nf4-compiled", "merged"))
    merged_dtype: str = _spec("dtype the NF4 base is dequantized to and the adapter merged in", default="bfloat16",
                              choices=("bfloat16", "float16", "float32"))
    compile: bool = _spec("compile the static-cache decode step (CUDA only; the CPU runs it eagerly)", default=True)
    compile_mode: str = _spec("torch.compile mode of the decode step", default="reduce-overhead",
                              choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"))
    compile_fullgraph: bool = _spec("fail on graph breaks in the merged engine's decode step", default=True)
    cache_bucket: int = _spec("static cache length is rounded up to a multiple of this (fewer compiled shapes)",
                              default=256, lo=1)
    graph_tokens: int = _spec("merged engines: decode steps captured in one CUDA graph (the host waits only between "
                              "graphs, to look for EOS)", default=16, lo=1, hi=256)
    speed_variant: str = _spec("variant the speed suite compares engines on", default="r16")
    speed_engines: tuple[str, ...] = _spec("engines the speed suite measures, the seed path first; merged-int8 and "
                                           "merged-int4 (weight-only, not exact; int4 needs CUDA) are measured here "
                                           "only", default=("seed", "nf4-compiled", "merged"),
                                           choices=("seed", "nf4-compiled", "merged", "merged-int8", "merged-int4"))
    speed_rounds: int = _spec("timed rounds per engine in the speed suite", default=5, lo=1)
    speed_seed_rounds: int | None = _spec("timed rounds of the seed path (only the ratio's base; ~10 s a round for "
                                          "7B): null = speed_rounds", default=None, lo=1)
    speed_min_speedup: float | dict | None = _spec("the configured engine's p50 must beat the seed path's by this "
                                                   "factor, per device ({H100: 10}) or one number for all",
                                                   default=None, lo=1.0, per_device=True)
    speed_max_p50_s: float | dict | None = _spec("the configured engine's p50 must be at most this, per device "
                                                 "({H100: 1.0}) or one number for all", default=None, lo=0.0,
                                                 lo_open=True, per_device=True)
    quantized_max_f1_loss: float | None = _spec("merged-int8/merged-int4: a variant fails on a split when its F1 is "
                                                "surely lower than the merged engine's by more than this (the upper "
                                                "end of the paired 95% CI of quantized - merged is below -this); "
                                                "< 1: a loss of 1 cannot fail; null: reported, not gated",
                                                default=None, lo=0.0, hi=1.0, hi_open=True)
    parity_new_tokens: int = _spec("greedy tokens compared by the parity check", default=32, lo=1)
    parity_min_agreement: float = _spec("lowest mean token agreement of merged vs seed", default=0.9, lo=0.0,
                                        hi=1.0)
    parity_tie_logits: float = _spec("a difference within this many logits of the seed path's own choice is a near "
                                     "tie, passed over by the token agreement (harness/measure/parity.py)",
                                     default=0.0, lo=0.0)
    parity_max_logit_diff: float = _spec("largest |logit difference| of merged vs seed, teacher-forced",
                                         default=1.0, lo=0.0)
    parity_max_relative_error: float | None = _spec("largest engine error as a fraction of the adapter's own effect "
                                                    "on the seed path's logits, Frobenius over every teacher-forced "
                                                    "position (harness/measure/parity.py); a missing or doubled merge "
                                                    "gives about 1; not applied to the baseline (no adapter); null: "
                                                    "measured and reported, not gated (for an adapter whose effect "
                                                    "is within the engine's rounding)", default=0.1, lo=0.0,
                                                    lo_open=True)


@dataclass(frozen=True)
class Gate:
    variants: tuple[str, ...] = _spec("variants this gate applies to")
    split: str = _spec("split scored", choices=("train", "validation", "test"))
    metric: str = _spec("metric", choices=("em", "f1"))
    min: float | None = _spec("lowest passing value (> 0: a min of 0 cannot fail)", default=None, lo=0.0, hi=1.0)
    max: float | None = _spec("highest passing value (< 1: a max of 1 cannot fail)", default=None, lo=0.0, hi=1.0)
    min_gain: float | None = _spec("lowest passing lower end of the paired-bootstrap CI of (variant - baseline) on "
                                   "this split, per example (harness.evaluate.compare_to_baseline); metric f1 only; "
                                   "> -1: a gain of -1 or less cannot fail", default=None, lo=-1.0, hi=1.0)


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    weights: str = _spec("'real' or 'synthetic'; synthetic hides quality numbers in the card",
                         choices=("real", "synthetic"))
    show_quality: bool = _spec("print EM/F1 in the card; false prints 'n/a (random weights)'")
    model: ModelConfig = _spec("base model")
    quantization: QuantConfig = _spec("bitsandbytes settings")
    lora: LoraConfig = _spec("LoRA settings shared by all variants")
    variants: tuple[str, ...] = _spec("variants to sweep, from variants.yaml")
    training: TrainConfig = _spec("training recipe")
    data: DataConfig = _spec("data files")
    eval: EvalConfig = _spec("evaluation")
    latency: LatencyConfig = _spec("latency benchmark")
    inference: InferenceConfig = _spec("inference engine for eval and latency; speed suite settings",
                                       default=InferenceConfig())
    distributed: DistributedConfig = _spec("how training is launched: one process, or accelerate DDP/FSDP",
                                           default=DistributedConfig())
    requires_gpu: bool = _spec("every variant test is marked gpu and skips without CUDA", default=False)
    quality_gates: tuple[Gate, ...] = _spec("thresholds the quality suite asserts", default=())
    vram_ceilings_gib: dict = _spec("{train|inference: {variant: GiB or {device: GiB}}} for the gpu suite",
                                    default={})
    variant_defs: dict = _spec("resolved variants, filled from variants.yaml", default={})
    source_file: str = _spec("the profile YAML this came from", default="")

    def variant(self, name: str) -> Variant:
        return self.variant_defs[name]

    def data_path(self, split: str) -> Path:
        return (Path(self.source_file).parent / getattr(self.data, split)).resolve()

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["variant_defs"] = {k: dataclasses.asdict(v) for k, v in self.variant_defs.items()}
        d.pop("source_file")
        if d["model"]["content"] is None:  # only a folder source has one: every other config hash stays as it was
            d["model"].pop("content")
        if d.get("data"):  # presentation only: no figure or cached prediction goes stale when it changes
            d["data"].pop("headline_split", None)
        return d
