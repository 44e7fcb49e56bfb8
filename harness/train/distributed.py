"""Training across processes with accelerate (torchrun underneath): DDP, or FSDP sharding a 4-bit base.

The pytest process never joins the process group. ``launch_training`` runs

    python -m accelerate.commands.launch --num_processes N [--multi_gpu | --use_fsdp ...] \\
        -m harness.train.distributed --profile P --variant V --runs-dir R --out DIR

and waits; every process loads the base and calls the same ``train_adapter`` as a single-process run (trl's
SFTTrainer picks the process group up from accelerate's environment), rank 0 saves the adapter and writes its
figures to ``DIR/figures.json``, and every rank leaves the process group before it exits. The caller
(``adapters.ensure_adapter``) owns the lock, the atomic directory and the manifest, exactly as for one process.
On a CPU the backend is gloo; on GPUs NCCL.

A failed launch must tell its cause, and torchrun's own summary ("rank 1 exited with code 1") does not. So torchrun
writes each rank's stdout/stderr to ``DIR/ranks/<run>/attempt_0/<rank>/`` (``--log_dir`` + ``--tee 3``: the
output still reaches ``launch.log`` too), and ``main`` is wrapped in torchelastic's ``record``, which writes the
exception's traceback to that rank's ``error.json``. On failure these logs are copied to
``runs/<profile>/failed/<variant>-<UTC time>/`` before the error is raised, because the caller deletes ``DIR``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.distributed.elastic.multiprocessing.errors import record

from ..config.profiles import config_hash
from ..config.schema import Profile, Variant

__all__ = ["DistributedTrainingError", "launch_command", "launch_training", "is_main_process"]

FIGURES = "figures.json"
LOG = "launch.log"
RANK_LOGS = "ranks"  # torchrun's --log_dir inside the out dir
TRACEBACK_LINES = 30


class DistributedTrainingError(RuntimeError):
    """A launched run failed; the message names the profile, variant, exit code, the first failing rank with the
    end of its traceback, and the folder where the logs were kept."""


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _leave_process_group() -> None:
    """Destroy this rank's process group before the interpreter exits.

    Left up, gloo's threads are torn down with the interpreter, which can abort the rank ("terminate called without
    an active exception", SIGABRT) while its peer still runs; torchrun then kills the peer, and a finished run is
    reported as failed. It happened once in CI, at random. ``suites/selftest/test_distributed.py`` checks at each
    rank's exit that its group is gone."""
    from accelerate import PartialState

    PartialState().destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_group(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=10)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def launch_command(profile: Profile, variant: Variant, runs_dir: Path, out_dir: Path) -> list[str]:
    d = profile.distributed
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(d.num_processes),
           "--num_machines", "1", "--main_process_port", str(d.main_process_port or _free_port()),
           "--mixed_precision", "no", "--dynamo_backend", "no"]
    if d.mode == "ddp":
        # accelerate's torchrun launcher; on a machine without CUDA its processes join a gloo group
        # (``--cpu`` would start one process: accelerate launches several CPU processes only through mpirun)
        cmd.append("--multi_gpu")
    if d.mode == "fsdp":  # the QLoRA + FSDP settings from the accelerate / peft FSDP-QLoRA guides
        cmd += ["--use_fsdp", "--fsdp_sharding_strategy", "FULL_SHARD",
                "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
                "--fsdp_transformer_layer_cls_to_wrap", "MistralDecoderLayer",
                "--fsdp_use_orig_params", "false", "--fsdp_cpu_ram_efficient_loading", "true",
                "--fsdp_sync_module_states", "true", "--fsdp_state_dict_type", "FULL_STATE_DICT"]
    # every rank's stdout/stderr to its own file (and still to launch.log), torchelastic error files beside them
    cmd += ["--log_dir", str(Path(out_dir).resolve() / RANK_LOGS), "--tee", "3"]
    cmd += ["-m", "harness.train.distributed", "--profile", profile.source_file, "--variant", variant.name,
            "--runs-dir", str(Path(runs_dir).resolve()), "--out", str(Path(out_dir).resolve()),
            "--config-hash", config_hash(profile)]
    return cmd


def _keep_logs(profile: Profile, variant: Variant, runs_dir: Path, out_dir: Path) -> Path:
    """Copy the launch log and every rank's logs out of ``out_dir``, which the caller deletes when we raise."""
    failed = Path(runs_dir) / profile.name / "failed"
    stem = f"{variant.name}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    for n in range(1, 1000):  # two failures in one second get -2, -3 ...
        kept = failed / (stem if n == 1 else f"{stem}-{n}")
        try:
            kept.mkdir(parents=True)
            break
        except FileExistsError:
            continue
    if (Path(out_dir) / LOG).exists():
        shutil.copy2(Path(out_dir) / LOG, kept / LOG)
    if (Path(out_dir) / RANK_LOGS).is_dir():
        shutil.copytree(Path(out_dir) / RANK_LOGS, kept / RANK_LOGS)
    return kept


def _stderr_logs(rank_logs: Path) -> list[tuple[Path, str]]:
    """(path, text) of each rank's stderr.log under torchrun's log dir, in path order; a rank's folder is named by
    its local rank."""
    return [(log, log.read_text(encoding="utf-8", errors="replace"))
            for log in sorted(rank_logs.rglob("stderr.log")) if log.parent.name.isdigit()]


def _first_failure(rank_logs: Path) -> tuple[int, Path, str] | None:
    """(rank, its log folder, traceback) of the rank that failed first, or None if no rank left a traceback.

    A Python exception in ``main`` leaves ``<rank>/error.json`` (from ``record``); the earliest written one is the
    cause, later ones are other ranks losing their peer. A crash outside ``main`` (an import, a SystemExit) leaves
    only ``stderr.log``: the earliest last-written one holding a traceback. The folder name is the local rank,
    which is the rank on one machine.
    """
    found = []
    for err in rank_logs.rglob("error.json"):
        try:
            msg = json.loads(err.read_text(encoding="utf-8"))["message"]
            tb = msg["extraInfo"]["py_callstack"] if isinstance(msg, dict) else str(msg)
            found.append((err.stat().st_mtime_ns, int(err.parent.name), err.parent, tb))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    if not found:
        for log, text in _stderr_logs(rank_logs):
            if "Traceback (most recent call last)" in text:
                tb = text[text.index("Traceback (most recent call last)"):]
                found.append((log.stat().st_mtime_ns, int(log.parent.name), log.parent, tb))
    if not found:
        return None
    _, rank, folder, tb = min(found)
    return rank, folder, "\n".join(tb.rstrip().splitlines()[-TRACEBACK_LINES:])


def _rank_ends(rank_logs: Path, lines: int = 5) -> str:
    """The last lines of each rank's non-empty stderr.log: where a rank killed by a signal (an abort in C++) says
    why, which torchrun's summary does not."""
    return "".join(f"rank {log.parent.name}'s stderr.log ends:\n" + "\n".join(text.strip().splitlines()[-lines:])
                   + "\n" for log, text in _stderr_logs(rank_logs) if text.strip())


def _failure_message(head: str, kept: Path, hung: bool = False) -> str:
    """``head``, the first failing rank's traceback (or the launch log's end) and where the kept logs are.

    After a timeout the launch log ends with the launcher's own SIGTERM traceback, which would mislead: a hang
    points at the ranks' logs instead."""
    first = _first_failure(kept / RANK_LOGS)
    if first is None and hung:
        body = "no rank left a traceback (a hang: each rank's stderr.log ends where it stopped)"
    elif first is None:
        text = (kept / LOG).read_text(encoding="utf-8", errors="replace") if (kept / LOG).exists() else ""
        tail = "\n".join(text.splitlines()[-TRACEBACK_LINES:])
        body = f"no rank left a traceback; {_rank_ends(kept / RANK_LOGS)}the end of {LOG}:\n{tail}"
    else:
        rank, folder, tb = first
        body = f"rank {rank} failed first (its own logs: {folder}); the end of its traceback:\n{tb}"
    return (f"{head}; {body}\nThe logs are kept in {kept} ({LOG}, and {RANK_LOGS}/<run>/attempt_0/<rank>/ with "
            f"stderr.log, stdout.log and, for a Python error, error.json); fix the cause shown there and run again.")


def launch_training(profile: Profile, variant: Variant, runs_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Train ``variant`` with ``profile.distributed`` processes into ``out_dir``; return rank 0's figures."""
    cmd = launch_command(profile, variant, runs_dir, out_dir)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[2])] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    log = Path(out_dir) / LOG
    d = profile.distributed
    where = f"{profile.source_file}: distributed.{d.mode} x{d.num_processes}, training {variant.name}"
    with open(log, "w", encoding="utf-8") as f:
        # its own session: on a timeout (or Ctrl-C) the whole group goes, workers included, not just the launcher
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            proc.wait(timeout=d.timeout_s)
        except BaseException as e:
            _kill_group(proc)
            if isinstance(e, subprocess.TimeoutExpired):
                kept = _keep_logs(profile, variant, runs_dir, out_dir)
                raise DistributedTrainingError(_failure_message(
                    f"{where}: ran past distributed.timeout_s ({d.timeout_s} s; raise it if the run is just slow)",
                    kept, hung=True)) from None
            raise
    figures = Path(out_dir) / FIGURES
    if proc.returncode != 0 or not figures.exists():
        kept = _keep_logs(profile, variant, runs_dir, out_dir)
        what = f"failed (exit {proc.returncode})" if proc.returncode else f"exited 0 without rank 0's {FIGURES}"
        raise DistributedTrainingError(_failure_message(f"{where}: {what}", kept))
    result = json.loads(figures.read_text())
    figures.unlink()
    shutil.rmtree(Path(out_dir) / RANK_LOGS, ignore_errors=True)  # launch.log holds the same output, tee'd
    return result


@record  # a Python exception here writes this rank's traceback to torchrun's error.json
def main(argv: list[str] | None = None) -> None:
    """One process of a launched run (started by accelerate, never by hand)."""
    from ..config.profiles import load_profile
    from ..data.dataset import load_splits
    from ..models.base import load_base, load_tokenizer
    from ..models.revision import pin_revision
    from ..report.atomic import atomic_write_json
    from .trainer import train_adapter

    ap = argparse.ArgumentParser(description="one process of a distributed QLoRA training run")
    ap.add_argument("--profile", required=True)
    ap.add_argument("--variant", required=True)
    ap.add_argument("--runs-dir", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--config-hash", default=None, help="the launcher's profile hash; a mismatch is an error")
    args = ap.parse_args(argv)
    profile = pin_revision(load_profile(args.profile))  # as the launcher keyed it: a commit, a folder's content
    if args.config_hash and config_hash(profile) != args.config_hash:
        raise SystemExit(f"{args.profile}: the profile on disk differs from the one the launcher keyed the adapter "
                         f"with (edited during the run, or changed in memory); launch from the file as it is")
    splits = load_splits({s: profile.data_path(s) for s in ("train", "validation", "test")})
    cache_root = args.runs_dir / "_models"
    tokenizer = load_tokenizer(profile.model, cache_root)
    if torch.cuda.is_available():  # bitsandbytes quantizes onto the current device: make it this rank's GPU
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    base = load_base(profile.model, profile.quantization, cache_root, fsdp=profile.distributed.mode == "fsdp")
    figures = train_adapter(profile, profile.variant(args.variant), splits["train"], tokenizer, base, args.out)
    if is_main_process():
        atomic_write_json(args.out / FIGURES, figures)
    _leave_process_group()


if __name__ == "__main__":
    main()
