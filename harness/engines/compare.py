"""The inference engines side by side: the seed path (NF4 + unmerged adapter, HF generate) against the fast paths,
on one variant (``inference.speed_variant``), one prompt, one machine and one session, so their ratios hold.

Each engine is built once per session. ``seed`` and ``nf4-compiled`` each get their own NF4 + adapter model, built
separately, so the parity of the two compares two models, never one object with itself; ``merged`` is the
sweep's own merged base with the speed variant merged in; ``merged-int8`` is an int8 weight-only copy of that
(harness/engines/int8.py), ``merged-int4`` a 4-bit copy of its fused projections (harness/engines/int4.py, CUDA
only), and ``quality`` scores what a quantized engine's speed costs against ``merged``, for every variant of the
sweep. ``parity`` holds a fast engine's greedy tokens and logits against the seed path on every evaluation prompt
(thresholds in ``inference.parity_*``): the fast engine's logits come through its own static cache and (compiled)
decode step, the seed path's from a plain forward, and the error is also taken relative to the adapter's own effect
(harness/measure/parity.py).

``merged``, when it is the profile's engine, is timed once in a session: the speed variant's latency test times the
same call, and its rounds are ``merged``'s here (``from_latency``) when it ran in this session.

A comparison recorded earlier on this machine under this session's key (``harness.measure.reuse``: code, libraries,
config, data, every adapter, machine) is reused whole, its ratios, parity and quality costs with it, once
``latency.reuse_confirm_rounds`` fresh rounds of ``merged`` confirm its ``merged`` p50 (``reused``); no other engine
is then built. Otherwise every engine is built and timed.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any, Callable

from ..measure import reuse
from ..measure.gates import per_device, speed_failures, unchecked_ceilings
from ..measure.timing import summarize_samples, time_rounds
from ..report.phases import note
from ..report.provenance import device_name
from ..train.trainer import peft_dir

__all__ = ["EngineComparison"]


def _parity_key(candidate: str) -> str:
    return "parity" if candidate == "merged" else f"parity_{candidate.replace('-', '_')}"


def _quality_key(quantized: str) -> str:
    return f"quality_{quantized.replace('-', '_')}"  # like parity_*: not an engine row of the speed table


def _allocated_gib() -> float:
    import torch

    return torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


class EngineComparison:
    def __init__(self, sweep):
        self.sweep, self.profile = sweep, sweep.profile
        self.variant = self.profile.inference.speed_variant
        if self.variant not in self.profile.variants or self.profile.variant(self.variant).is_baseline:
            raise ValueError(f"{self.profile.source_file}: inference.speed_variant {self.variant!r} is not a LoRA "
                             f"variant of this sweep ({', '.join(self.profile.variants)})")
        self._engines: dict[str, Any] = {}
        self._weights_gib: dict[str, float | None] = {}
        self._at_start = 0.0
        self.seed_p50: float | None = None
        self._earlier: dict[str, Any] | None = None
        self._decided = False  # whether ``reused`` has looked for an earlier comparison yet

    def engine(self, name: str):
        """Build ``name`` for the speed variant once; later calls return the same engine."""
        if name in self._engines:
            return self._engines[name]
        sweep = self.sweep
        path, _ = sweep.adapter(self.variant)
        if name == "merged":
            if self.profile.inference.engine == "merged":
                engine = sweep.load(self.variant).engine  # the sweep's base, with the speed variant merged in
                weights = sweep.state.merged.resident_gib
            else:
                from .merged import MergedBase

                base = MergedBase(self.profile, sweep.runs_dir / "_models", sweep.tokenizer)
                base.activate(self.variant, peft_dir(path))
                engine, weights = base.engine, base.resident_gib
        elif name == "merged-int8":
            from ..measure.memory import free_memory
            from .int8 import Int8Merged

            merged = self._active("merged")  # the bf16 base with the speed variant merged in: read, never changed
            free_memory()
            before = _allocated_gib()
            engine = Int8Merged(merged.model, sweep.tokenizer, self.profile.inference)
            weights = _allocated_gib() - before  # CUDA: the int8 model's resident bytes (CPU: 0, not reported)
        elif name == "merged-int4":
            engine = self._int4(self._active("merged"))
            weights = engine.weights_gib
        else:
            from ..models.nf4 import load_nf4_with_adapter
            from .decoding import HFGreedy
            from .nf4_layers import nf4_compiled

            before = _allocated_gib()
            model = load_nf4_with_adapter(self.profile, peft_dir(path), sweep.runs_dir / "_models")
            weights = _allocated_gib() - before
            engine = (HFGreedy(model, sweep.tokenizer) if name == "seed"
                      else nf4_compiled(model, sweep.tokenizer, self.profile.inference))
        self._engines[name], self._weights_gib[name] = engine, weights
        return engine

    def _int4(self, merged):
        """A ``merged-int4`` snapshot of the variant now merged into ``merged`` (a ``FusedGreedy``)."""
        from .int4 import Int4Merged
        from ..measure.memory import free_memory

        if getattr(merged, "decoder", None) is None:
            raise ValueError(f"merged-int4 quantizes the fused merged engine's projections; this base has none "
                             f"({merged.note})")
        free_memory()
        return Int4Merged(merged.model, merged.decoder.projections, self.sweep.tokenizer, self.profile.inference,
                          self.sweep.runs_dir / "_kernels")

    def _snapshot(self, name: str, variant: str):
        """``name`` (a quantized engine) built from ``variant`` merged into the sweep's base, and that merged
        engine: (quantized, merged)."""
        from .int8 import Int8Merged

        self.sweep.train(variant)
        merged = self.sweep.load(variant).engine
        if name == "merged-int4":
            return self._int4(merged), merged
        return Int8Merged(merged.model, self.sweep.tokenizer, self.profile.inference), merged

    def _active(self, name: str):
        """The engine, with the speed variant's weights in place (a variant test may have merged another since)."""
        engine = self.engine(name)
        if name == "merged" and self.profile.inference.engine == "merged":
            self.sweep.load(self.variant)
        return engine

    def call(self, name: str) -> Callable[[], list[list[int]]]:
        """One timed unit: 128 (``latency.max_new_tokens``) greedy tokens of the fixed prompt with ``name``."""
        import torch

        from .decoding import timed_round

        once = timed_round(self._active(name), self.sweep.latency_prompt(), self.profile.latency.max_new_tokens)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self._at_start = _allocated_gib()
        return once

    def from_latency(self, name: str) -> dict[str, Any] | None:
        """``merged``'s figures from the rounds the speed variant's latency test timed in this session: the same call
        (``call``: the sweep's merged engine, the fixed prompt, ``latency.max_new_tokens`` tokens), with more rounds.
        They are recorded as ``merged``'s with ``rounds_from`` naming the test, after one untimed call for the peak
        memory. None, and ``merged`` is timed here, when the profile's engine is another, the test has not run in
        this session, or its figure was reused from an earlier one (its rounds are not this session's)."""
        latency = self.sweep.recorder.get(self.variant, "latency")
        if (name != "merged" or self.profile.inference.engine != "merged" or not latency or latency.get("reused")
                or latency.get("engine") != "merged" or latency.get("prompt_id") != self.sweep.latency_example().id):
            return None
        self.call(name)()
        return self.record(name, latency["samples_s"], latency["load_before"], latency["load_after"],
                           rounds_from=f"{self.variant}'s latency rounds")

    def record(self, name: str, samples: list[float], load_before: dict, load_after: dict,
               rounds_from: str | None = None) -> dict[str, Any]:
        """Summarize ``name``'s rounds, with its ratio to the seed path measured earlier in this session, held to
        ``inference.speed_*`` for this device (``failures``; empty passes). ``rounds_from``: where the rounds were
        timed, when not in the speed suite's own test (``from_latency``)."""
        import torch

        engine = self._engines[name]
        figures = {**summarize_samples(samples, self.profile.latency.max_new_tokens, load_before, load_after),
                   "engine": name, "note": engine.note, "compiled": engine.compiled,
                   "first_call_s": dict(engine.compile_s), "compile_cache": self.sweep.state.compile_cache,
                   "variant": self.variant,
                   "prompt_id": self.sweep.latency_example().id}
        if rounds_from:
            figures["rounds_from"] = rounds_from
        if torch.cuda.is_available():
            weights = self._weights_gib[name] or 0.0
            figures["weights_gib"] = weights
            figures["peak_vram_gib"] = weights + torch.cuda.max_memory_allocated() / 2**30 - self._at_start
        if name == "seed":
            self.seed_p50 = figures["p50_s"]
        elif self.seed_p50 is not None:
            figures["speedup_vs_seed"] = self.seed_p50 / figures["p50_s"]
        return self._hold(name, figures)

    def record_reused(self, name: str) -> dict[str, Any]:
        """``name``'s figures from the comparison that ``reused`` confirmed, held to ``inference.speed_*`` again."""
        return self._hold(name, {k: v for k, v in self._earlier[name].items() if k != "failures"})

    def _hold(self, name: str, figures: dict[str, Any]) -> dict[str, Any]:
        """Hold ``name``'s figures to ``inference.speed_*`` for this device and record them."""
        device = device_name()
        figures["failures"] = speed_failures(self.profile, name, figures["p50_s"], figures.get("speedup_vs_seed"),
                                             device)
        self._record({name: figures}, name)
        if name == self.profile.inference.engine and name != "seed":  # the engine the speed gates hold
            inf = self.profile.inference
            checked = sum(per_device(v, device)[0] is not None for v in (inf.speed_max_p50_s, inf.speed_min_speedup))
            self.sweep.recorder.record(self.variant, "gates", {"speed": {
                "checked": checked, "failures": figures["failures"],
                "unchecked": unchecked_ceilings(self.profile, "speed", device)}}, engine=name)
        return figures

    def _record(self, data: dict[str, Any], engine: str) -> None:
        """Record into the speed variant's ``speed`` section; its first record adds the key a later session's reuse
        looks for."""
        if not self.sweep.recorder.get(self.variant, "speed"):
            data = {"reuse_key": self._reuse_key, **data}
        self.sweep.recorder.record(self.variant, "speed", data, engine=engine)

    def reused(self) -> dict[str, Any] | None:
        """The comparison recorded earlier on this machine under this session's key, once fresh rounds of ``merged``
        confirm it (then recorded as this session's, marked reused); None: every engine is built and timed. Decided
        once, before any engine is timed."""
        if not self._decided:
            self._decided = True
            self._earlier = self._confirmed_earlier()
        return self._earlier

    def _confirmed_earlier(self) -> dict[str, Any] | None:
        lat, inf = self.profile.latency, self.profile.inference
        if self.sweep.retime or not lat.reuse_confirm_rounds or "merged" not in inf.speed_engines:
            return None
        stored, why = reuse.earlier(self.sweep.runs_dir, self.profile.name, self.variant, "speed", self._reuse_key)
        missing = [k for k in self._complete_keys() if not (stored or {}).get(k)]
        if stored and missing:
            why = f"the earlier comparison lacks {', '.join(missing)}"
        if not stored or missing:
            note("reuse", f"engine comparison: timed afresh: {why}")
            return None
        from .decoding import timed_round

        call = timed_round(self._active("merged"), self.sweep.latency_prompt(), lat.max_new_tokens)
        for _ in range(lat.warmup_rounds):
            call()
        samples, before, after = time_rounds(call, lat.reuse_confirm_rounds)
        check = reuse.confirm(stored["merged"]["p50_s"], samples, lat.max_new_tokens, before, after,
                              lat.reuse_tolerance)
        note("reuse", "engine comparison: " + (f"reused, confirmed by {check['rounds']} fresh rounds of merged "
                                                f"({check['off']:+.1%})" if check["held"]
                                                else f"timed afresh: {check['why_not']}"))
        if not check["held"]:
            return None
        rest = {k: v for k, v in stored.items() if k not in inf.speed_engines and k not in ("provenance", "reused")}
        self.sweep.recorder.record(self.variant, "speed", {**rest, "reused": {
            **check, "session": self.sweep.recorder.session_id}}, provenance=stored["provenance"])
        return stored

    def _complete_keys(self) -> list[str]:
        """What a full comparison records: every engine's rounds, the parity of merged and nf4-compiled, and on real
        weights the quality cost of each quantized engine."""
        inf = self.profile.inference
        keys = list(inf.speed_engines)
        keys += [_parity_key(c) for c in ("merged", "nf4-compiled") if c in inf.speed_engines]
        if self.profile.weights == "real":
            keys += [_quality_key(q) for q in ("merged-int8", "merged-int4") if q in inf.speed_engines]
        return keys

    @cached_property
    def _reuse_key(self) -> dict[str, Any]:
        """What the comparison stands on: the speed variant's adapter, and every variant's where it records quality
        costs (``quality`` trains them, or finds them trained, all the same)."""
        names = ([v for v in self.profile.variants if not self.profile.variant(v).is_baseline]
                 if any(k.startswith("quality_") for k in self._complete_keys()) else [self.variant])
        adapters = {v: reuse.adapter_identity(self.sweep.train(v)[1]) for v in names}
        return reuse.reuse_key(reuse.key_parts(self.sweep, "speed", variant=self.variant, adapters=adapters))

    def parity(self, candidate: str) -> dict[str, Any]:
        """``candidate``'s greedy tokens and logits against the seed path's, on every evaluation prompt."""
        from ..measure.parity import parity

        key = _parity_key(candidate)
        if self.reused():
            return self._earlier[key]
        inf = self.profile.inference
        # the candidate decodes one prompt at a time: its timed 1-row graph serves, no other shape is compiled
        result = parity(self.engine("seed"), self._active(candidate), self.sweep.tokenizer, self.sweep.eval_prompts(),
                        inf.parity_new_tokens, self.profile.eval.batch_size, inf.parity_tie_logits,
                        candidate_batch_size=1)
        result["candidate"], result["merged_dtype"] = candidate, inf.merged_dtype
        result["max_relative_error"] = inf.parity_max_relative_error  # the limit applied; null: not gated
        self._record({key: result}, candidate)
        return result

    def quality(self, name: str) -> dict[str, Any]:
        """What quantized engine ``name`` costs: its EM/F1 against the ``merged`` engine, for every variant of the
        sweep on every evaluation split, paired per example: {variant: {split: summary}}. Each variant gets its own
        snapshot of ``name``, built from that variant merged into the sweep's base. Besides ``score_split``'s
        summary: ``em_merged``/``f1_merged``, ``em_delta_vs_merged`` (difference of means), ``f1_delta_vs_merged``
        with its paired-bootstrap ``f1_delta_vs_merged_ci`` and ``n_paired`` (``compare_to_baseline``, its
        ``*_vs_baseline`` keys renamed: the reference is ``merged`` here, not the baseline variant),
        ``identical_predictions`` (share of answers that are the same text) and ``token_agreement`` (mean share of
        merged's greedy tokens reproduced before the first difference, ``parity.token_agreement``). Recorded beside
        it, as ``<key>_gate``: ``inference.quantized_max_f1_loss`` and what it failed
        (``gates.quantized_quality_failures``)."""
        from ..measure.evaluate import compare_to_baseline, score_split
        from ..measure.gates import quantized_quality_failures
        from ..measure.memory import free_memory
        from ..measure.parity import token_agreement

        key = _quality_key(name)
        if self.reused():
            return self._earlier[key]
        if self.profile.inference.engine != "merged":
            raise ValueError(f"{self.profile.source_file}: quality of {name} is measured against the sweep's merged "
                             f"engine; inference.engine is {self.profile.inference.engine!r}")
        ev, tok, out = self.profile.eval, self.sweep.tokenizer, {}
        for variant in self.profile.variants:
            quantized, merged = self._snapshot(name, variant)
            out[variant] = {}
            for split in self.profile.data.eval_splits:
                examples = self.sweep.splits[split]
                mine = score_split(quantized, tok, examples, ev)
                ref = score_split(merged, tok, examples, ev)
                paired = {k.replace("_vs_baseline", "_vs_merged"): v
                          for k, v in compare_to_baseline(mine.rows, ref.rows, ev).items()}
                same = sum(a["prediction"] == b["prediction"] for a, b in zip(mine.rows, ref.rows, strict=True))
                out[variant][split] = {**mine.summary, "em_merged": ref.summary["em"], "f1_merged": ref.summary["f1"],
                                       "em_delta_vs_merged": mine.summary["em"] - ref.summary["em"], **paired,
                                       "identical_predictions": same / max(len(mine.rows), 1),
                                       "token_agreement": token_agreement(ref.tokens, mine.tokens) if examples
                                       else None, "engine": name, "variant": variant}
            quantized.model = quantized.decoder = None
            del quantized
            free_memory()
        self._active("merged")  # the speed variant's weights back in place for the engines that follow
        gate = {"max_f1_loss": self.profile.inference.quantized_max_f1_loss,
                "failures": quantized_quality_failures(self.profile, out)}
        self._record({key: out, f"{key}_gate": gate}, name)
        return out

    def close(self) -> None:
        for engine in self._engines.values():
            if engine is not None and getattr(engine, "name", "") != "merged":
                engine.model = None
        self._engines.clear()
        from ..measure.memory import free_memory

        free_memory()
