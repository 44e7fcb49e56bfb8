"""Per-profile results: figures recorded during a run, merged into ``runs/<profile>/results.json``.

A run updates only the variants and sections it measured: ``pytest -k r16`` rewrites r16's quality, latency and
memory and keeps every other variant's row as it was. The file is written atomically under a lock, so an
interrupted run or a concurrent worker leaves the last good version in place.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from .artifacts import atomic_write_json, file_lock, provenance
from .config import Profile, config_hash

__all__ = ["ResultsRecorder", "load_results", "results_path"]


def results_path(runs_dir: Path, profile_name: str) -> Path:
    return Path(runs_dir) / profile_name / "results.json"


def load_results(path: Path) -> dict[str, Any]:
    """Read a results file; a missing file is an empty result set."""
    path = Path(path)
    if not path.exists():
        return {"variants": {}}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: results file is not valid JSON ({e.msg}); delete it to start over "
                         f"(its figures are rebuilt by the next run)") from e


class ResultsRecorder:
    """Collects figures per variant and section during a session; ``save`` merges them into the results file."""

    def __init__(self, profile: Profile):
        self.profile = profile
        self.figures: dict[str, dict[str, Any]] = {}

    def record(self, variant: str, section: str, data: dict[str, Any]) -> None:
        self.figures.setdefault(variant, {}).setdefault(section, {}).update(data)

    def discard(self, variant: str) -> None:
        """Forget what this session recorded for ``variant`` (it failed part-way): its row keeps its last figures."""
        self.figures.pop(variant, None)

    def get(self, variant: str, section: str) -> dict[str, Any]:
        return self.figures.get(variant, {}).get(section, {})

    def __bool__(self) -> bool:
        return bool(self.figures)

    def save(self, runs_dir: Path) -> dict[str, Any]:
        """Merge this session's figures into results.json (atomic, locked) and return the merged results."""
        path = results_path(runs_dir, self.profile.name)
        with file_lock(path):
            merged = load_results(path)
            merged.update({
                "profile": self.profile.name, "description": self.profile.description,
                "weights": self.profile.weights, "show_quality": self.profile.show_quality,
                "eval_splits": list(self.profile.data.eval_splits), "variant_order": list(self.profile.variants),
                "config_hash": config_hash(self.profile), "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            })
            stamp = provenance()
            variants = merged.setdefault("variants", {})
            for name, sections in self.figures.items():
                row = variants.setdefault(name, {})
                row.update(sections)
                row["provenance"] = stamp
                row["config_hash"] = merged["config_hash"]
            atomic_write_json(path, merged)
        return merged
