"""Measurement: scoring, metrics and CIs, timing, memory, parity between engines, gates, stored predictions.

Import from the modules themselves (``from harness.measure.evaluate import ...``); importing the package
imports none of them, so it never pulls in torch."""

__all__ = ["evaluate", "gates", "memory", "metrics", "parity", "predictions", "stats", "timing"]
