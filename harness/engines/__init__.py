"""Inference engines: greedy decoding (seed and compiled), the merged bf16 base and its fused decoder, the int8 and
int4 engines, their comparison, and the compiled artifacts kept between sessions.

Import from the modules themselves (``from harness.engines.compare import ...``); importing the package
imports none of them, so it never pulls in torch."""

__all__ = ["awq_kernels", "builds", "compare", "compile_cache", "decoding", "fused", "gemv", "int4", "int8",
           "kernel_build", "merged", "nf4_layers"]
