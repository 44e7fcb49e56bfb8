"""Profiles: YAML in, frozen dataclasses out, every fault reported at once.

A profile YAML (``data/configs/<name>.yaml``) names the base model, quantization, LoRA settings, the variants to
sweep (defined in a variants YAML beside it), the training recipe, the data files, evaluation, latency and the
gates. ``load_profile`` validates all of it against the dataclasses below and raises one ``ConfigError`` that lists
every problem as ``file:line: key: what is wrong; how to fix it``.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "ConfigError",
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
    "CONFIG_DIR",
    "load_profile",
    "profile_path",
    "available_profiles",
    "config_hash",
]

CONFIG_DIR = Path(__file__).resolve().parent.parent / "data" / "configs"
VARIANTS_FILE = "variants.yaml"


class ConfigError(ValueError):
    """A profile or variants YAML is invalid; the message lists every problem found."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        n = len(self.problems)
        super().__init__(f"{n} problem{'s' if n != 1 else ''} in config:\n  " + "\n  ".join(self.problems))


def _spec(doc: str = "", *, default: Any = dataclasses.MISSING, lo=None, hi=None, choices=None, lo_open=False):
    meta = {"doc": doc, "lo": lo, "hi": hi, "choices": choices, "lo_open": lo_open}
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
    compile_layers: bool = _spec("torch.compile each decoder layer (regional compilation; H100 QLoRA step 1.7x)",
                                 default=False)
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


@dataclass(frozen=True)
class EvalConfig:
    max_new_tokens: int = _spec("greedy tokens per answer", lo=1)
    batch_size: int = _spec("prompts per generate call (left padded)", default=8, lo=1)
    bootstrap_resamples: int = _spec("bootstrap resamples for CIs", default=1000, lo=100)
    confidence: float = _spec("CI level", default=0.95, lo=0.5, hi=1.0, lo_open=True)
    bootstrap_seed: int = _spec("seed of the bootstrap", default=0, lo=0)


@dataclass(frozen=True)
class LatencyConfig:
    rounds: int = _spec("timed generate calls", lo=1)
    max_new_tokens: int = _spec("tokens per call, forced with min_new_tokens", lo=1)
    warmup_rounds: int = _spec("untimed calls first", default=1, lo=0)
    prompt_id: str = _spec("dataset id of the fixed latency prompt", default="")


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
                        "or merged (dequantized base + merged adapter); see harness/engines.py", default="seed",
                        choices=("seed", "nf4-compiled", "merged"))
    merged_dtype: str = _spec("dtype the NF4 base is dequantized to and the adapter merged in", default="bfloat16",
                              choices=("bfloat16", "float16", "float32"))
    compile: bool = _spec("compile the static-cache decode step (CUDA only; the CPU runs it eagerly)", default=True)
    compile_mode: str = _spec("torch.compile mode of the decode step", default="reduce-overhead",
                              choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"))
    compile_fullgraph: bool = _spec("fail on graph breaks in the merged engine's decode step", default=True)
    cache_bucket: int = _spec("static cache length is rounded up to a multiple of this (fewer compiled shapes)",
                              default=256, lo=1)
    speed_variant: str = _spec("variant the speed suite compares engines on", default="r16")
    speed_engines: tuple[str, ...] = _spec("engines the speed suite measures, the seed path first",
                                           default=("seed", "nf4-compiled", "merged"),
                                           choices=("seed", "nf4-compiled", "merged"))
    speed_rounds: int = _spec("timed rounds per engine in the speed suite", default=5, lo=1)
    speed_min_speedup: float | None = _spec("the configured engine's p50 must beat the seed path's by this factor",
                                            default=None, lo=1.0)
    speed_max_p50_s: float | None = _spec("the configured engine's p50 must be at most this", default=None, lo=0.0,
                                          lo_open=True)
    parity_new_tokens: int = _spec("greedy tokens compared by the parity check", default=32, lo=1)
    parity_min_agreement: float = _spec("lowest mean token agreement of merged vs seed", default=0.9, lo=0.0,
                                        hi=1.0)
    parity_max_logit_diff: float = _spec("largest |logit difference| of merged vs seed, teacher-forced",
                                         default=1.0, lo=0.0)


@dataclass(frozen=True)
class Gate:
    variants: tuple[str, ...] = _spec("variants this gate applies to")
    split: str = _spec("split scored", choices=("train", "validation", "test"))
    metric: str = _spec("metric", choices=("em", "f1"))
    min: float | None = _spec("lowest passing value", default=None, lo=0.0, hi=1.0)
    max: float | None = _spec("highest passing value", default=None, lo=0.0, hi=1.0)


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
    vram_ceilings_gib: dict = _spec("{train|inference: {variant: GiB}} for the gpu suite", default={})
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
        return d


# ---------------------------------------------------------------------------------------------------------------
# YAML with line numbers


def _read_yaml(path: Path) -> tuple[Any, dict[tuple, int]]:
    """Parse YAML, returning the data and a map from key path to 1-based line number."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError([f"{path}: file not found; pass --profile with a name from data/configs or a YAML path"])
    except UnicodeDecodeError as e:
        raise ConfigError([f"{path}: not valid UTF-8 ({e.reason} at byte {e.start}); save the file as UTF-8"])
    except OSError as e:  # a directory, a fifo, no permission
        raise ConfigError([f"{path}: cannot be read ({e.strerror or e}); pass the path of a YAML file"])
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark, ctx = getattr(e, "problem_mark", None), getattr(e, "context_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        # e.g. an unclosed '[' is noticed lines later: say where the construct began too
        began = (f" ({e.context} that began on line {ctx.line + 1})"
                 if ctx and getattr(e, "context", None) and (not mark or ctx.line != mark.line) else "")
        raise ConfigError([f"{where}: invalid YAML: {getattr(e, 'problem', None) or e}{began}; fix the syntax"])
    lines: dict[tuple, int] = {}
    duplicates: list[str] = []  # PyYAML keeps the last of two equal keys without a word: that hides an edit

    def walk(n, prefix, ancestors=frozenset()):
        if id(n) in ancestors:  # a self-referencing anchor (&a [*a]): don't follow it forever
            return
        ancestors = ancestors | {id(n)}
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                key = prefix + (k.value,)
                if key in lines and k.value != "<<":
                    dotted = ".".join(str(x) for x in key)
                    duplicates.append(f"{path}:{k.start_mark.line + 1}: {dotted}: duplicate key {k.value!r} (first "
                                      f"on line {lines[key]}); keep one of them")
                    continue
                lines[key] = k.start_mark.line + 1
                walk(v, key, ancestors)
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                lines[prefix + (i,)] = v.start_mark.line + 1
                walk(v, prefix + (i,), ancestors)

    if node is not None:
        walk(node, ())
    if duplicates:
        raise ConfigError(duplicates)
    return data, lines


class _Checker:
    def __init__(self, path: Path, lines: dict[tuple, int]):
        self.path, self.lines, self.problems = path, lines, []

    def err(self, keypath: tuple, msg: str) -> None:
        line = None
        for i in range(len(keypath), -1, -1):
            line = self.lines.get(keypath[:i])
            if line:
                break
        where = f"{self.path}:{line}" if line else str(self.path)
        dotted = ".".join(str(k) for k in keypath) or "<top>"
        self.problems.append(f"{where}: {dotted}: {msg}")

    def build(self, cls, raw: Any, keypath: tuple, skip: tuple = ()):
        if not isinstance(raw, dict):
            self.err(keypath, f"expected a mapping of {cls.__name__} fields, got {raw!r}; write them as "
                              f"indented 'key: value' lines, as in {CONFIG_DIR / 'tiny.yaml'}")
            return None
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in skip}
        renamed = set()  # a typo of a missing key ('learnig_rate') is one problem, not 'unknown' plus 'missing'
        for key in raw:
            if key not in fields:
                close = difflib.get_close_matches(str(key), list(fields), n=1)
                hint = f"did you mean {close[0]!r}? " if close else "remove it; "
                if close and close[0] not in raw:
                    renamed.add(close[0])
                    hint = f"did you mean {close[0]!r}? rename it; "
                self.err(keypath + (key,), f"unknown key {key!r}; {hint}known: {', '.join(fields)}")
        out = {}
        for name, f in fields.items():
            if name in raw:
                out[name] = self.value(hints[name], raw[name], f.metadata, keypath + (name,))
            elif name in renamed:
                continue
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                self.err(keypath + (name,), f"missing required key {name!r} ({f.metadata.get('doc', '')})")
        return out

    def value(self, tp, v, meta, keypath):
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin in (typing.Union, types.UnionType):
            if v is None:
                return None if type(None) in args else self.err(keypath, "must not be null")
            tp = next(a for a in args if a is not type(None))
            origin, args = typing.get_origin(tp), typing.get_args(tp)
        if v is None:
            return self.err(keypath, f"must not be null; expected {getattr(tp, '__name__', tp)}")
        if dataclasses.is_dataclass(tp):
            before = len(self.problems)
            built = self.build(tp, v, keypath)
            return tp(**built) if built is not None and len(self.problems) == before else None
        if origin is tuple:
            if not isinstance(v, list):
                return self.err(keypath, f"expected a list, got {v!r}")
            return tuple(self.value(args[0], x, meta, keypath + (i,)) for i, x in enumerate(v))
        if tp is dict:
            return v if isinstance(v, dict) else self.err(keypath, f"expected a mapping, got {v!r}")
        if tp is bool:
            return v if isinstance(v, bool) else self.err(keypath, f"expected true or false, got {v!r}")
        if tp is int and (isinstance(v, bool) or not isinstance(v, int)):
            return self.err(keypath, f"expected an integer, got {v!r} ({type(v).__name__})")
        if tp is float:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                return self.err(keypath, f"expected a number, got {v!r} ({type(v).__name__}); write it unquoted")
            try:
                v = float(v)
            except OverflowError:  # an integer too large for a float
                return self.err(keypath, f"{v!r} is out of range; write a finite number")
            if not math.isfinite(v):
                return self.err(keypath, f"expected a finite number, got {v!r}")
        if tp is str and not isinstance(v, str):
            return self.err(keypath, f"expected a string, got {v!r} ({type(v).__name__})")
        self.check_range(v, meta, keypath)
        return v

    def check_range(self, v, meta, keypath):
        lo, hi, choices = meta.get("lo"), meta.get("hi"), meta.get("choices")
        if choices and v not in choices:
            close = difflib.get_close_matches(str(v), [str(c) for c in choices], n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            self.err(keypath, f"{v!r} is not allowed; {hint}choose one of: {', '.join(map(str, choices))}")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if lo is not None and (v < lo or (meta.get("lo_open") and v == lo)):
                bound = f"> {lo}" if meta.get("lo_open") else f">= {lo}"
                self.err(keypath, f"{v!r} is out of range; must be {bound}")
            if hi is not None and v > hi:
                self.err(keypath, f"{v!r} is out of range; must be <= {hi}")


def _load_variants(path: Path) -> dict[str, Variant]:
    if not path.exists():
        raise ConfigError([f"{path}: file not found; a profile's variants are defined in {VARIANTS_FILE} beside it: "
                           f"copy {CONFIG_DIR / VARIANTS_FILE} there"])
    raw, lines = _read_yaml(path)
    chk = _Checker(path, lines)
    out: dict[str, Variant] = {}
    if not isinstance(raw, dict) or not raw:
        raise ConfigError([f"{path}: expected a mapping of variant name -> {{r, alpha}}, got {raw!r}"])
    for name, spec in raw.items():
        before = len(chk.problems)
        built = chk.build(Variant, spec if spec is not None else {}, (name,), skip=("name",))
        if built is None or len(chk.problems) > before:  # don't pile a second problem on a bad r or alpha
            continue
        r, alpha = built.get("r"), built.get("alpha")
        if (r is None) != (alpha is None):
            chk.err((name,), "give both r and alpha for a LoRA variant, or neither for the baseline")
        if not chk.problems:
            out[str(name)] = Variant(name=str(name), **built)
    if chk.problems:
        raise ConfigError(chk.problems)
    return out


def profile_path(name_or_path: str | Path) -> Path:
    """Resolve ``tiny`` to ``data/configs/tiny.yaml``; a path ending in .yaml/.yml is taken as is."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        return p.resolve()
    return CONFIG_DIR / f"{name_or_path}.yaml"


def available_profiles() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if p.name != VARIANTS_FILE)


def load_profile(name_or_path: str | Path) -> Profile:
    """Load and validate a profile; raise ConfigError listing every problem and how to fix it."""
    path = profile_path(name_or_path)
    if not path.exists():
        names = available_profiles()
        close = difflib.get_close_matches(str(name_or_path), names, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError([f"{path}: no such profile {str(name_or_path)!r}; {hint}available: {', '.join(names)}"])
    raw, lines = _read_yaml(path)
    chk = _Checker(path, lines)
    built = chk.build(Profile, raw, (), skip=("variant_defs", "source_file"))
    if built is None or chk.problems:
        raise ConfigError(chk.problems)
    variants_path = path.parent / VARIANTS_FILE
    defs = _load_variants(variants_path)
    for i, name in enumerate(built["variants"]):
        if name not in defs:
            close = difflib.get_close_matches(str(name), list(defs), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            chk.err(("variants", i), f"unknown variant {name!r}; {hint}defined in {variants_path.name}: "
                                     f"{', '.join(defs)}")
    dist, quant = built.get("distributed"), built.get("quantization")
    if isinstance(dist, DistributedConfig) and dist.mode == "none" and dist.num_processes > 1:
        chk.err(("distributed", "num_processes"), f"{dist.num_processes} processes with mode 'none' would train in "
                                                  f"one; set mode: ddp (or fsdp), or num_processes: 1")
    if isinstance(dist, DistributedConfig) and dist.mode != "none" and dist.num_processes < 2:
        chk.err(("distributed", "num_processes"), f"mode {dist.mode!r} needs num_processes >= 2; use mode: none "
                                                  f"for one process")
    if (isinstance(dist, DistributedConfig) and dist.mode == "fsdp" and isinstance(quant, QuantConfig)
            and quant.load_in_4bit and quant.quant_storage != quant.compute_dtype):
        chk.err(("quantization", "quant_storage"), f"FSDP shards the 4-bit weights as {quant.quant_storage}; set "
                                                   f"quant_storage: {quant.compute_dtype} (= compute_dtype) so "
                                                   f"FSDP can flatten them with the other parameters")
    inference = built.get("inference")
    if (isinstance(inference, InferenceConfig) and inference.speed_min_speedup is not None
            and (not inference.speed_engines or inference.speed_engines[0] != "seed")):
        chk.err(("inference", "speed_engines"), "speed_min_speedup compares with the seed engine measured first in "
                                                "the same session; list 'seed' first")
    if isinstance(inference, InferenceConfig) and inference.speed_variant not in defs:
        close = difflib.get_close_matches(inference.speed_variant, list(defs), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        chk.err(("inference", "speed_variant"), f"unknown variant {inference.speed_variant!r}; {hint}defined in "
                                                f"{variants_path.name}: {', '.join(defs)}")
    if len(set(built["variants"])) != len(built["variants"]):
        chk.err(("variants",), "a variant is listed twice; list each once")
    if not built["variants"]:
        chk.err(("variants",), f"no variant to sweep; list at least one of: {', '.join(defs)}")
    for i, gate in enumerate(built.get("quality_gates", ())):  # optional: may be absent
        if gate is None:
            continue
        for v in gate.variants:
            if v not in built["variants"]:
                chk.err(("quality_gates", i, "variants"), f"gate names {v!r}, which this profile does not sweep")
        if gate.min is None and gate.max is None:
            chk.err(("quality_gates", i), "a gate needs min, max or both")
    _check_ceilings(chk, built.get("vram_ceilings_gib", {}), built["variants"])
    if built["data"] is not None:
        for split in ("train", "validation", "test"):
            p = path.parent / getattr(built["data"], split)
            try:
                p = p.resolve()
                found, is_dir = p.is_file(), p.is_dir()
            except (OSError, ValueError):  # e.g. a NUL byte in the path
                found = is_dir = False
            if not found:
                what = "is a directory" if is_dir else "file not found"
                chk.err(("data", split), f"{what}: {p}; point data.{split} at an existing JSONL file "
                                         f"(paths are relative to {path.parent})")
    if chk.problems:
        raise ConfigError(chk.problems)
    return Profile(**built, variant_defs={v: defs[v] for v in built["variants"]}, source_file=str(path))


def _check_ceilings(chk: _Checker, ceilings: dict, variants: tuple) -> None:
    for phase, per_variant in ceilings.items():
        if phase not in ("train", "inference"):
            chk.err(("vram_ceilings_gib", phase), f"unknown phase {phase!r}; use 'train' or 'inference'")
            continue
        if not isinstance(per_variant, dict):
            chk.err(("vram_ceilings_gib", phase), f"expected a mapping of variant -> GiB, got {per_variant!r}")
            continue
        for v, gib in per_variant.items():
            if v not in variants:
                chk.err(("vram_ceilings_gib", phase, v), f"unknown variant {v!r}; this profile sweeps "
                                                         f"{', '.join(variants)}")
            elif isinstance(gib, bool) or not isinstance(gib, (int, float)) or not 0 < gib < math.inf:
                chk.err(("vram_ceilings_gib", phase, v), f"expected a positive, finite number of GiB, got {gib!r}; "
                                                         f"write the most GiB this phase may use, e.g. 12.5")


def config_hash(obj: Any) -> str:
    """Stable sha256 of a JSON-able object (dataclasses and tuples allowed)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = obj.to_dict() if hasattr(obj, "to_dict") else dataclasses.asdict(obj)
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()
