"""Inference engines: greedy decoding (seed and compiled), the merged bf16 base and its fused decoder, the int8 and
int4 engines, and their comparison.

Import from the modules themselves (``from harness.engines.compare import ...``); importing the package
imports none of them, so it never pulls in torch."""

__all__ = ["compare", "decoding", "fused", "int4", "int8", "merged"]
