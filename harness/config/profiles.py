"""Profiles: YAML in, frozen dataclasses out, every fault reported at once.

A profile YAML (``data/configs/<name>.yaml``) names the base model, quantization, LoRA settings, the variants to
sweep (defined in a variants YAML beside it), the training recipe, the data files, evaluation, latency and the
gates. ``load_profile`` validates all of it against the dataclasses of ``harness.config.schema`` and raises one
``ConfigError`` that lists every problem as ``file:line: key: what is wrong; how to fix it``.

The schema (``harness.config.schema``), the YAML reader (``harness.config.yamlload``) and the error type
(``harness.config.errors``) live in their own modules: import their names from there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from pathlib import Path
from typing import Any

from .errors import ConfigError, closest, did_you_mean
from .schema import (
    DataConfig,
    DistributedConfig,
    InferenceConfig,
    Profile,
    QuantConfig,
    Variant,
    headline_split,
)
from .yamlload import read_yaml

__all__ = ["CONFIG_DIR", "VARIANTS_FILE", "load_profile", "profile_path", "available_profiles", "config_hash"]

CONFIG_DIR = Path(__file__).resolve().parents[2] / "data" / "configs"
VARIANTS_FILE = "variants.yaml"
# keys a release removed, with what replaced them: an old profile is told the new spelling, not only "unknown"
RETIRED_KEYS = {"compile_layers": "replaced by 'step' on 2026-12-02: write 'step: compiled' for true, 'step: eager' "
                                  "for false; "}


def _key_text(key: Any) -> str:
    """A key as the error names it: quoted where it is empty, has blanks at an end or unprintable characters (a stray
    ' M' must not read as M)."""
    if isinstance(key, str) and (not key or key != key.strip() or not key.isprintable()):
        return repr(key)
    return str(key)


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
        dotted = ".".join(_key_text(k) for k in keypath) or "<top>"
        self.problems.append(f"{where}: {dotted}: {msg}")

    def build(self, cls, raw: Any, keypath: tuple, skip: tuple = ()):
        if not isinstance(raw, dict):
            self.err(keypath, f"expected a mapping of {cls.__name__} fields, got {raw!r}; write them as "
                              f"indented 'key: value' lines, as in {CONFIG_DIR / 'tiny.yaml'}")
            return None
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in skip and not f.metadata.get("filled")}
        renamed = set()  # a typo of a missing key ('learnig_rate') is one problem, not 'unknown' plus 'missing'
        for key in raw:
            if key not in fields:
                match = closest(key, fields)
                hint = RETIRED_KEYS.get(key) or did_you_mean(key, fields) or "remove it; "
                if match is not None and match not in raw:
                    renamed.add(match)
                    hint += "rename it; "
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
        if meta.get("per_device") and isinstance(v, dict):
            return self.per_device(v, meta, keypath)
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

    def per_device(self, v: dict, meta, keypath) -> dict | None:
        """{device: number}: every device key a name, every value a number in the field's range."""
        if not v:
            return self.err(keypath, "an empty mapping gates nothing; give {device: number}, e.g. {H100: 1.0}, or "
                                     "null")
        out = {}
        for device, x in v.items():
            if not isinstance(device, str) or not device.strip():
                self.err(keypath + (device,), f"device key {device!r} must be a GPU name such as H100 or H200")
                continue
            out[device] = self.value(float, x, {**meta, "per_device": False}, keypath + (device,))
        return out

    def check_range(self, v, meta, keypath):
        lo, hi, choices = meta.get("lo"), meta.get("hi"), meta.get("choices")
        if choices and v not in choices:
            hint = did_you_mean(v, choices)
            self.err(keypath, f"{v!r} is not allowed; {hint}choose one of: {', '.join(map(str, choices))}")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if lo is not None and (v < lo or (meta.get("lo_open") and v == lo)):
                bound = f"> {lo}" if meta.get("lo_open") else f">= {lo}"
                self.err(keypath, f"{v!r} is out of range; must be {bound}")
            if hi is not None and (v > hi or (meta.get("hi_open") and v == hi)):
                bound = f"< {hi}" if meta.get("hi_open") else f"<= {hi}"
                self.err(keypath, f"{v!r} is out of range; must be {bound}")


def _load_variants(path: Path) -> dict[str, Variant]:
    if not path.exists():
        raise ConfigError([f"{path}: file not found; a profile's variants are defined in {VARIANTS_FILE} beside it: "
                           f"copy {CONFIG_DIR / VARIANTS_FILE} there"])
    raw, lines = read_yaml(path)
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
        hint = did_you_mean(name_or_path, names)
        raise ConfigError([f"{path}: no such profile {str(name_or_path)!r}; {hint}available: {', '.join(names)}"])
    raw, lines = read_yaml(path)
    chk = _Checker(path, lines)
    built = chk.build(Profile, raw, (), skip=("variant_defs", "source_file"))
    if built is None or chk.problems:
        raise ConfigError(chk.problems)
    # a profile of your own can keep its own variants.yaml beside it, or use the shipped one
    variants_path = path.parent / VARIANTS_FILE
    if not variants_path.exists():
        variants_path = CONFIG_DIR / VARIANTS_FILE
    defs = _load_variants(variants_path)
    _check_name(chk, path, built)
    for i, name in enumerate(built["variants"]):
        if name not in defs:
            hint = did_you_mean(name, defs)
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
        hint = did_you_mean(inference.speed_variant, defs)
        chk.err(("inference", "speed_variant"), f"unknown variant {inference.speed_variant!r}; {hint}defined in "
                                                f"{variants_path.name}: {', '.join(defs)}")
    if len(set(built["variants"])) != len(built["variants"]):
        chk.err(("variants",), "a variant is listed twice; list each once")
    if not built["variants"]:
        chk.err(("variants",), f"no variant to sweep; list at least one of: {', '.join(defs)}")
    _check_gates(chk, built.get("quality_gates", ()), built["variants"])
    _check_ceilings(chk, built.get("vram_ceilings_gib", {}), built["variants"])
    data = built.get("data")
    if isinstance(data, DataConfig) and data.headline_split and data.headline_split not in data.eval_splits:
        chk.err(("data", "headline_split"), f"{data.headline_split!r} is not evaluated; add it to data.eval_splits "
                                            f"{list(data.eval_splits)} or headline one of those")
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


def _check_name(chk: _Checker, path: Path, built: dict) -> None:
    """A copy of a shipped profile that keeps its name but points at other data would file its results (runs/ and
    the card) as the shipped profile's."""
    shipped = CONFIG_DIR / f"{built['name']}.yaml"
    if path.parent == CONFIG_DIR or not shipped.exists() or built.get("data") is None:
        return
    try:
        mine = [(path.parent / getattr(built["data"], s)).resolve() for s in ("train", "validation", "test")]
        if not all(p.is_file() for p in mine):
            return  # the missing file is the problem to report
        theirs = read_yaml(shipped)[0].get("data", {})
        same = all((path.parent / getattr(built["data"], s)).resolve() == (CONFIG_DIR / theirs[s]).resolve()
                   for s in ("train", "validation", "test"))
    except (ConfigError, KeyError, TypeError, OSError, ValueError):
        return  # an unreadable path is reported by the data checks
    if not same:
        chk.err(("name",), f"{built['name']!r} is the name of the shipped profile {shipped}, whose data differs "
                           f"from this profile's; give this profile its own name (e.g. name: my-data), so its "
                           f"results are not filed as {built['name']!r}'s")


def _check_gates(chk: _Checker, gates: tuple, variants: tuple) -> None:
    """Each gate names swept variants and has a threshold that some measurement could fail: EM and F1 lie in
    [0, 1], a gain in [-1, 1], so min 0, max 1 and min_gain -1 would pass anything."""
    for i, gate in enumerate(gates):
        if gate is None:
            continue
        for v in gate.variants:
            if v not in variants:
                chk.err(("quality_gates", i, "variants"), f"gate names {v!r}, which this profile does not sweep")
        if gate.min is None and gate.max is None and gate.min_gain is None:
            chk.err(("quality_gates", i), "a gate needs min, max, min_gain or a combination")
        if gate.min is not None and gate.min <= 0:
            chk.err(("quality_gates", i, "min"), f"min {gate.min!r} cannot fail ({gate.metric} is never below 0); "
                                                 f"set the lowest value a variant must reach, or remove min")
        if gate.max is not None and gate.max >= 1:
            chk.err(("quality_gates", i, "max"), f"max {gate.max!r} cannot fail ({gate.metric} is never above 1); "
                                                 f"set the highest value allowed, or remove max")
        if gate.min_gain is None:
            continue
        if gate.min_gain <= -1:
            chk.err(("quality_gates", i, "min_gain"), f"min_gain {gate.min_gain!r} cannot fail (a paired F1 "
                                                      f"difference is never below -1); set the lowest gain over "
                                                      f"the baseline a variant must show, e.g. 0.1")
        if gate.metric != "f1":
            chk.err(("quality_gates", i, "metric"), f"min_gain is gated on the paired F1 difference only; set "
                                                    f"metric: f1 (got {gate.metric!r})")
        if "baseline" in gate.variants:
            chk.err(("quality_gates", i, "variants"), "min_gain compares a variant with the baseline; the "
                                                      "baseline's gain over itself is 0: remove it from this gate")
        if "baseline" not in variants:
            chk.err(("quality_gates", i, "min_gain"), "min_gain pairs each variant with the baseline's "
                                                      "predictions; add baseline to variants")


def _check_ceilings(chk: _Checker, ceilings: dict, variants: tuple) -> None:
    for phase, per_variant in ceilings.items():
        if phase not in ("train", "inference"):
            chk.err(("vram_ceilings_gib", phase), f"unknown phase {phase!r}; use 'train' or 'inference'")
            continue
        if not isinstance(per_variant, dict):
            chk.err(("vram_ceilings_gib", phase), f"expected a mapping of variant -> GiB, got {per_variant!r}")
            continue
        for v, per_device in per_variant.items():
            if v not in variants:
                chk.err(("vram_ceilings_gib", phase, v), f"unknown variant {v!r}; this profile sweeps "
                                                         f"{', '.join(variants)}")
                continue
            if isinstance(per_device, dict) and not per_device:
                chk.err(("vram_ceilings_gib", phase, v), "an empty mapping gates nothing; give {device: GiB}, e.g. "
                                                         "{H100: 15.0}, or one number for every device")
            items = per_device.items() if isinstance(per_device, dict) else [(None, per_device)]
            for device, gib in items:
                where = ("vram_ceilings_gib", phase, v) + ((device,) if device is not None else ())
                if isinstance(gib, bool) or not isinstance(gib, (int, float)) or not 0 < gib < math.inf:
                    chk.err(where, f"expected a positive, finite number of GiB, got {gib!r}; write the most GiB this "
                                   f"phase may use, e.g. 12.5, or per device, e.g. {{H100: 12.5, H200: 12.5}}")


def config_hash(obj: Any) -> str:
    """Stable sha256 of a JSON-able object (dataclasses and tuples allowed)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = obj.to_dict() if hasattr(obj, "to_dict") else dataclasses.asdict(obj)
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()
