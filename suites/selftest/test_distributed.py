"""Distributed training through accelerate: config checks, the launch command, the cache key, and (slow) a real
2-process DDP run of a quick tiny profile on the gloo backend, through the same ``ensure_adapter`` path.

The full 2-process run with the quality gate (train EM >= 0.9) is ``pytest --profile tiny-ddp -k r16
suites/benchmark/test_quality.py``, which ``.ci/run`` runs after the README's test command.
"""

from __future__ import annotations

import pytest

from fixtures.user_runs import quick_profile, write_profile
from harness.config import ConfigError, load_profile
from harness.distributed import launch_command
from harness.variants import artifact_key, ensure_adapter


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
    assert cmd[cmd.index("-m", 3) + 1] == "harness.distributed"
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


@pytest.mark.slow
def test_two_process_training_shards_the_data_and_records_the_world_size(tmp_path):
    """A real 2-process gloo run: each process takes half the micro-batches; rank 0 saves one adapter."""
    from harness.data import load_splits
    from harness.models import load_tokenizer

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
