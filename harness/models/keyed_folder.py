"""Weights kept under ``runs/_models/`` and loaded only under their own key (the NF4 base).

A folder is written whole or not at all (``report.atomic.atomic_dir``) with a ``key.json`` naming the hash of what
made it and those parts. A folder whose key file names another key is never loaded. Writing a key removes the folders
of the same kind whose parts agree on ``same`` (the same model) but differ elsewhere (other code or libraries made
them): each holds a full copy of the weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

from ..measure.memory import free_memory
from ..report.atomic import atomic_dir, atomic_write_json, file_lock
from ..report.provenance import git_sha
from .host_copy import save_pretrained

__all__ = ["KEY_FILE", "stored_key", "write_key", "remove_superseded", "store"]

KEY_FILE = "key.json"


def stored_key(path: Path) -> str | None:
    """The key ``path``'s key file names; None when it has none or it cannot be read."""
    try:
        return json.loads((path / KEY_FILE).read_text(encoding="utf-8")).get("key")
    except (OSError, ValueError, AttributeError):
        return None


def store(final: Path, key: str, parts: dict[str, Any], same: tuple[str, ...], build: Callable) -> bool:
    """Unless ``final``'s key file names ``key``: write ``build()``'s model there (through pinned memory,
    host_copy.py) with its key, free it, and remove the superseded folders. True when it wrote. Call it under
    ``file_lock(final)`` and load ``final`` under the same lock, so a built model and a stored one are the same."""
    if stored_key(final) == key:
        return False
    model = build()
    with atomic_dir(final) as tmp:
        save_pretrained(model, tmp)
        write_key(tmp, key, parts)
    del model
    free_memory()
    remove_superseded(final, parts, same)
    return True


def write_key(folder: Path, key: str, parts: dict[str, Any]) -> None:
    atomic_write_json(folder / KEY_FILE, {"key": key, "parts": parts, "git_sha": git_sha()})


def remove_superseded(kept: Path, parts: dict[str, Any], same: tuple[str, ...]) -> None:
    """Remove the other folders named like ``kept`` (``<kind>-<key>``) whose parts agree with ``parts`` on ``same``."""
    kind = kept.name.rsplit("-", 1)[0]
    for other in kept.parent.glob(f"{kind}-*"):
        if other == kept or not (other / KEY_FILE).is_file():
            continue
        try:
            theirs = json.loads((other / KEY_FILE).read_text(encoding="utf-8"))["parts"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if all(theirs.get(k) == parts[k] for k in same):
            with file_lock(other):
                shutil.rmtree(other, ignore_errors=True)
