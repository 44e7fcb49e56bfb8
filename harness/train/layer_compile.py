"""The compiled training step (``training.step: compiled``): regional compilation of the decoder layers, activation
checkpointing inside the compiled graph, and flex attention on CUDA. ``use_compiled_step`` is what the trainer and
``python -m harness.bench.train``'s ``compiled`` setup both call.

One ``torch.compile`` graph serves every decoder layer (the layers share a shape). Checkpointing can sit in three
places around it, or be off (``none``); ``CHECKPOINTING`` lists them:

  outside       transformers' own checkpointing calls the compiled layer; the backward re-runs the compiled forward,
                then the compiled backward: two graph calls and the autograd plumbing between them per layer
  inside        the checkpoint is inside the compiled region: one forward graph that keeps only the layer's inputs,
                one backward graph that recomputes what it needs, fused with the gradient kernels
  save-matmuls  selective checkpointing inside the compiled region: the outputs of the matmuls and of attention are
                kept, the elementwise work (norms, rotary, SiLU, casts, dropout masks) is recomputed; memory for speed

``cudagraphs`` compiles with ``mode="reduce-overhead"``: each layer's graphs are replayed as CUDA graphs, so the
host launches one graph per layer call instead of its kernels one by one. The caller then marks each optimizer
step's start with ``torch.compiler.cudagraph_mark_step_begin()``.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["CHECKPOINTING", "VARLEN_KWARGS", "compile_decoder_layers", "save_matmuls_policy", "use_compiled_step"]

CHECKPOINTING = ("outside", "inside", "save-matmuls", "none")


@functools.cache  # asked once per traced op while compiling: build the set once
def _saved_ops() -> frozenset:
    aten = torch.ops.aten
    names = ("mm", "addmm", "bmm", "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")
    return frozenset(getattr(aten, n).default for n in names if hasattr(aten, n))


def save_matmuls_policy(ctx, op, *args, **kwargs):
    """Keep what is expensive to recompute (matmuls, attention); recompute the rest in the backward."""
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op in _saved_ops() else CheckpointPolicy.PREFER_RECOMPUTE


# trl's padding-free batches carry example boundaries for varlen flash-attention kernels. sdpa and flex read the
# boundaries from the position ids instead, and these change size with each row's count of examples: inside the graph
# they would make every row a new shape.
VARLEN_KWARGS = frozenset({"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx"})


def _compiled_forward(forward, checkpoint_kwargs, *args, **kwargs):
    kwargs = {k: v for k, v in kwargs.items() if k not in VARLEN_KWARGS}
    if checkpoint_kwargs is None:
        return forward(*args, **kwargs)
    from torch.utils.checkpoint import checkpoint

    return checkpoint(forward, *args, use_reentrant=False, **checkpoint_kwargs, **kwargs)


def compile_decoder_layers(layers, checkpointing: str, cudagraphs: bool = False) -> None:
    """Compile each layer of ``layers`` in place, with activation checkpointing placed as ``checkpointing`` says."""
    if checkpointing not in CHECKPOINTING:
        raise ValueError(f"checkpointing {checkpointing!r}: expected one of {CHECKPOINTING}")
    # dynamo accepts no context_fn but a selective-checkpointing one
    checkpoint_kwargs = {} if checkpointing in ("inside", "save-matmuls") else None
    if checkpointing == "save-matmuls":
        from torch.utils.checkpoint import create_selective_checkpoint_contexts

        checkpoint_kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, save_matmuls_policy)
    for layer in layers:
        if checkpointing != "outside":
            layer.gradient_checkpointing = False  # transformers' wrapper, which would sit outside the graph
        layer.forward = functools.partial(_compiled_forward, layer.forward, checkpoint_kwargs)
        # static shapes: torch 2.11's partitioner fails on a checkpoint inside a dynamic-shape graph ("Node ... was
        # invalid, but is output"); the trainer pads every batch to one shape instead (trainer.py)
        layer.compile(mode="reduce-overhead" if cudagraphs else None, dynamic=False)


def use_compiled_step(model, gradient_checkpointing: bool) -> str:
    """Make ``model`` (a transformers decoder, peft's base model) train through the compiled step; return the
    attention implementation it now trains with.

    Each decoder layer is compiled with its checkpoint inside the graph (``inside``), or none when
    ``gradient_checkpointing`` is off; the caller leaves transformers' own checkpointing off, or it would wrap the
    graph a second time. On CUDA attention goes through flex_attention: transformers turns a packed row's restarting
    position ids into a block mask, so the blocks between examples are skipped, where sdpa computes the whole causal
    square under a dense mask (attention's share of an H200 step fell from 34 to 6 ms at 2048 tokens). flex_attention
    has no CPU backward, so on a CPU the model's own attention stays.
    """
    if model.device.type == "cuda":
        model.set_attn_implementation("flex_attention")
    if gradient_checkpointing:  # as transformers does when it checkpoints: the first layer's input requires grad
        model.enable_input_require_grads()
    compile_decoder_layers(model.model.layers, "inside" if gradient_checkpointing else "none")
    return model.config._attn_implementation
