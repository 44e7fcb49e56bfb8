"""Per-example predictions on disk, and the key that says whether two runs' predictions may be paired.

``runs/<profile>/predictions/<variant>.jsonl`` holds one row per evaluated example; ``<variant>.key.json`` beside it
holds the eval key it was made under: a hash of the profile's config, the data's fingerprint, the code that turns
a model into predictions (``EVAL_SOURCES``), the library versions and the device that decoded. ΔF1 against the
baseline pairs a stored baseline only under an equal key, so predictions of another config, another dataset, older
decoding code, another bitsandbytes or another device (a CPU baseline in a GPU run) are never compared. The key file
also keeps the key's parts, so a refusal can say what differs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..config.profiles import config_hash
from ..config.schema import Profile
from ..report.atomic import atomic_write_text, file_lock
from ..report.provenance import device_kind, library_versions, source_digest

__all__ = ["EVAL_SOURCES", "eval_key", "eval_key_parts", "predictions_path", "write_predictions", "read_rows",
           "read_matching", "read_key_file"]

_HARNESS = Path(__file__).resolve().parents[1]
EVAL_SOURCES = tuple(_HARNESS / n for n in ("engines/decoding.py", "engines/fused.py", "engines/merged.py",
                                            "engines/nf4_layers.py",
                                            "engines/gemv.py", "engines/gemv.cu",
                                            "models/dequantized.py", "models/nf4.py", "measure/evaluate.py",
                                            "data/prompt.py", "measure/metrics.py", "models/base.py",
                                            "models/pretrained.py", "models/nf4_store.py",
                                            # the quantized engines and their cost against merged: a change to
                                            # them makes the card's cost tables stale (†) like any other figure
                                            "engines/int8.py", "engines/int4.py", "engines/awq_kernels.py",
                                            "engines/compare.py",
                                            # the parity figures every card row and engine table carries
                                            "measure/parity.py"))


def eval_key_parts(profile: Profile, data_fingerprint: str) -> dict[str, Any]:
    """Everything that changes a prediction besides the adapter: config, data, decoding code, libraries, device."""
    return {"config": config_hash(profile), "data": data_fingerprint,
            "code": source_digest(EVAL_SOURCES, "harness.measure.predictions.EVAL_SOURCES"),
            "versions": library_versions(), "device": device_kind()}


def eval_key(profile: Profile, data_fingerprint: str) -> str:
    return config_hash(eval_key_parts(profile, data_fingerprint))


def predictions_path(runs_dir: Path, profile: Profile, variant: str) -> Path:
    return Path(runs_dir) / profile.name / "predictions" / f"{variant}.jsonl"


def write_predictions(path: Path, rows: list[dict[str, Any]], key: str, parts: dict[str, Any] | None = None) -> None:
    """The rows, then their key (both atomic, under one lock): a key file always describes the rows beside it."""
    with file_lock(path):
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        atomic_write_text(path.with_suffix(".key.json"),
                          json.dumps({"eval_key": key, "rows": len(rows), "parts": parts or {}}) + "\n")


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of predictions ``path``, one JSON object a line. Split on "\\n" alone: a prediction decoded from
    random weights can hold U+2028 or U+0085, which ``json.dumps(ensure_ascii=False)`` leaves as they are and
    ``str.splitlines`` would cut a row at (a GPU run read a half row so, 2026-12-04)."""
    return [json.loads(x) for x in Path(path).read_text(encoding="utf-8").split("\n") if x.strip()]


def read_key_file(path: Path) -> dict[str, Any] | None:
    """The key file beside predictions ``path`` (eval key, row count, the key's parts), or None."""
    try:
        return json.loads(path.with_suffix(".key.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def read_matching(path: Path, key: str) -> list[dict[str, Any]] | None:
    """The stored rows if they were made under ``key`` (and are complete), else None."""
    key_file = path.with_suffix(".key.json")
    if not (path.exists() and key_file.exists()):
        return None
    with file_lock(path):
        try:
            stored = json.loads(key_file.read_text(encoding="utf-8"))
            rows = read_rows(path)
        except (OSError, json.JSONDecodeError):
            return None
    return rows if stored.get("eval_key") == key and len(rows) == stored.get("rows") else None
