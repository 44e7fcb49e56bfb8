"""The profile: its schema, the YAML reader, loading and validation, errors, and the pre-run check of its files.

Import from the modules themselves (``from harness.config.errors import ...``); importing the package
imports none of them, so it never pulls in torch."""

__all__ = ["errors", "preflight", "profiles", "schema", "yamlload"]
