"""Results: figures recorded during a session, each section stamped with where it came from, merged into files.

Two files hold a profile's figures, in the same format:

- ``runs/<profile>/results.json``: every figure any run measured (git-ignored, per machine);
- ``card_assets/<profile>-results.json`` beside the card: the figures the card shows. It is committed with the
  card and is the card block's only source, so a run that measures r16 alone re-renders baseline, r8 and r32 from
  it unchanged, byte for byte, also on a fresh clone where ``runs/`` is empty.

A section (``quality``, ``parity``, ``latency``, ``memory``, ``training``, ``gates``, ``speed``, ``info``) is replaced
whole when a session measured it, and carries its own ``provenance``: git sha (``-dirty`` when the tree was modified),
profile, config hash, data fingerprint, the digest of the harness code that makes figures (``code_digest``), engine,
device, time and session id. Writes are atomic and locked.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

from ..config.profiles import config_hash
from ..config.schema import Profile
from .atomic import atomic_write_json, file_lock
from .provenance import device_name, git_provenance, library_versions, source_digest

__all__ = ["ResultsRecorder", "load_results", "results_path", "card_results_path", "merge_results", "save_results",
           "save_progress", "session_sections", "new_session_id", "code_digest", "SECTIONS"]

SECTIONS = ("info", "quality", "gates", "parity", "latency", "memory", "training", "speed")


def results_path(runs_dir: Path, profile_name: str) -> Path:
    return Path(runs_dir) / profile_name / "results.json"


def card_results_path(card: Path, profile_name: str) -> Path:
    return Path(card).parent / "card_assets" / f"{profile_name}-results.json"


def code_digest() -> str:
    """The harness code that makes a figure: the adapter key's sources and the eval key's, hashed the way the adapter
    key hashes its sources. A section stamped with another digest was made by other code (the card marks it †)."""
    from ..measure.predictions import EVAL_SOURCES
    from ..train.adapters import ADAPTER_SOURCES

    files = list(dict.fromkeys(ADAPTER_SOURCES + EVAL_SOURCES))
    return source_digest(files, "ADAPTER_SOURCES + EVAL_SOURCES")[:16]


def new_session_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def load_results(path: Path) -> dict[str, Any]:
    """Read a results file; a missing file is an empty result set, a corrupt one an error naming the file."""
    path = Path(path)
    if not path.exists():
        return {"variants": {}}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: results file is not valid JSON ({e.msg}); restore it from git "
                         f"(git checkout -- {path}) or delete it to start over") from e
    if not isinstance(data, dict) or not isinstance(data.get("variants"), dict):
        raise ValueError(f"{path}: not a results file (no 'variants' mapping); restore it from git or delete it")
    return data


class ResultsRecorder:
    """Collects one session's figures per variant and section, each section stamped at its first record."""

    def __init__(self, profile: Profile, data_fingerprint: str, session_id: str | None = None):
        self.profile, self.data_fingerprint = profile, data_fingerprint
        self.session_id = session_id or new_session_id()
        self.figures: dict[str, dict[str, Any]] = {}
        self._session_stamp: dict[str, Any] | None = None

    def stamp(self, engine: str | None = None) -> dict[str, Any]:
        if self._session_stamp is None:  # what holds for the whole session: read once (git runs a subprocess)
            self._session_stamp = {**git_provenance(), "code_digest": code_digest(), "profile": self.profile.name,
                                   "config_hash": config_hash(self.profile), "data_fingerprint": self.data_fingerprint,
                                   "device": device_name(), "session": self.session_id, "versions": library_versions()}
        return {**self._session_stamp, "engine": engine, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def record(self, variant: str, section: str, data: dict[str, Any], provenance: dict[str, Any] | None = None,
               engine: str | None = None) -> None:
        """Add ``data`` to this session's ``section`` of ``variant``; ``provenance`` overrides the session stamp
        (a reused adapter's training figures carry the stamp of the run that trained it)."""
        if section not in SECTIONS:
            raise ValueError(f"unknown results section {section!r}; use one of {SECTIONS}")
        sec = self.figures.setdefault(variant, {}).setdefault(section, {})
        sec.update(data)
        if provenance is not None:
            sec["provenance"] = provenance
        elif "provenance" not in sec:
            sec["provenance"] = self.stamp(engine)

    def discard(self, variant: str) -> None:
        """Forget what this session recorded for ``variant`` (it failed part-way): its row keeps its last figures."""
        self.figures.pop(variant, None)

    def get(self, variant: str, section: str) -> dict[str, Any]:
        return self.figures.get(variant, {}).get(section, {})

    def __bool__(self) -> bool:
        return bool(self.figures)


def merge_results(base: dict[str, Any], profile: Profile, figures: dict[str, dict[str, Any]],
                  data_fingerprint: str) -> dict[str, Any]:
    """``base`` with every section in ``figures`` replaced whole; the profile's metadata brought up to date."""
    merged = json.loads(json.dumps(base))  # a deep copy: the caller's dict stays as it was
    merged.update({
        "profile": profile.name, "description": profile.description, "weights": profile.weights,
        "show_quality": profile.show_quality, "base_model": profile.model.source,
        "eval_splits": list(profile.data.eval_splits), "headline_split": profile.data.headline,
        "variant_order": list(profile.variants),
        "max_new_tokens": profile.eval.max_new_tokens, "latency_tokens": profile.latency.max_new_tokens,
        "engine": profile.inference.engine, "merged_dtype": profile.inference.merged_dtype,
        "config_hash": config_hash(profile), "data_fingerprint": data_fingerprint, "code_digest": code_digest(),
    })
    variants = merged.setdefault("variants", {})
    for name, sections in figures.items():
        row = variants.setdefault(name, {})
        for section, data in sections.items():
            row[section] = data
    return merged


def save_results(path: Path, profile: Profile, figures: dict[str, dict[str, Any]],
                 data_fingerprint: str) -> dict[str, Any]:
    """Merge ``figures`` into the results file at ``path`` (locked, atomic) and return what was written."""
    with file_lock(path):
        merged = merge_results(load_results(path), profile, figures, data_fingerprint)
        atomic_write_json(path, merged)
    return merged


def save_progress(path: Path, profile: Profile, figures: dict[str, dict[str, Any]], data_fingerprint: str) -> None:
    """A session's figures so far as a results file of their own at ``path`` (atomic); no figures: no file."""
    if not figures:
        Path(path).unlink(missing_ok=True)
        return
    atomic_write_json(path, merge_results({"variants": {}}, profile, figures, data_fingerprint))


def session_sections(results: dict[str, Any], session_id: str) -> dict[str, dict[str, Any]]:
    """The sections of ``results`` that session ``session_id`` measured or reused (xdist: what the workers recorded;
    a reused figure keeps the provenance of the session that timed it, ``harness.measure.reuse``)."""
    out: dict[str, dict[str, Any]] = {}
    for name, row in results.get("variants", {}).items():
        for section, data in row.items():
            if isinstance(data, dict) and session_id in (data.get("provenance", {}).get("session"),
                                                         (data.get("reused") or {}).get("session")):
                out.setdefault(name, {})[section] = data
    return out
