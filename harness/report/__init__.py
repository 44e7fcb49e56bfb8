"""Reporting: atomic writes, provenance, results.json, the model card, its tables and plots.

Import from the modules themselves (``from harness.report.atomic import ...``); importing the package
imports none of them, so it never pulls in torch."""

__all__ = ["atomic", "card", "card_render", "plots", "provenance", "results"]
