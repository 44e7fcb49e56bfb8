"""Inductor's compiled artifacts kept between sessions in ``runs/_compile/``, so that a new process, or a new machine
handed that folder, skips inductor's lowering and Triton's compiling and autotuning of graphs compiled before.

torch serializes what this process compiled, or loaded, with ``torch.compiler.save_cache_artifacts`` and hot-loads
it with ``load_cache_artifacts``. ``restore`` loads the file of this session's key before anything compiles;
``keep`` writes the session's artifacts back when it compiled something the file lacked. The key hashes the profile's
config, every harness module (the code that builds and calls what is compiled), the tracked libraries' versions with
Triton's and CUDA's, and the device with its compute capability: a file made by other code, libraries or hardware is
never loaded (inductor's own keys would mostly refuse it too; this one also covers what they do not see, such as a
change to how the harness builds a model). The artifacts go in ``<profile>-<key>.bin``, and beside it a JSON naming
the key, its parts, the bin's sha256 and who saved it: a bin whose sha256 does not match (a writer killed between
the two renames) is not loaded either.

Under pytest-xdist each worker keeps what its own variants compiled, and the last writer's file stands: a later session
loads that part and compiles the rest. What was loaded is said with the figures it shortens: ``restore`` returns a
label (key, loaded or not, and the session, time and git sha that saved the file), which the sweep records beside each
engine's first-call time.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ..config.profiles import config_hash
from ..config.schema import Profile
from ..report.atomic import atomic_write_bytes, atomic_write_json, file_lock
from ..report.provenance import device_kind, git_sha, library_versions, source_digest

__all__ = ["SOURCES", "key_parts", "cache_key", "paths", "restore", "keep"]

SOURCES = tuple(sorted(Path(__file__).resolve().parents[1].rglob("*.py")))  # every harness module


def key_parts(profile: Profile) -> dict[str, Any]:
    """Everything that changes what torch compiles for ``profile`` (module doc)."""
    import torch

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "missing"
    capability = list(torch.cuda.get_device_capability()) if torch.cuda.is_available() else None
    return {"config": config_hash(profile), "code": source_digest(SOURCES, "harness.engines.compile_cache.SOURCES"),
            "versions": {**library_versions(), "triton": triton_version, "cuda": torch.version.cuda},
            "device": device_kind(), "capability": capability}


def cache_key(parts: dict[str, Any]) -> str:
    return config_hash(parts)


def paths(runs_dir: Path, profile: Profile, key: str) -> tuple[Path, Path]:
    """(artifacts, their description) for ``key`` in ``runs_dir/_compile``."""
    stem = Path(runs_dir) / "_compile" / f"{profile.name}-{key[:16]}"
    return stem.with_suffix(".bin"), stem.with_suffix(".json")


def restore(runs_dir: Path, profile: Profile) -> dict[str, Any]:
    """Load the artifacts saved under this session's key, if any; call it before anything compiles. Returns the
    label: ``key`` (16 hex), ``loaded``, and when loaded ``saved`` (session, time, git sha of the writer) and
    ``artifacts`` (how many of each kind)."""
    import torch

    key = cache_key(key_parts(profile))
    label: dict[str, Any] = {"key": key[:16], "loaded": False}
    blob, meta = _read(*paths(runs_dir, profile, key), key)
    if blob is None:
        return label
    info = torch.compiler.load_cache_artifacts(blob)
    label.update(loaded=info is not None, saved=meta["saved"], artifacts=meta["artifacts"])
    return label


def keep(runs_dir: Path, profile: Profile, label: dict[str, Any], session: str) -> bool:
    """Write what this process compiled or loaded under this session's key, unless nothing was compiled beyond what
    ``restore`` loaded (``label``). Returns whether a file was written."""
    import torch

    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        return False
    blob, info = saved
    counts = {kind: len(keys) for kind, keys in sorted(info.artifacts.items()) if keys}
    if not counts or (label.get("loaded") and counts == label.get("artifacts")):
        return False
    parts = key_parts(profile)
    key = cache_key(parts)
    bin_path, meta_path = paths(runs_dir, profile, key)
    with file_lock(bin_path):
        atomic_write_bytes(bin_path, blob)
        atomic_write_json(meta_path, {"key": key, "parts": parts, "sha256": hashlib.sha256(blob).hexdigest(),
                                      "artifacts": counts, "saved": {"session": session, "git_sha": git_sha(),
                                                                     "time": _now()}})
    return True


def _read(bin_path: Path, meta_path: Path, key: str) -> tuple[bytes | None, dict[str, Any]]:
    """The artifacts and their description when both are there, for ``key``, and the bytes are the ones described."""
    if not (bin_path.is_file() and meta_path.is_file()):
        return None, {}
    with file_lock(bin_path):
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError:
            return None, {}
        blob = bin_path.read_bytes()
    if meta.get("key") != key or meta.get("sha256") != hashlib.sha256(blob).hexdigest():
        return None, {}
    return blob, meta


def _now() -> str:
    import time

    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
