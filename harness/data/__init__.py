"""The dataset and the prompt format: JSONL splits, Mistral-format tokenization, the completion-only loss check.

Import from the modules themselves (``from harness.data.dataset import ...``); importing the package
imports none of them, so it never pulls in torch."""

__all__ = ["dataset", "loss_mask", "prompt"]
