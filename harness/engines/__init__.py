"""Inference engines: greedy decoding (seed and compiled), the merged bf16 base, the int8 engine, and their comparison.

Import from the modules themselves (``from harness.engines.compare import ...``); importing the package
imports none of them, so it never pulls in torch."""

__all__ = ["compare", "decoding", "int8", "merged"]
