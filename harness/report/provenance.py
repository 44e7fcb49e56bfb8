"""The provenance stamped on every artifact: library versions, git sha, device, and digests of the code.

Every file written under runs/ carries it, so a figure can be traced to the code and machine that made it.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["library_versions", "git_sha", "git_provenance", "device_kind", "device_name", "provenance",
           "source_digest", "PROJECT_ROOT", "TRACKED_LIBRARIES"]

TRACKED_LIBRARIES = ("torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "mistral-common",
                     "accelerate", "huggingface_hub", "torchao")
PROJECT_ROOT = Path(__file__).resolve().parents[2]  # runs/, the card and data/ live here, whatever pytest's rootdir
_REPO_ROOT = PROJECT_ROOT
_COMMIT = re.compile(r"[0-9a-f]{7,40}")  # what a declared sha must look like
SHA_ENV, SHA_FILE = "QLORA_GIT_SHA", ".git_sha"  # where a copy without .git (the GPU machine) gets its sha


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in TRACKED_LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "missing"
    return out


def git_sha() -> str:
    """The repo's commit sha, with ``-dirty`` when tracked files are modified.

    A real ``.git`` wins: ``$QLORA_GIT_SHA`` cannot see an edit and never says ``-dirty``. Without ``.git`` (a copy
    of the tree on another machine) the sha comes from ``$QLORA_GIT_SHA`` or the file ``.git_sha`` at the project
    root; with neither, or with a value that is not a commit's sha (7-40 hex digits: a placeholder left in a
    command, as "SHA" was on the H200 on 2026-12-05), ``unknown`` (the card then says where to set it).
    ``git_provenance`` records both.
    """
    if (_REPO_ROOT / ".git").exists():
        real = _git_head()
        if real is not None:
            return real
    file = _REPO_ROOT / SHA_FILE
    declared = os.environ.get(SHA_ENV, "").strip() or (file.read_text().strip() if file.is_file() else "")
    return declared if _COMMIT.fullmatch(declared) else "unknown"


def git_provenance() -> dict[str, str]:
    """``{"git_sha": ...}``, plus ``git_sha_declared`` (``$QLORA_GIT_SHA``) when it disagrees with the real
    checkout: a stale variable left in a shell is then visible in the results, not silently believed."""
    sha, declared = git_sha(), os.environ.get(SHA_ENV, "").strip()
    return {"git_sha": sha, **({"git_sha_declared": declared} if declared and declared != sha else {})}


def _git_head() -> str | None:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_REPO_ROOT, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        # the card and its assets are the harness's own output, not code: writing them does not make a run dirty
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)MODEL_CARD.md", ":(exclude)card_assets"], cwd=_REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def source_digest(files, listed_in: str = "the source list") -> str:
    """sha256 over the bytes of ``files`` (paths, in the given order): a cache key part that changes with the code.
    A listed file that does not exist is an error: dropping it would leave its edits out of every key."""
    import hashlib

    h = hashlib.sha256()
    for f in files:
        if not Path(f).is_file():
            raise FileNotFoundError(f"{f}: listed in {listed_in} but missing; a moved or renamed module must be "
                                    f"renamed in that list too, or its edits would no longer change the key")
        h.update(Path(f).name.encode() + b"\0" + Path(f).read_bytes() + b"\0")
    return h.hexdigest()


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def device_kind() -> str:
    """What decodes, for keys: ``cpu``, or ``cuda:`` and the GPU's name (kernels and their numerics differ by GPU;
    the CPU's core count does not change a prediction, so it is left out)."""
    import torch

    return f"cuda:{torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "cpu"


def provenance() -> dict[str, Any]:
    """What every file in runs/ records about where it came from."""
    return {
        "versions": library_versions(),
        **git_provenance(),
        "device": device_name(),
        "hostname": platform.node(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
