"""What the sweep records about a variant besides its scores: its label and engine, its adapter's training figures
stamped with the run that trained them, and the gates each figure was held to. Pure bookkeeping over a
``ResultsRecorder``: nothing here loads, trains or measures."""

from __future__ import annotations

from typing import Any

from ..config.profiles import config_hash
from ..measure.gates import quality_gate_count, vram_failures, vram_gate
from .provenance import device_name
from .results import ResultsRecorder

__all__ = ["record_variant", "record_training", "record_eval"]


def record_variant(recorder: ResultsRecorder, loaded) -> None:
    """What a recorded figure of a variant stands on: its label and engine, and its adapter's training figures
    (stamped by the run that trained it). Only a variant this session measures gets a row."""
    name = loaded.variant.name
    recorder.record(name, "info", {"label": loaded.variant.label, "description": loaded.variant.description,
                                   "engine": loaded.engine.name, "engine_note": loaded.engine.note},
                    engine=loaded.engine.name)
    if loaded.manifest and not recorder.get(name, "training"):
        record_training(recorder, name, loaded.manifest)


def record_training(recorder: ResultsRecorder, name: str, m: dict[str, Any]) -> None:
    profile = recorder.profile
    # found by its key, which holds everything that changes training: its figures hold for this profile's config,
    # whichever profile trained it (a † here would ask for a re-run that reuses the same adapter again)
    stamp = {"git_sha": m.get("git_sha"), "profile": profile.name, "config_hash": config_hash(profile),
             "data_fingerprint": recorder.data_fingerprint, "engine": None, "device": m.get("device"),
             "time": m.get("train_finished"), "session": recorder.session_id,
             "versions": m.get("versions"), "adapter": m.get("key_hash", "")[:12],
             "code_digest": recorder.stamp()["code_digest"]}  # the adapter key holds the adapter code
    keys = ("trainable_params", "train_wall_s", "train_tokens_per_s", "optimizer_steps",
            "planned_optimizer_steps", "key_hash", "world_size")
    recorder.record(name, "training", {k: m[k] for k in keys if k in m}, provenance=stamp)
    mem = m.get("train_memory", {})
    train = {k2: mem[k] for k, k2 in (("peak_allocated_gib", "train_peak_allocated_gib"),
                                      ("peak_reserved_gib", "train_peak_reserved_gib"),
                                      ("peak_rss_gib", "train_peak_rss_gib")) if k in mem}
    failures = vram_failures(profile, name, "train", mem.get("peak_allocated_gib"), m.get("device", ""))
    recorder.record(name, "training", {**train, "vram_failures": failures}, provenance=stamp)


def record_eval(recorder: ResultsRecorder, result, loaded, quality_compared: bool = False) -> None:
    """A ``VariantEval``'s quality and memory figures and its gates, with what they stand on; ``quality_compared``:
    the quality gates include the comparison with a saved run (``--quality-compare``)."""
    name, engine, profile = result.variant, loaded.engine.name, recorder.profile
    record_variant(recorder, loaded)
    recorder.record(name, "quality", {k: v.summary for k, v in result.scores.items()}, engine=engine)
    mem = {"peak_rss_gib": result.peak_memory["peak_rss_gib"]}
    if "peak_allocated_gib" in result.peak_memory:
        mem.update(inference_peak_allocated_gib=result.peak_memory["peak_allocated_gib"],
                   inference_peak_reserved_gib=result.peak_memory["peak_reserved_gib"])
    recorder.record(name, "memory", mem, engine=engine)
    train_failures = recorder.get(name, "training").get("vram_failures", [])
    peaks = {"inference": result.peak_memory.get("peak_allocated_gib"),
             "train": recorder.get(name, "training").get("train_peak_allocated_gib")}
    gates = {"quality": {"checked": quality_gate_count(profile, name, quality_compared),
                         "failures": result.quality_failures},
             "vram": vram_gate(profile, name, peaks, result.vram_failures + train_failures, device_name())}
    recorder.record(name, "gates", gates, engine=engine)
