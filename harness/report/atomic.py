"""Atomic writes and file locks.

An artifact is built in a hidden temp dir beside its final place and renamed into place in one step, so a reader
sees either nothing or the complete artifact: a run killed mid-write leaves only a ``.tmp-*`` dir that is never
loaded and is swept by the next writer of the same key.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_dir",
    "atomic_write_text",
    "atomic_write_bytes",
    "atomic_write_json",
    "file_lock",
    "sweep_partial",
]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish_mode(path: Path, directory: bool = False) -> None:
    """mkstemp/mkdtemp create 0600/0700; a published file gets the mode a plain open() would (0644 under umask 022)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temp dir; on success replace ``final`` with it in one rename, on error delete it."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        yield tmp
        _publish_mode(tmp, directory=True)
        if final.exists():
            old = final.with_name(f".old-{final.name}-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def sweep_partial(final: Path) -> None:
    """Delete temp dirs a killed writer of ``final`` left behind. Call only while holding its lock."""
    for stale in Path(final).parent.glob(f".tmp-{Path(final).name}-*"):
        shutil.rmtree(stale, ignore_errors=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file via a temp file and os.replace: readers never see a half-written file."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _publish_mode(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, default=str) + "\n")


def file_lock(target: Path, timeout_s: float = -1):
    """An inter-process lock beside ``target`` (``<target>.lock``); blocks until free by default."""
    from filelock import FileLock

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(target.parent / f".{target.name}.lock"), timeout=timeout_s)
