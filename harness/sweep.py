"""The sweep as a recipe: prepare a profile, make sure each adapter exists, evaluate a variant, time it, record the
figures. No pytest: a script or a notebook runs the code the benchmark suites run, and gets typed results back.

    from harness import Sweep
    sweep = Sweep.prepare("tiny")            # validates the profile and its data (one error lists every problem)
    result = sweep.evaluate("r16")           # trains r16 unless a matching adapter exists, then scores every split
    print(result.summary("validation"))      # EM/F1 with 95% CIs, ΔF1 vs the baseline, gate failures
    sweep.save()                             # runs/tiny/results.json, and the card

One model is resident at a time. With ``inference.engine: merged`` one dequantized base serves the whole sweep:
every selected adapter is trained first (so no training shares the GPU with it), then each variant is merged
into it in turn.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .artifacts import PROJECT_ROOT
from .config import Profile, Variant, load_profile
from .data import fingerprint
from .evaluate import SplitScores, compare_to_baseline, score_split
from .gates import quality_failures, quality_gate_count, vram_failures, vram_gate_count
from .inputs import check_profile_data
from .memory import free_memory, peak_memory, reset_peak_memory
from .oom import VariantOutOfMemory, call_with_oom_guard
from .predictions import eval_key, predictions_path, read_matching, write_predictions
from .prompt import encode_prompt
from .results import ResultsRecorder, card_results_path, results_path, save_results
from .timing import machine_load, summarize_samples
from .variants import ensure_adapter

__all__ = ["Sweep", "Loaded", "VariantEval"]

@dataclass
class Loaded:
    """A variant ready to generate: its model, the engine that decodes with it, and its adapter's manifest."""

    variant: Variant
    model: Any
    engine: Any
    manifest: dict[str, Any]


@dataclass
class VariantEval:
    """A variant's scores on every evaluation split, and the gates they were held to (empty lists pass)."""

    variant: str
    scores: dict[str, SplitScores]
    quality_failures: list[str]
    vram_failures: list[str]
    peak_memory: dict[str, float]
    baseline_note: str | None = None  # why ΔF1 vs baseline is missing, when it is

    def summary(self, split: str | None = None) -> dict[str, Any]:
        return self.scores[split or next(iter(self.scores))].summary


@dataclass
class Sweep:
    profile: Profile
    splits: dict[str, list]
    runs_dir: Path
    card: Path | None
    retrain: bool = False
    recorder: ResultsRecorder = None  # type: ignore[assignment]
    _tokenizer: Any = None
    _selected: list[str] | None = None
    _adapters: dict[str, tuple[Path, dict]] = field(default_factory=dict)
    _adapter_errors: dict[str, BaseException] = field(default_factory=dict)
    _retrained: set[str] = field(default_factory=set)
    _merged: Any = None
    _merged_error: BaseException | None = None
    _loaded: Loaded | None = None
    _evals: dict[str, VariantEval] = field(default_factory=dict)
    _recorded: set[str] = field(default_factory=set)

    # -- the recipe -------------------------------------------------------------------------------------------

    @classmethod
    def prepare(cls, profile: str | Path | Profile, runs_dir: str | Path | None = None,
                card: str | Path | None = None, retrain: bool = False, session_id: str | None = None) -> Sweep:
        """Validate the profile and its data; nothing is loaded or written yet. ``runs_dir`` and ``card`` default
        to the project's own ``runs/`` and ``MODEL_CARD.md``, wherever the profile file lives."""
        profile = profile if isinstance(profile, Profile) else load_profile(profile)
        splits = check_profile_data(profile)
        data_fp = fingerprint([e for s in splits.values() for e in s])
        return cls(profile, splits, Path(runs_dir) if runs_dir else PROJECT_ROOT / "runs",
                   Path(card) if card else PROJECT_ROOT / "MODEL_CARD.md", retrain,
                   ResultsRecorder(profile, data_fp, session_id))

    def select(self, names) -> None:
        """The variants this session will run (train them all before a merged base takes the GPU)."""
        self._selected = [v for v in self.profile.variants if v in set(names)]

    def evaluate(self, name: str, record: bool = True) -> VariantEval:
        """Score ``name`` on every evaluation split, pair it with the baseline and hold it to the gates."""
        if name in self._evals:
            if record and name not in self._recorded:  # evaluated earlier only to pair ΔF1; now asked for
                self._record_eval(self._evals[name], self.load(name))
                self._recorded.add(name)
            return self._evals[name]
        baseline, note = (None, None) if name == "baseline" else self._baseline_rows()
        loaded = self.load(name)
        reset_peak_memory()
        scores = {}
        for split in self.profile.data.eval_splits:
            s = self._guard(name, "inference", score_split, loaded.engine, self.tokenizer, self.splits[split],
                            self.profile.eval)
            if baseline is not None and split in baseline:
                s.summary.update(compare_to_baseline(s.rows, baseline[split], self.profile.eval))
            elif note:
                s.summary["f1_delta_vs_baseline_note"] = note
            scores[split] = s
        memory = peak_memory()
        result = VariantEval(name, scores, quality_failures(self.profile, name, {k: v.summary for k, v in
                                                                                  scores.items()}),
                             vram_failures(self.profile, name, "inference", memory.get("peak_allocated_gib")),
                             memory, note)
        write_predictions(predictions_path(self.runs_dir, self.profile, name),
                          [r for s in scores.values() for r in s.rows], self.eval_key())
        if record:
            self._record_eval(result, loaded)
            self._recorded.add(name)
        self._evals[name] = result
        return result

    def parity(self, name: str) -> tuple[dict[str, Any], list[str]]:
        """The profile's engine for ``name`` against the seed path, built separately (a fresh NF4 base with the
        variant's adapter unmerged, HF generate): greedy tokens and teacher-forced logits on every evaluation
        prompt, held to ``inference.parity_*``. Returns (figures, gate failures) and records both."""
        from .decoding import HFGreedy
        from .merged import load_nf4_with_adapter
        from .parity import parity, parity_check_count, parity_failures

        loaded, inf = self.load(name), self.profile.inference
        adapter_dir = None if loaded.variant.is_baseline else self.adapter(name)[0] / "adapter"
        reference = self._guard(name, "inference", load_nf4_with_adapter, self.profile, adapter_dir,
                                self.runs_dir / "_models")
        try:
            result = self._guard(name, "inference", parity, HFGreedy(reference, self.tokenizer),
                                 self.load(name).engine, self.tokenizer, self.eval_prompts(), inf.parity_new_tokens,
                                 self.profile.eval.batch_size)
        finally:
            del reference
            free_memory()
        failures = parity_failures(result, inf, label=f"{name}: {loaded.engine.name} vs seed path")
        engine = loaded.engine.name
        self._record_variant(name)
        self.recorder.record(name, "parity", {**result, "engine": engine, "failures": failures}, engine=engine)
        self.recorder.record(name, "gates", {"parity": {"checked": parity_check_count(result), "failures": failures}}, engine=engine)
        return result, failures

    def decode_call(self, name: str) -> Callable[[], list[list[int]]]:
        """One timed unit of the latency benchmark: greedy-decode the fixed prompt to exactly
        ``latency.max_new_tokens`` tokens with ``name`` loaded. A recompilation inside it is an error."""
        from .decoding import timed_round

        return timed_round(self.load(name).engine, self.latency_prompt(), self.profile.latency.max_new_tokens)

    def record_latency(self, name: str, samples: list[float], load_before: dict, load_after: dict,
                       timer: str = "pytest-benchmark") -> dict[str, Any]:
        """Summarize timed rounds of ``decode_call(name)`` (p50/p95, spread, machine load) and record them."""
        engine = self.load(name).engine
        figures = {**summarize_samples(samples, self.profile.latency.max_new_tokens, load_before, load_after),
                   "warmup_rounds": self.profile.latency.warmup_rounds, "prompt_id": self.latency_example().id,
                   "engine": engine.name, "engine_note": engine.note, "compiled": engine.compiled,
                   "first_call_s": dict(engine.compile_s), "timer": timer}
        self._record_variant(name)
        self.recorder.record(name, "latency", figures, engine=engine.name)
        return figures

    def measure_latency(self, name: str, rounds: int | None = None) -> dict[str, Any]:
        """``decode_call`` timed with a plain clock (the benchmark suite times the same call with pytest-benchmark)."""
        import time

        call = self.decode_call(name)
        for _ in range(self.profile.latency.warmup_rounds):
            call()
        before, samples = machine_load(), []
        for _ in range(rounds or self.profile.latency.rounds):
            start = time.perf_counter()
            call()
            samples.append(time.perf_counter() - start)
        worker = os.environ.get("PYTEST_XDIST_WORKER")
        timer = "harness perf_counter" + (f" (xdist {worker}, GPU {os.environ.get('CUDA_VISIBLE_DEVICES')})"
                                          if worker else "")
        return self.record_latency(name, samples, before, machine_load(), timer=timer)

    def engine_bench(self):
        """The engines compared side by side on ``inference.speed_variant`` (harness.engine_bench)."""
        from .engine_bench import EngineBench

        return EngineBench(self)

    def save(self, card: bool = True) -> dict[str, Any]:
        """Merge this session's figures into ``runs/<profile>/results.json`` and, with ``card``, into the card."""
        figures = self.recorder.figures
        results = save_results(results_path(self.runs_dir, self.profile.name), self.profile, figures,
                               self.recorder.data_fingerprint)
        if card and self.card is not None and figures:
            self.write_card(figures)
        return results

    def write_card(self, figures: dict[str, dict[str, Any]]) -> None:
        from .card import write_card

        write_card(self.card, card_results_path(self.card, self.profile.name), self.profile, figures,
                   self.recorder.data_fingerprint)

    # -- resources --------------------------------------------------------------------------------------------

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from .models import load_tokenizer

            self._tokenizer = load_tokenizer(self.profile.model, self.runs_dir / "_models")
        return self._tokenizer

    def adapter(self, name: str) -> tuple[Path, dict[str, Any]]:
        """The one place that decides to train: reuse a complete artifact under the variant's key, unless
        ``retrain`` asks for a fresh one and this session has not trained it yet. A failure is remembered, so a
        variant that failed to train is not trained again in the same session."""
        if name in self._adapter_errors:
            raise self._adapter_errors[name]
        if name not in self._adapters:
            retrain = self.retrain and name not in self._retrained
            self._retrained.add(name)
            try:
                path, manifest = self._guard(name, "train", ensure_adapter, self.profile, self.profile.variant(name),
                                             self.splits, self.tokenizer, self.runs_dir, retrain)
            except Exception as e:  # noqa: BLE001 - kept and raised again for this variant alone
                self._adapter_errors[name] = e
                raise
            self._adapters[name] = (path, {**manifest, "artifact_dir": str(path)})
        return self._adapters[name]

    def load(self, name: str) -> Loaded:
        """``name`` ready to generate, with the profile's engine; the previously loaded variant is released."""
        if self._loaded is not None and self._loaded.variant.name == name:
            return self._loaded
        self.release()
        variant = self.profile.variant(name)
        merged = self._merged_base() if self.profile.inference.engine == "merged" else None
        path, manifest = (None, {}) if variant.is_baseline else self.adapter(name)
        adapter_dir = None if path is None else path / "adapter"
        if merged is not None:
            model = self._guard(name, "inference", merged.activate, name, adapter_dir)
            engine = merged.engine
        else:
            from .decoding import HFGreedy, StaticGreedy
            from .merged import load_nf4_with_adapter

            model = self._guard(name, "inference", load_nf4_with_adapter, self.profile, adapter_dir,
                                self.runs_dir / "_models")
            engine = (HFGreedy(model, self.tokenizer) if self.profile.inference.engine == "seed"
                      else StaticGreedy(model, self.tokenizer, self.profile.inference.engine, self.profile.inference))
        self._loaded = Loaded(variant, model, engine, manifest)
        return self._loaded

    def release(self) -> None:
        """Drop the loaded variant (the merged base, shared by the sweep, stays until ``close``)."""
        if self._loaded is not None:
            self._loaded.model = self._loaded.engine = None
            self._loaded = None
            free_memory()

    def close(self) -> None:
        self.release()
        if self._merged is not None:
            self._merged.model = self._merged.engine = None
            self._merged = None
        free_memory()

    def latency_example(self):
        by_id = {e.id: e for split in self.splits.values() for e in split}
        return by_id.get(self.profile.latency.prompt_id) or self.splits["validation"][0]

    def latency_prompt(self) -> list[int]:
        ex = self.latency_example()
        return encode_prompt(self.tokenizer, ex.instruction, ex.input)

    def eval_prompts(self) -> list[list[int]]:
        return [encode_prompt(self.tokenizer, e.instruction, e.input)
                for split in self.profile.data.eval_splits for e in self.splits[split]]

    # -- helpers ----------------------------------------------------------------------------------------------

    def _guard(self, name: str, phase: str, fn, *args):
        return call_with_oom_guard(self.profile, name, phase, fn, *args)

    def _merged_base(self):
        if self._merged_error is not None:
            raise self._merged_error
        if self._merged is None:
            from .merged import MergedBase

            for name in self._selected if self._selected is not None else self.profile.variants:
                if not self.profile.variant(name).is_baseline:
                    try:
                        self.adapter(name)
                    except Exception:  # noqa: BLE001 - the variant meets its own error when it loads
                        pass

            def build():
                base = MergedBase(self.profile, self.runs_dir / "_models", self.tokenizer)
                base.warmup(self.eval_prompts(), self.latency_prompt(), self.profile.eval,
                            self.profile.latency.max_new_tokens)
                return base

            # the bf16 base serves every variant: an OOM here ends all of them, with one message
            try:
                self._merged = self._guard("merged base (all variants)", "inference", build)
            except VariantOutOfMemory as e:
                self._merged_error = e
                raise

        return self._merged

    def _record_variant(self, name: str) -> None:
        """What a recorded figure of ``name`` stands on: its label and engine, and its adapter's training figures
        (stamped by the run that trained it). Only a variant this session measures gets a row."""
        loaded = self.load(name)
        self.recorder.record(name, "info", {"label": loaded.variant.label, "description": loaded.variant.description,
                                            "engine": loaded.engine.name, "engine_note": loaded.engine.note},
                             engine=loaded.engine.name)
        if loaded.manifest and not self.recorder.get(name, "training"):
            self._record_training(name, loaded.manifest)

    def _record_training(self, name: str, m: dict[str, Any]) -> None:
        stamp = {"git_sha": m.get("git_sha"), "profile": self.profile.name, "config_hash": m.get("config_hash"),
                 "data_fingerprint": self.recorder.data_fingerprint, "engine": None, "device": m.get("device"),
                 "time": m.get("train_finished"), "session": self.recorder.session_id,
                 "versions": m.get("versions"), "adapter": m.get("key_hash", "")[:12]}
        keys = ("trainable_params", "train_wall_s", "train_tokens_per_s", "optimizer_steps",
                "planned_optimizer_steps", "key_hash", "world_size")
        self.recorder.record(name, "training", {k: m[k] for k in keys if k in m}, provenance=stamp)
        mem = m.get("train_memory", {})
        train = {k2: mem[k] for k, k2 in (("peak_allocated_gib", "train_peak_allocated_gib"),
                                          ("peak_reserved_gib", "train_peak_reserved_gib"),
                                          ("peak_rss_gib", "train_peak_rss_gib")) if k in mem}
        failures = vram_failures(self.profile, name, "train", mem.get("peak_allocated_gib"))
        self.recorder.record(name, "training", {**train, "vram_failures": failures}, provenance=stamp)

    def _record_eval(self, result: VariantEval, loaded: Loaded) -> None:
        name, engine = result.variant, loaded.engine.name
        self._record_variant(name)
        self.recorder.record(name, "quality", {k: v.summary for k, v in result.scores.items()}, engine=engine)
        mem = {"peak_rss_gib": result.peak_memory["peak_rss_gib"]}
        if "peak_allocated_gib" in result.peak_memory:
            mem.update(inference_peak_allocated_gib=result.peak_memory["peak_allocated_gib"],
                       inference_peak_reserved_gib=result.peak_memory["peak_reserved_gib"])
        self.recorder.record(name, "memory", mem, engine=engine)
        train_failures = self.recorder.get(name, "training").get("vram_failures", [])
        peaks = {"inference": result.peak_memory.get("peak_allocated_gib"),
                 "train": self.recorder.get(name, "training").get("train_peak_allocated_gib")}
        gates = {"quality": {"checked": quality_gate_count(self.profile, name), "failures": result.quality_failures},
                 "vram": {"checked": vram_gate_count(self.profile, name, peaks),
                          "failures": result.vram_failures + train_failures}}
        self.recorder.record(name, "gates", gates, engine=engine)

    def eval_key(self) -> str:
        """What stored predictions must match to be paired: config, all data, and the code that decodes."""
        return eval_key(self.profile, self.recorder.data_fingerprint)

    def _baseline_rows(self) -> tuple[dict[str, list[dict]] | None, str | None]:
        """The baseline's per-example rows to pair ΔF1 with: this session's, a stored file made under the same
        eval key, or (when the profile sweeps a baseline) a fresh evaluation. Never another config's."""
        if "baseline" in self._evals:
            return {k: v.rows for k, v in self._evals["baseline"].scores.items()}, None
        rows = read_matching(predictions_path(self.runs_dir, self.profile, "baseline"), self.eval_key())
        if rows is not None:
            return {s: [r for r in rows if r["split"] == s] for s in self.profile.data.eval_splits}, None
        if "baseline" not in self.profile.variants:
            return None, "ΔF1 n/a: the profile sweeps no baseline, and no baseline predictions match this config"
        try:
            result = self.evaluate("baseline", record=False)  # paired in memory; its card row is not touched
        except VariantOutOfMemory as e:
            return None, f"ΔF1 n/a: the baseline could not be evaluated ({e})"
        return {k: v.rows for k, v in result.scores.items()}, None

