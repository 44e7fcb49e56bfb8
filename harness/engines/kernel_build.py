"""Building the engines' CUDA libraries on the GPU machine, once per key (harness/engines/gemv.py,
harness/engines/awq_kernels.py).

``keyed_folder`` keeps a library in ``<cache>/<prefix>-<key>/``: built in a temp dir beside it and renamed into place
under a lock, with a ``key.json`` saying what it was built from, so a half-built folder is never loaded and another
process building the same key is waited for. ``compile_library`` compiles with torch's JIT loader (nvcc on the PATH,
or ``CUDA_HOME``) in a child process: the loader also loads what it builds, and the parent loads a library only from
its final place. ``build_in_background`` starts a build in a thread beside the session, at a lower CPU priority
(``BUILD_NICENESS``) so that the compiler takes only the cores the session leaves idle; ``wait_for_background_build``
lets it end before anything is timed (the compiler runs on every core).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..report.atomic import atomic_dir, file_lock, sweep_partial

__all__ = ["BUILD_NICENESS", "CompilerMissing", "nvcc", "library_key", "compile_library", "keyed_folder",
           "build_in_background", "background_build_running", "wait_for_background_build"]

# Added to the build thread's nice value (Linux: that thread and the compiler processes it starts, not the session).
# At the same priority the compiler on every core slowed the trainings beside it: trl's SFTTrainer took 1.9, 4.5 and
# 4.7 s to build in the user's GPU command against 1.4, 1.0 and 1.3 s with no build running (one H100,
# docs/performance.md, issue 18's try 30).
BUILD_NICENESS = 10


class CompilerMissing(RuntimeError):
    """No nvcc where torch's loader looks for it."""


def nvcc(needed_by: str) -> tuple[str, str]:
    """The nvcc that torch's loader builds with (``CUDA_HOME``, else the PATH's, else /usr/local/cuda) and its
    ``--version`` text; ``CompilerMissing`` naming ``needed_by`` where there is none."""
    from torch.utils.cpp_extension import CUDA_HOME

    path = Path(CUDA_HOME or "/nonexistent") / "bin" / "nvcc"
    if not path.is_file():
        raise CompilerMissing(f"{needed_by} compiles CUDA kernels once per machine and needs CUDA's compiler: put "
                              "nvcc on the PATH or set CUDA_HOME")
    version = subprocess.run([str(path), "--version"], capture_output=True, text=True, check=True).stdout.strip()
    return str(path), version


def library_key(texts: Sequence[bytes], nvcc_version: str, capability: tuple[int, int],
                flags: Sequence[str]) -> str:
    """sha256 of what changes a library: ``texts`` (its sources and the code that builds it), torch's and CUDA's
    versions, nvcc's, the GPU's compute capability and the compiler's flags."""
    h = hashlib.sha256()
    for text in texts:
        h.update(len(text).to_bytes(8, "little") + text)
    h.update(json.dumps([torch.__version__, torch.version.cuda, nvcc_version, list(capability), list(flags)]).encode())
    return h.hexdigest()


def compile_library(name: str, sources: Sequence[Path], out: Path, capability: tuple[int, int],
                    cflags: Sequence[str] = (), cuda_flags: Sequence[str] = (), include: Path | None = None) -> None:
    """``sources`` compiled by torch's loader into ``out/<name>.so`` (module doc), for ``capability`` only; the build
    folder is made and removed inside ``out``. RuntimeError with the compiler's last output if it fails."""
    script = ("import json, sys, torch.utils.cpp_extension as c; a = json.loads(sys.argv[1]); "
              "c.load(name=a['name'], sources=a['sources'], extra_include_paths=a['include'], "
              "extra_cflags=a['cflags'], extra_cuda_cflags=a['cuda_flags'], build_directory=a['build'], "
              "is_python_module=False)")
    build = Path(out) / "build"
    build.mkdir()
    args = {"name": name, "sources": [str(s) for s in sources], "include": [str(include)] if include else [],
            "cflags": list(cflags), "cuda_flags": list(cuda_flags), "build": str(build)}
    env = {**os.environ, "TORCH_CUDA_ARCH_LIST": f"{capability[0]}.{capability[1]}",
           "MAX_JOBS": os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))}
    done = subprocess.run([sys.executable, "-c", script, json.dumps(args)], env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"building {name} failed (in {out}):\n{done.stderr[-4000:]}")
    shutil.move(str(build / f"{name}.so"), Path(out) / f"{name}.so")
    shutil.rmtree(build)


def keyed_folder(cache_dir: Path, prefix: str, key: str, library: str, fill: Callable[[Path], dict]) -> Path:
    """``<cache_dir>/<prefix>-<key[:16]>``, made first if it holds no ``library`` file: ``fill(tmp)`` builds into a
    temp dir and returns what ``key.json`` records beside the key."""
    final = Path(cache_dir) / f"{prefix}-{key[:16]}"
    with file_lock(final):
        if not (final / library).is_file():
            sweep_partial(final)
            with atomic_dir(final) as tmp:
                made = fill(tmp)
                (tmp / "key.json").write_text(json.dumps({"key": key, **made}, indent=1))
    return final


_background: list[threading.Thread] = []  # builds started by build_in_background, for wait_for_background_build


def build_in_background(build: Callable[[Path], Path], cache_dir: Path) -> None:
    """Start ``build(cache_dir)`` in a thread where CUDA is here. A build that cannot start or fails is left to the
    foreground, which builds again when it loads the library and raises the error there."""
    if torch.cuda.is_available():
        thread = threading.Thread(target=_quiet, args=(build, cache_dir), daemon=True, name="kernel-build")
        _background.append(thread)
        thread.start()


def background_build_running() -> bool:
    """Whether a build that ``build_in_background`` started is still compiling."""
    return any(t.is_alive() for t in _background)


def wait_for_background_build() -> None:
    """Block until every build that ``build_in_background`` started has ended."""
    while _background:
        _background.pop().join()


def _quiet(build: Callable[[Path], Path], cache_dir: Path) -> None:
    try:
        if sys.platform.startswith("linux"):  # elsewhere nice() would lower the whole session
            os.nice(BUILD_NICENESS)
        build(cache_dir)
    except Exception:  # noqa: BLE001 - the foreground load meets the same error
        pass
