"""qlora-bench: a QLoRA fine-tuning benchmark as a library (``Sweep``) with one pytest plugin (``harness.plugin``).

    from harness import Sweep
    sweep = Sweep.prepare("tiny")
    sweep.train("r16")
    result = sweep.evaluate("r16")
"""

__all__ = ["Sweep", "load_profile"]


def __getattr__(name):  # lazy: importing the plugin (pytest --help) must not import torch
    if name == "Sweep":
        from .sweep import Sweep

        return Sweep
    if name == "load_profile":
        from .config.profiles import load_profile

        return load_profile
    raise AttributeError(f"module 'harness' has no attribute {name!r}")
