"""Distributed training through accelerate: config checks, the launch command, the cache key, and (slow) a real
2-process DDP run of a quick tiny profile on the gloo backend, through the same ``ensure_adapter`` path.

The full 2-process run with the quality gate (train EM >= 0.9) is ``pytest --profile tiny-ddp -k r16
suites/benchmark/test_quality.py``, which ``.ci/run`` runs after the README's test command.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from fixtures.user_runs import quick_profile, write_profile
from harness.config.errors import ConfigError
from harness.config.profiles import load_profile
from harness.train.adapters import artifact_key, ensure_adapter
from harness.train.distributed import DistributedTrainingError, launch_command


def test_tiny_ddp_profile_is_two_processes_with_the_same_global_batch():
    single, ddp = load_profile("tiny"), load_profile("tiny-ddp")
    assert (ddp.distributed.mode, ddp.distributed.num_processes) == ("ddp", 2)
    assert ddp.training.batch_size * ddp.distributed.num_processes == single.training.batch_size
    assert ddp.training.learning_rate == single.training.learning_rate and ddp.training.epochs == single.training.epochs


def test_fsdp_needs_quant_storage_equal_to_compute_dtype(tmp_path):
    path = write_profile(tmp_path, {"distributed": {"mode": "fsdp", "num_processes": 2}})
    with pytest.raises(ConfigError, match=r"quantization\.quant_storage: .*set quant_storage: float32"):
        load_profile(path)
    fixed = write_profile(tmp_path, {"distributed": {"mode": "fsdp", "num_processes": 2},
                                     "quantization": {"quant_storage": "float32"}})
    assert load_profile(fixed).quantization.quant_storage == "float32"


def test_a_distributed_mode_needs_two_processes(tmp_path):
    with pytest.raises(ConfigError, match=r"distributed\.num_processes: mode 'ddp' needs num_processes >= 2"):
        load_profile(write_profile(tmp_path, {"distributed": {"mode": "ddp", "num_processes": 1}}))


def test_launch_command_runs_the_worker_module_under_accelerate(tmp_path):
    ddp = load_profile("tiny-ddp")
    cmd = launch_command(ddp, ddp.variant("r16"), tmp_path / "runs", tmp_path / "out")
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--num_processes") + 1] == "2" and "--multi_gpu" in cmd and "--use_fsdp" not in cmd
    assert cmd[cmd.index("-m", 3) + 1] == "harness.train.distributed"
    assert cmd[cmd.index("--profile") + 1] == ddp.source_file and cmd[cmd.index("--variant") + 1] == "r16"
    fsdp = load_profile(write_profile(tmp_path, {"distributed": {"mode": "fsdp", "num_processes": 2},
                                                 "quantization": {"quant_storage": "float32"}}))
    cmd = launch_command(fsdp, fsdp.variant("r16"), tmp_path / "runs", tmp_path / "out")
    assert "--use_fsdp" in cmd and cmd[cmd.index("--fsdp_use_orig_params") + 1] == "false"
    assert cmd[cmd.index("--fsdp_transformer_layer_cls_to_wrap") + 1] == "MistralDecoderLayer"


def test_world_size_is_part_of_the_cache_key():
    single, ddp = load_profile("tiny"), load_profile("tiny-ddp")
    k1 = artifact_key(single, single.variant("r16"), [])
    k2 = artifact_key(ddp, ddp.variant("r16"), [])
    assert k1["distributed"] == {"mode": "none", "world_size": 1}
    assert k2["distributed"] == {"mode": "ddp", "world_size": 2}


# As sitecustomize.py: each rank checks, at exit, that it left its process group. One that did not tears gloo's
# threads down in the interpreter's teardown, which aborts at random (a CI run: rank 1 SIGABRT, then rank 0 killed);
# this check fails every time instead, with a reason in the rank's stderr.log.
_CHECK_LEFT_GROUP = """
import atexit, os, sys

if "RANK" in os.environ and "harness.train.distributed" in sys.orig_argv:
    def check_left_group():
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            print("rank exiting with its process group still up", file=sys.stderr, flush=True)
            os._exit(17)

    atexit.register(check_left_group)
"""


@pytest.mark.slow
def test_two_process_training_shards_the_data_and_records_the_world_size(tmp_path, monkeypatch):
    """A real 2-process gloo run: each process takes half the micro-batches; rank 0 saves one adapter; every rank
    leaves its process group before it exits."""
    from harness.data.dataset import load_splits
    from harness.models.base import load_tokenizer

    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(_CHECK_LEFT_GROUP, encoding="utf-8")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(inject)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    path = quick_profile(tmp_path / "cfg", {"training": {"batch_size": 2, "epochs": 2},
                                            "distributed": {"mode": "ddp", "num_processes": 2, "timeout_s": 600}})
    profile = load_profile(path)
    splits = load_splits({s: profile.data_path(s) for s in ("train", "validation", "test")})
    tok = load_tokenizer(profile.model, tmp_path / "runs" / "_models")
    final, manifest = ensure_adapter(profile, profile.variant("r8"), splits, tok, tmp_path / "runs")
    assert manifest["world_size"] == 2 and manifest["key"]["distributed"]["world_size"] == 2
    # 20 examples, 2 per process x 2 processes -> 5 steps an epoch (one process alone would make 10)
    assert manifest["optimizer_steps"] == manifest["planned_optimizer_steps"] == 10
    assert (final / "adapter" / "adapter_model.safetensors").is_file()
    assert (final / "launch.log").is_file()  # the processes' output is kept with the artifact


# Put on PYTHONPATH as sitecustomize.py: every Python process imports it at start-up, so rank 1 of the launched run
# fails inside harness.train.distributed.main without any test hook in the library.
_FAIL_RANK_1 = """
import os, sys


def fail_on_rank_1(*args, **kwargs):
    raise RuntimeError("injected failure on rank 1")


if os.environ.get("RANK") == "1" and "harness.train.distributed" in sys.orig_argv:
    import argparse

    argparse.ArgumentParser.parse_args = fail_on_rank_1
"""


@pytest.mark.slow
def test_a_failing_rank_is_named_with_its_traceback_and_its_logs_are_kept(tmp_path, monkeypatch):
    """Rank 1 raises on purpose: the error names it, shows its own traceback, and points at logs that outlive the
    deleted temp dir; no partial or final artifact is left for the variant."""
    from harness.data.dataset import load_splits
    from harness.models.base import load_tokenizer

    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(_FAIL_RANK_1, encoding="utf-8")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(inject)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    path = quick_profile(tmp_path / "cfg", {"training": {"batch_size": 2},
                                            "distributed": {"mode": "ddp", "num_processes": 2, "timeout_s": 600}})
    profile = load_profile(path)
    splits = load_splits({s: profile.data_path(s) for s in ("train", "validation", "test")})
    runs = tmp_path / "runs"
    tok = load_tokenizer(profile.model, runs / "_models")
    with pytest.raises(DistributedTrainingError) as info:
        ensure_adapter(profile, profile.variant("r8"), splits, tok, runs)
    message = str(info.value)
    assert "distributed.ddp x2" in message and "r8" in message and "exit " in message
    assert "rank 1 failed first" in message
    assert "RuntimeError: injected failure on rank 1" in message
    assert "in fail_on_rank_1" in message and "in main" in message  # the rank's own traceback, through main()
    kept = Path(re.search(r"logs are kept in (\S+) \(", message).group(1))
    assert kept.parent == runs / profile.name / "failed" and re.fullmatch(r"r8-\d{8}T\d{6}Z", kept.name)
    assert (kept / "launch.log").is_file()
    rank1 = Path(re.search(r"its own logs: (\S+)\)", message).group(1))
    assert rank1.is_relative_to(kept) and rank1.name == "1"
    assert "injected failure on rank 1" in (rank1 / "stderr.log").read_text(errors="replace")
    left = sorted(p.name for p in (runs / profile.name).iterdir() if p.name.startswith((".tmp-", "r8")))
    assert left == [], left


def test_a_rank_killed_by_a_signal_is_explained_by_its_own_stderr(tmp_path):
    """No traceback anywhere (a C++ abort): the message quotes the end of each rank's stderr.log, where the abort's
    reason is, as well as the launcher's log."""
    from harness.train.distributed import _failure_message

    rank1 = tmp_path / "ranks" / "run-x" / "attempt_0" / "1"
    rank1.mkdir(parents=True)
    (rank1 / "stderr.log").write_text("step 10\nterminate called without an active exception\n", encoding="utf-8")
    (rank1.parent / "0").mkdir()
    (rank1.parent / "0" / "stderr.log").write_text("", encoding="utf-8")
    (tmp_path / "launch.log").write_text("ChildFailedError: rank 1 exitcode -6 (SIGABRT)\n", encoding="utf-8")
    message = _failure_message("training r8: failed (exit 1)", tmp_path)
    assert "rank 1's stderr.log ends:\nstep 10\nterminate called without an active exception\n" in message
    assert "rank 0's" not in message  # an empty log says nothing
    assert message.index("terminate called") < message.index("the end of launch.log:\nChildFailedError")
