"""What one sweep session holds between calls: the tokenizer, the adapters trained or found, the resident model,
and the evaluations made. Only ``Sweep`` changes it; a new session starts from an empty one."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config.schema import Variant

__all__ = ["Loaded", "SweepState"]


@dataclass
class Loaded:
    """A variant ready to generate: its model, the engine that decodes with it, and its adapter's manifest."""

    variant: Variant
    model: Any
    engine: Any
    manifest: dict[str, Any]


@dataclass
class SweepState:
    tokenizer: Any = None
    selected: list[str] | None = None  # the variants this session runs; None: all of the profile's
    adapters: dict[str, tuple[Path, dict]] = field(default_factory=dict)  # variant -> (artifact dir, manifest)
    adapter_errors: dict[str, BaseException] = field(default_factory=dict)  # a failed variant is not trained again
    retrained: set[str] = field(default_factory=set)  # ``retrain`` trains a variant once per session, not per call
    compile_cache: dict | None = None  # what harness.engines.compile_cache.restore loaded, once per session
    merged: Any = None  # the MergedBase shared by every variant (inference.engine: merged)
    merged_error: BaseException | None = None
    loaded: Loaded | None = None  # one model is resident at a time
    evals: dict[str, Any] = field(default_factory=dict)  # variant -> VariantEval
    recorded: set[str] = field(default_factory=set)  # variants whose evaluation went into the results
