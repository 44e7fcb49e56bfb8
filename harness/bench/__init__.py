"""Profiling scripts: ``python -m harness.bench.decode`` (one decode step) and ``python -m harness.bench.train``.

Import from the modules themselves (``from harness.bench.decode import ...``); importing the package
imports none of them, so it never pulls in torch."""

__all__ = ["decode", "train"]
