"""Where a session's seconds go outside its timed rounds: writing a checkpoint, loading a model, training, building
and compiling an engine, the compile cache. ``timed(what)`` times a block and logs one line on the ``harness.phases``
logger; ``log_to(path)`` sends those lines to a file (the sweep sends them to ``runs/<profile>/phases.log``, beside
``train.log``), so a GPU run's setup, which pytest's ``--durations`` shows as one figure, can be taken apart.

    2026-12-03T19:40:02 pid=2975 phase=model-load wall_s=4.1 what=r8: base to train on (...)

``note`` logs a decision that takes no time of its own, without ``wall_s`` (``phase=reuse``: a timed figure reused or
why not; ``phase=compile-cache``: the compiled artifacts loaded or none; ``phase=nf4-base``: the 4-bit base
quantized and kept in ``runs/_models/``; ``phase=session-end``: the session's exit status, its log's last line, from
the plugin). A block that raises is logged too, with
``failed=<exception type>`` before ``what``. Nothing here changes what a phase does.

A process's first line (``phase=startup``) splits the seconds from its start to that line at the plugin's milestones
(``milestone``: pytest configured, the tests collected): the interpreter and the imports, collection, and the first
test's setup up to its first phase. On a fresh H100 those were 19 s that no other line showed (d5b5d80, issue 18).

The session's end also says what the garbage collector's full collections took (``phase=gc``, counted from the first
``log_to``): the harness collects before every peak-memory reset and after every dropped model, and on the 7B shape one
such collection took 1.2 s (``docs/performance.md``, issue 18's try 3), time no other phase line shows.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["LOGGER", "timed", "note", "log_to", "end_session", "milestone"]

LOGGER = logging.getLogger("harness.phases")
_FULL_COLLECTIONS = {"count": 0, "seconds": 0.0, "started": None}  # generation-2 collections since the first log_to
_MILESTONES: dict[str, float] = {}  # when this process first passed each start-up milestone, in epoch seconds


def _time_full_collections(phase: str, info: dict) -> None:
    if info["generation"] != 2:
        return
    if phase == "start":
        _FULL_COLLECTIONS["started"] = time.perf_counter()
    elif _FULL_COLLECTIONS["started"] is not None:
        _FULL_COLLECTIONS["count"] += 1
        _FULL_COLLECTIONS["seconds"] += time.perf_counter() - _FULL_COLLECTIONS["started"]
        _FULL_COLLECTIONS["started"] = None


@contextlib.contextmanager
def timed(phase: str, what: str = "") -> Iterator[None]:
    """Log ``phase`` (a kind: ``model-load``, ``train``, ``compile``...) and ``what`` with the block's wall time."""
    start, failed = time.perf_counter(), ""
    try:
        yield
    except BaseException as e:
        failed = f" failed={type(e).__name__}"
        raise
    finally:
        _log_wall(phase, time.perf_counter() - start, what, failed)


def _log_wall(phase: str, seconds: float, what: str, failed: str = "") -> None:
    LOGGER.info("pid=%d phase=%s wall_s=%.1f%s what=%s", os.getpid(), phase, seconds, failed, what or "-")


def note(phase: str, what: str) -> None:
    """Log a decision that takes no time of its own (``reuse``: a timed figure reused, or why not)."""
    LOGGER.info("pid=%d phase=%s what=%s", os.getpid(), phase, what)


def milestone(name: str) -> None:
    """Note when this process first passed ``name`` (the plugin's: ``configure``, ``collected``)."""
    _MILESTONES.setdefault(name, time.time())


def _log_startup() -> None:
    """``phase=startup``: the seconds from the process's start to now, split at the milestones passed so far."""
    import psutil

    marks = [("start", psutil.Process().create_time()), *_MILESTONES.items(), ("this line", time.time())]
    parts = [f"to {name} {t - before:.1f} s" for (_, before), (name, t) in zip(marks, marks[1:])]
    _log_wall("startup", marks[-1][1] - marks[0][1], "from the process's start: " + ", ".join(parts))


def log_to(path: Path) -> None:
    """Append the phase lines to ``path`` from now on, and no longer to the file an earlier call named (one session
    log per process: the sweep that started last owns it). The file is opened at the first line. The process's
    first call also starts the count of full collections and logs ``phase=startup``."""
    first = _time_full_collections not in gc.callbacks
    if first:
        gc.callbacks.append(_time_full_collections)
    path = Path(path).resolve()
    for handler in [h for h in LOGGER.handlers if isinstance(h, logging.FileHandler)]:
        if handler.baseFilename == str(path):
            return
        LOGGER.removeHandler(handler)
        handler.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8", delay=True)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%dT%H:%M:%S"))
    LOGGER.addHandler(handler)
    LOGGER.setLevel(logging.INFO)
    if first:
        _log_startup()


def end_session(exitstatus: int) -> None:
    """The log's last two lines: the full collections' count and seconds since the first ``log_to`` (``phase=gc``),
    then the session's exit status (``phase=session-end``)."""
    _log_wall("gc", _FULL_COLLECTIONS["seconds"],
              f"{_FULL_COLLECTIONS['count']} full collections, explicit and automatic")
    note("session-end", f"exitstatus={exitstatus}")
