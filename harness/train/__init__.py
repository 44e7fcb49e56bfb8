"""Training: one variant"s QLoRA run, its multi-process launcher, the adapter cache, and out-of-memory handling.

Import from the modules themselves (``from harness.train.adapters import ...``); importing the package
imports none of them, so it never pulls in torch."""

__all__ = ["adapters", "distributed", "oom", "trainer"]
