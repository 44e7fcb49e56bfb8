"""Timed figures reused on the machine that measured them, under a key of everything that changes them.

Fifty latency rounds of a 7B variant take ~30 s on an H200 and tell nothing new when the code, the libraries, the
profile's config, the data, the variant's adapter and the machine are those of a figure timed earlier. A later
session on the same machine (same host, same boot, same GPU) reuses such a figure, once a few fresh rounds confirm
it: their median within ``latency.reuse_tolerance`` of the reused p50, on a quiet machine, the rounds agreeing among
themselves. Otherwise it times every round again. A figure timed on a busy machine is never reused; one whose
rounds spread while other processes left the machine alone (``unsteady``) is, with its mark (‡ beside ↺): timing it
again on that host measures the same spread (issue 18's try 25), and its ratios stay one run's.

The key (``key_parts``) is the compile cache's (the config, every harness module, the libraries with Triton and
CUDA, the device), the data's fingerprint, this machine's identity (``machine_identity``) and what the figure
stands on (the variant's adapter, the rounds). Each part is stored hashed beside the figure, so a refusal names the
part that changed. A reused figure keeps the provenance of the run that timed it; its ``reused`` entry says which
session reused it and what the fresh rounds read (``confirm``), and the card marks it ↺. ``--retime`` (the plugin) or
``latency.reuse_confirm_rounds: 0`` turns reuse off.

The engine comparison is reused whole or not at all, so its ratios stay those of one run.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any

from ..config.profiles import config_hash
from ..report.provenance import device_name, git_sha
from ..report.results import load_results, results_path
from .timing import summarize_samples

__all__ = ["machine_identity", "key_parts", "reuse_key", "adapter_identity", "earlier", "confirm"]

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")  # Linux: a new one each boot


def machine_identity() -> dict[str, Any]:
    """This machine as it is now: host, boot and device (the GPU's UUID where there is one). Another host, a reboot
    (a new driver, kernel or clocks) or another GPU is another machine."""
    import torch

    try:
        boot = BOOT_ID.read_text(encoding="ascii").strip()
    except OSError:
        boot = "unknown"
    gpu = str(getattr(torch.cuda.get_device_properties(0), "uuid", "")) if torch.cuda.is_available() else ""
    return {"host": platform.node(), "boot": boot, "device": device_name(), "gpu_uuid": gpu or None}


def adapter_identity(manifest: dict[str, Any] | None) -> list[str] | None:
    """An adapter as a timed figure stands on it: its key and when it was trained (a retrain under the same key
    makes other weights). None for the baseline."""
    return None if not manifest else [manifest.get("key_hash", ""), manifest.get("train_finished", "")]


def key_parts(sweep, what: str, **stands_on: Any) -> dict[str, Any]:
    """Everything that changes a timed figure of ``what`` (``latency``, ``speed``) in this session (module doc)."""
    from ..engines.compile_cache import key_parts as compiled

    return {"what": what, "compiled": compiled(sweep.profile), "data": sweep.recorder.data_fingerprint,
            "machine": machine_identity(), **stands_on}


def reuse_key(parts: dict[str, Any]) -> dict[str, Any]:
    """The key stored beside a timed figure: its hash, and each part's, to name what changed."""
    return {"key": config_hash(parts), "parts": {k: config_hash(v)[:12] for k, v in sorted(parts.items())}}


def earlier(runs_dir: Path, profile_name: str, variant: str, section: str,
            key: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """The ``section`` of ``variant`` that an earlier session recorded in ``runs/<profile>/results.json`` under
    ``key``, and ""; or None and why it may not be reused. A section with a figure timed on a busy machine (itself,
    or one of its engines) is refused."""
    try:
        stored = load_results(results_path(runs_dir, profile_name))["variants"].get(variant, {}).get(section)
    except ValueError as e:  # a corrupt results file: time afresh, and say why
        return None, str(e)
    if not stored:
        return None, "no earlier figure on this machine"
    mine = stored.get("reuse_key") or {}
    if not mine:
        return None, "the earlier figure carries no key (timed by code from before reuse)"
    if mine.get("key") != key["key"]:
        changed = sorted(k for k in set(key["parts"]) | set(mine.get("parts", {}))
                         if key["parts"].get(k) != mine.get("parts", {}).get(k))
        return None, f"the earlier figure's key differs in: {', '.join(changed)}"
    busy = [name for name, f in [(section, stored), *stored.items()] if isinstance(f, dict) and f.get("busy")]
    if busy:
        return None, f"the earlier figure was timed on a busy machine ({', '.join(map(str, busy))})"
    return stored, ""


def confirm(reused_p50_s: float, samples: list[float], new_tokens: int, load_before: dict, load_after: dict,
            tolerance: float) -> dict[str, Any]:
    """Do ``samples``, fresh rounds of the reused figure's timed unit, confirm its p50? ``held`` when their median is
    within ``tolerance`` of it (relative), the machine was quiet while they ran and they agree among themselves."""
    fresh = summarize_samples(samples, new_tokens, load_before, load_after)
    off = fresh["p50_s"] / reused_p50_s - 1.0
    doubts = [fresh[k] for k in ("busy_reason", "unsteady_reason") if fresh[k]]
    held = abs(off) <= tolerance and not doubts
    why = ("" if held else f"fresh p50 {fresh['p50_s']:.4f}s is {off:+.1%} from the reused {reused_p50_s:.4f}s "
           f"(tolerance {tolerance:.0%})" + "".join(f"; {d}" for d in doubts))
    return {"rounds": len(samples), "p50_s": fresh["p50_s"], "samples_s": list(samples), "off": off,
            "tolerance": tolerance, "busy": fresh["busy"], "unsteady": fresh["unsteady"], "held": held,
            "why_not": why or None, "git_sha": git_sha(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
