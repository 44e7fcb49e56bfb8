"""Train-or-reuse a variant's adapter under a content-hash key.

``runs/<profile>/<variant>-<hash12>/`` holds ``adapter/`` (safetensors), ``config.yaml`` (the resolved profile)
and ``manifest.json``. The hash covers everything that changes the adapter: base source and revision,
quantization, LoRA, the training recipe, the train data's content, the prompt format, library versions and the
device type, and a digest of the harness source that trains it (``ADAPTER_SOURCES``): an edit to the training,
prompt or model code makes a new key, so an adapter trained by old code is never reused. A file lock makes
concurrent workers train a key once; an atomic rename means a half-trained artifact is never seen. The key names
no profile: another profile's folder with the same key is reused in place (``trained_elsewhere``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from ..config.profiles import config_hash
from ..config.schema import Profile, Variant
from ..data.dataset import Example, fingerprint
from ..data.prompt import PROMPT_FORMAT
from ..measure.memory import free_memory
from ..models.base import device, load_base
from ..models.revision import base_identity
from ..report.atomic import atomic_dir, atomic_write_text, file_lock, sweep_partial
from ..report.phases import timed
from ..report.provenance import library_versions, provenance, source_digest
from .trainer import peft_dir

__all__ = ["ADAPTER_SOURCES", "MANIFEST", "adapter_source_digest", "artifact_key", "artifact_dir", "ensure_adapter",
           "is_complete", "trained_elsewhere"]

MANIFEST = "manifest.json"
# accelerate launches DDP/FSDP training and drives the trainer's mixed precision; datasets packs the rows trl trains on
_KEY_LIBRARIES = ("torch", "transformers", "peft", "trl", "bitsandbytes", "mistral-common", "accelerate", "datasets")
_HARNESS = Path(__file__).resolve().parents[1]
# The modules whose code decides what an adapter learns: data layout, tokenization, base loading, the trainer and
# its launcher. Editing any of them changes every adapter key; a listed file that is missing is an error.
ADAPTER_SOURCES = tuple(_HARNESS / n for n in (
    "train/trainer.py", "train/layer_compile.py", "data/prompt.py", "models/base.py", "models/nf4_store.py",
    "models/pretrained.py", "train/distributed.py"))


def adapter_source_digest(files=None) -> str:
    return source_digest(files or ADAPTER_SOURCES, "harness.train.adapters.ADAPTER_SOURCES")


def artifact_key(profile: Profile, variant: Variant, train_examples: list[Example]) -> dict[str, Any]:
    """Everything that changes a trained adapter. Its hash names the artifact directory."""
    versions = library_versions()
    return {
        "base": base_identity(profile.model),
        "quantization": dataclasses.asdict(profile.quantization),
        "lora": {**dataclasses.asdict(profile.lora), "r": variant.r, "alpha": variant.alpha},
        "training": dataclasses.asdict(profile.training),
        "data_fingerprint": fingerprint(train_examples),
        "prompt_format": PROMPT_FORMAT,
        "versions": {k: versions.get(k) for k in _KEY_LIBRARIES},
        "device_type": device().type,
        "harness_source": adapter_source_digest(),
        "distributed": {"mode": profile.distributed.mode,
                        "world_size": 1 if profile.distributed.mode == "none" else profile.distributed.num_processes},
    }


def artifact_dir(runs_dir: Path, profile: Profile, variant: Variant, key_hash: str) -> Path:
    return Path(runs_dir) / profile.name / f"{variant.name}-{key_hash[:12]}"

def is_complete(path: Path) -> bool:
    manifest = path / MANIFEST
    if not manifest.is_file() or not (peft_dir(path) / "adapter_model.safetensors").is_file():
        return False
    try:
        return json.loads(manifest.read_text()).get("complete") is True
    except (OSError, json.JSONDecodeError):
        return False


def trained_elsewhere(runs_dir: Path, key_hash: str) -> Path | None:
    """A complete artifact of ``key_hash`` in any profile's folder of ``runs_dir``. The key holds everything that
    changes an adapter and no profile name, so a profile copied under a new name reuses what the original trained."""
    for path in sorted(Path(runs_dir).glob(f"*/*-{key_hash[:12]}")):
        if is_complete(path) and json.loads((path / MANIFEST).read_text()).get("key_hash") == key_hash:
            return path
    return None


def _log(runs_dir: Path, profile: Profile, line: str) -> None:
    log = Path(runs_dir) / profile.name / "train.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as f:  # one short line per append: atomic enough across workers
        f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} pid={os.getpid()} {line}\n")


def ensure_adapter(profile: Profile, variant: Variant, splits: dict[str, list[Example]], tokenizer,
                   runs_dir: Path, retrain: bool = False) -> tuple[Path, dict[str, Any]]:
    """Return (artifact dir, manifest) for a LoRA variant, training it only if no complete artifact matches."""
    from .trainer import train_adapter

    key = artifact_key(profile, variant, splits["train"])
    key_hash = config_hash(key)
    final = artifact_dir(runs_dir, profile, variant, key_hash)
    with file_lock(final):
        if is_complete(final) and not retrain:
            _log(runs_dir, profile, f"reuse {final.name}")
            return final, json.loads((final / MANIFEST).read_text())
        trained = None if retrain else trained_elsewhere(runs_dir, key_hash)
        if trained is not None:  # the same adapter under another profile's name: a copy of a profile, say
            _log(runs_dir, profile, f"reuse {trained.parent.name}/{trained.name}")
            return trained, json.loads((trained / MANIFEST).read_text())
        sweep_partial(final)
        _log(runs_dir, profile, f"train-start {final.name}")
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        distributed = profile.distributed.mode != "none"
        # memory other code holds on this GPU (e.g. a resident merged base): not the training's, so not its peak
        resident = torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() and not distributed else 0.0
        base = None  # distributed: each launched process loads its own
        if not distributed:
            with timed("model-load", f"{variant.name}: base to train on (a missing 4-bit base built and kept first)"):
                base = load_base(profile.model, profile.quantization, Path(runs_dir) / "_models")
        with atomic_dir(final) as tmp:
            if distributed:  # accelerate launches the processes; this one never joins the group
                from .distributed import launch_training

                figures = launch_training(profile, variant, runs_dir, tmp)
            else:
                with timed("train", variant.name):
                    figures = train_adapter(profile, variant, splits["train"], tokenizer, base, tmp)
                memory = figures["train_memory"]
                if resident and "peak_allocated_gib" in memory:
                    memory["peak_allocated_gib"] -= resident
                    memory["other_resident_gib"] = resident
            manifest = {
                "complete": True, "profile": profile.name, "variant": variant.name, "key_hash": key_hash,
                "key": key, "config_hash": config_hash(profile), "seed": profile.training.seed,
                "train_started": started, "train_finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                **provenance(), **figures,
            }
            atomic_write_text(tmp / "config.yaml", yaml.safe_dump(profile.to_dict(), sort_keys=False,
                                                                  allow_unicode=True))
            atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
        del base  # drop the last reference before collecting: peft/trl leave cycles that only gc frees
        free_memory()
        parts = ",".join(f"{k}:{v:.1f}" for k, v in figures["train_prepare_parts_s"].items())
        _log(runs_dir, profile, f"train-done {final.name} wall_s={figures['train_wall_s']:.1f} "
                                f"prepare_s={figures['train_prepare_s']:.1f} prepare_parts={parts} "
                                f"save_s={figures['train_save_s']:.1f}")
        return final, manifest
