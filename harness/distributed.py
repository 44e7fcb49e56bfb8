"""Training across processes with accelerate (torchrun underneath): DDP, or FSDP sharding a 4-bit base.

The pytest process never joins the process group. ``launch_training`` runs

    python -m accelerate.commands.launch --num_processes N [--multi_gpu | --use_fsdp ...] \\
        -m harness.distributed --profile P --variant V --runs-dir R --out DIR

and waits; every process loads the base and calls the same ``train_adapter`` as a single-process run (trl's
SFTTrainer picks the process group up from accelerate's environment), rank 0 saves the adapter and writes its
figures to ``DIR/figures.json``. The caller (``variants.ensure_adapter``) owns the lock, the atomic directory and
the manifest, exactly as for one process. On a CPU the backend is gloo; on GPUs NCCL.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from .config import Profile, Variant, config_hash

__all__ = ["DistributedTrainingError", "launch_command", "launch_training", "world_size", "is_main_process"]

FIGURES = "figures.json"
LOG = "launch.log"


class DistributedTrainingError(RuntimeError):
    """A launched training run failed; the message names the profile, variant, exit code and the log's tail."""


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


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
    cmd += ["-m", "harness.distributed", "--profile", profile.source_file, "--variant", variant.name,
            "--runs-dir", str(Path(runs_dir).resolve()), "--out", str(Path(out_dir).resolve()),
            "--config-hash", config_hash(profile)]
    return cmd


def launch_training(profile: Profile, variant: Variant, runs_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Train ``variant`` with ``profile.distributed`` processes into ``out_dir``; return rank 0's figures."""
    cmd = launch_command(profile, variant, runs_dir, out_dir)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parent.parent)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    log = Path(out_dir) / LOG
    where = f"{profile.source_file}: distributed.{profile.distributed.mode} x{profile.distributed.num_processes}"
    with open(log, "w", encoding="utf-8") as f:
        # its own session: on a timeout (or Ctrl-C) the whole group goes, workers included, not just the launcher
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            proc.wait(timeout=profile.distributed.timeout_s)
        except BaseException as e:
            _kill_group(proc)
            if isinstance(e, subprocess.TimeoutExpired):
                raise DistributedTrainingError(f"{where}: training {variant.name} ran past distributed.timeout_s "
                                               f"({profile.distributed.timeout_s} s); see {log}") from None
            raise
    figures = Path(out_dir) / FIGURES
    if proc.returncode != 0 or not figures.exists():
        tail = "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-25:])
        raise DistributedTrainingError(f"{where}: training {variant.name} failed (exit {proc.returncode}); "
                                       f"last lines of {log}:\n{tail}")
    result = json.loads(figures.read_text())
    figures.unlink()
    return result


def main(argv: list[str] | None = None) -> None:
    """One process of a launched run (started by accelerate, never by hand)."""
    from .artifacts import atomic_write_json
    from .config import load_profile
    from .data import load_splits
    from .models import load_base, load_tokenizer
    from .train import train_adapter

    ap = argparse.ArgumentParser(description="one process of a distributed QLoRA training run")
    ap.add_argument("--profile", required=True)
    ap.add_argument("--variant", required=True)
    ap.add_argument("--runs-dir", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--config-hash", default=None, help="the launcher's profile hash; a mismatch is an error")
    args = ap.parse_args(argv)
    profile = load_profile(args.profile)
    if args.config_hash and config_hash(profile) != args.config_hash:
        raise SystemExit(f"{args.profile}: the profile on disk differs from the one the launcher keyed the adapter "
                         f"with (edited during the run, or changed in memory); launch from the file as it is")
    splits = load_splits({s: profile.data_path(s) for s in ("train", "validation", "test")})
    cache_root = args.runs_dir / "_models"
    tokenizer = load_tokenizer(profile.model, cache_root)
    base = load_base(profile.model, profile.quantization, cache_root, fsdp=profile.distributed.mode == "fsdp")
    figures = train_adapter(profile, profile.variant(args.variant), splits["train"], tokenizer, base, args.out)
    if is_main_process():
        atomic_write_json(args.out / FIGURES, figures)


if __name__ == "__main__":
    main()
