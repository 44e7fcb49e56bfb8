"""QLoRA training of one variant with trl's SFTTrainer: validate recipe -> data -> model -> train -> save.

The data is tokenized by ``harness.data.prompt.training_rows`` in Mistral's own format (prompt ids + answer ids + EOS,
loss on the answer and EOS only) and handed to SFTTrainer already tokenized, so what is trained is exactly what
``encode_prompt`` serves.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from ..config.schema import Profile, Variant
from ..data.dataset import Example
from ..data.loss_mask import check_loss_mask
from ..data.prompt import training_rows
from ..measure.memory import peak_memory, reset_peak_memory
from .layer_compile import use_compiled_step

__all__ = [
    "DegenerateRecipeWarning",
    "PackingDisabledWarning",
    "count_rows",
    "optimizer_steps",
    "peft_dir",
    "train_adapter",
]

# Attention kernels that isolate packed examples using position ids (transformers builds a block-diagonal mask
# from position-id resets for sdpa/eager, a block mask for flex; flash-attention takes cu_seqlens). Verified by
# suites/selftest/test_training.py.
PACKING_SAFE_ATTN = frozenset({"sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3"})


class DegenerateRecipeWarning(UserWarning):
    """The recipe makes too few optimizer steps to learn anything."""


class PackingDisabledWarning(UserWarning):
    """Packing was turned off because the attention kernel would let packed examples attend to each other."""


def count_rows(rows: list[dict], max_length: int, packing: bool) -> int:
    """Rows per epoch after trl's BFD packing (the same function SFTTrainer calls), or one per example."""
    if not packing:
        return len(rows)
    import datasets
    from trl.data_utils import pack_dataset

    ds = datasets.Dataset.from_list([{"input_ids": r["input_ids"]} for r in rows])
    return len(pack_dataset(ds, max_length, "bfd"))


def optimizer_steps(n_rows: int, batch_size: int, grad_accum: int, epochs: int) -> int:
    """Optimizer steps the HF Trainer makes: ceil(micro-batches / accumulation) per epoch, times epochs."""
    micro_batches = math.ceil(n_rows / batch_size)
    return math.ceil(micro_batches / grad_accum) * epochs


def _check_recipe(profile: Profile, rows: list[dict]) -> tuple[bool, int, int]:
    t = profile.training
    packing = t.packing
    if packing and profile.model.attn_implementation not in PACKING_SAFE_ATTN:
        warnings.warn(PackingDisabledWarning(
            f"{profile.source_file}: training.packing is on but attn_implementation "
            f"{profile.model.attn_implementation!r} would let packed examples attend to each other; packing is off "
            f"for this run. Use one of {sorted(PACKING_SAFE_ATTN)} to pack."), stacklevel=3)
        packing = False
    n_rows = count_rows(rows, t.max_length, packing)
    world = int(os.environ.get("WORLD_SIZE", "1"))  # each process takes 1/world of the micro-batches
    steps = optimizer_steps(n_rows, t.batch_size * world, t.grad_accum, t.epochs)
    if steps < t.min_optimizer_steps:
        warnings.warn(DegenerateRecipeWarning(
            f"{profile.source_file}: this recipe makes only {steps} optimizer step(s): {len(rows)} examples "
            f"{'pack into ' + str(n_rows) + ' row(s)' if packing else 'are ' + str(n_rows) + ' rows'} an epoch, "
            f"batch {t.batch_size} x grad_accum {t.grad_accum}, {t.epochs} epochs. Fix: set training.packing: false, "
            f"lower training.grad_accum, or raise training.epochs (below {t.min_optimizer_steps} steps the "
            f"adapter barely moves)."), stacklevel=3)
    return packing, n_rows, steps


def peft_dir(artifact: Path) -> Path:
    """The adapter as peft saves and loads it (config and safetensors), inside a variant's artifact folder."""
    return Path(artifact) / "adapter"


def train_adapter(profile: Profile, variant: Variant, examples: list[Example], tokenizer, model,
                  out_dir: Path) -> dict[str, Any]:
    """Train one LoRA adapter on ``model`` (the loaded base) and save it to ``out_dir``; return its figures."""
    called = time.perf_counter()
    import datasets
    from trl import SFTConfig, SFTTrainer

    from ..models.base import peft_config

    t = profile.training
    rows = training_rows(tokenizer, examples, t.max_length)
    packing, n_rows, planned_steps = _check_recipe(profile, rows)
    on_gpu = torch.cuda.is_available()
    world = int(os.environ.get("WORLD_SIZE", "1"))  # > 1 under accelerate launch (harness.train.distributed)
    dist_args = {} if world == 1 else {"ddp_find_unused_parameters": False,
                                       **({} if on_gpu else {"ddp_backend": "gloo"})}
    args = SFTConfig(
        output_dir=str(out_dir / "_trainer"), seed=t.seed, data_seed=t.seed, learning_rate=t.learning_rate,
        num_train_epochs=t.epochs, per_device_train_batch_size=t.batch_size, gradient_accumulation_steps=t.grad_accum,
        lr_scheduler_type=t.lr_scheduler, warmup_steps=t.warmup_ratio, weight_decay=t.weight_decay, optim=t.optim,
        max_length=t.max_length, packing=packing, packing_strategy="bfd", completion_only_loss=True,
        # the compiled step checkpoints inside its graph (layer_compile.py); transformers' wrapper would add a second
        gradient_checkpointing=t.gradient_checkpointing and t.step == "eager",
        # the compiled step compiles one shape: every batch is padded to max_length (the padding is labelled -100 and
        # masked, so the loss is unchanged; a packed row is nearly full anyway)
        pad_to_multiple_of=t.max_length if t.step == "compiled" else None,
        gradient_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        bf16=on_gpu and t.mixed_precision == "bf16", fp16=on_gpu and t.mixed_precision == "fp16",
        use_cpu=not on_gpu, logging_steps=t.logging_steps, save_strategy="no", eval_strategy="no",
        report_to="none", disable_tqdm=True, dataloader_num_workers=0, shuffle_dataset=True,
        # MistralCommonBackend names its pad id '<pad>', which is not in its vocab; give trl the id's own token.
        pad_token=tokenizer.convert_ids_to_tokens(tokenizer.pad_token_id), **dist_args,
    )
    if world == 1 and on_gpu and args.n_gpu > 1:
        # one process on a machine with several GPUs: the Trainer would wrap the model in nn.DataParallel, which
        # trl refuses; the model sits on one GPU (models.device), so train there
        args._n_gpu = 1
    train_ds = datasets.Dataset.from_list(rows)
    parts: dict[str, float] = {}  # what comes before the steps, split (train.log)

    def split(part: str) -> None:
        parts[part] = time.perf_counter() - called - sum(parts.values())

    split("data")
    # peft makes each LoRA layer on the default device and then moves it to its base layer's: ~1,300 small host-to-GPU
    # copies at the 7B shape (peft#896 left "init right on target device" undone). Made on the model's device, the
    # layers are drawn there, from that device's generator, which the trainer's seed seeds too.
    with torch.device(model.device):
        trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, processing_class=tokenizer,
                             peft_config=peft_config(profile.lora, variant))
    split("trainer")
    # trl casts LoRA weights of a quantized model to bf16. Without autocast, bf16 adapters on a model with small
    # logit margins stop learning (tiny: token accuracy stays at 0.18), so the recipe chooses the adapter dtype.
    for param in trainer.model.parameters():
        if param.requires_grad:
            param.data = param.data.to(getattr(torch, t.adapter_dtype))
    if getattr(trainer.accelerator.state, "fsdp_plugin", None) is not None:
        # PEFT's FSDP-QLoRA recipe: every LoRA module becomes an FSDP unit of its own, so no flat parameter mixes the
        # frozen base (NF4 stored as quant_storage) with trainable adapters of another dtype or requires_grad
        from peft.utils.other import fsdp_auto_wrap_policy

        trainer.accelerator.state.fsdp_plugin.auto_wrap_policy = fsdp_auto_wrap_policy(trainer.model)
    attention = profile.model.attn_implementation
    if t.step == "compiled":  # one graph serves every decoder layer (docs/performance.md, "Training")
        attention = use_compiled_step(trainer.model.get_base_model(), t.gradient_checkpointing)
    split("adapter")
    check_loss_mask(trainer, tokenizer, examples)  # labels -100 on every prompt token, before any step (loss_mask.py)
    trainable, total = trainer.model.get_nb_trainable_parameters()
    split("mask")
    reset_peak_memory()
    split("memory")
    start = time.perf_counter()
    trainer.train()
    if on_gpu:
        torch.cuda.synchronize()
    wall_s = time.perf_counter() - start
    memory = peak_memory()
    saving = time.perf_counter()
    if world == 1:
        trainer.model.save_pretrained(str(peft_dir(out_dir)), safe_serialization=True)
    else:  # gathers FSDP shards; writes on the main process only
        trainer.save_model(str(peft_dir(out_dir)))
    save_s = time.perf_counter() - saving
    tokens = sum(len(r["input_ids"]) for r in rows) * t.epochs
    losses = [{"step": h["step"], "loss": h["loss"]} for h in trainer.state.log_history if "loss" in h]
    result = {
        "trainable_params": int(trainable),
        "total_params": int(total),
        "train_wall_s": wall_s,
        "train_prepare_s": sum(parts.values()),  # trl's trainer, the data, the LoRA layers, the loss-mask check
        # its parts: imports, rows and config; SFTTrainer (LoRA layers, dataset); the adapter's dtype (and FSDP wrap,
        # compiled step); the loss-mask check; the collection and sync before the peak-memory reset
        "train_prepare_parts_s": parts,
        "train_save_s": save_s,
        "train_tokens": tokens,
        "train_tokens_per_s": tokens / wall_s,
        "optimizer_steps": int(trainer.state.global_step),
        "planned_optimizer_steps": planned_steps,
        "rows_per_epoch": n_rows,
        "packing": packing,
        "step": t.step,
        "train_attn_implementation": attention,
        "loss_history": losses,
        "train_memory": memory,  # this process's (rank 0's) peak when distributed
        "world_size": world,
        "distributed_mode": profile.distributed.mode,
    }
    trainer.model = None
    del trainer
    return result
