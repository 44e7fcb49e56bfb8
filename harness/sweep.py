"""The sweep as a recipe: prepare a profile, make sure each adapter exists, evaluate a variant, time it, record the
figures. No pytest: a script or a notebook runs the code the benchmark suites run, and gets typed results back.

    from harness import Sweep
    sweep = Sweep.prepare("tiny")            # validates the profile and its data (one error lists every problem)
    sweep.train("r16")                       # trains r16 unless a matching adapter exists in runs/
    result = sweep.evaluate("r16")           # loads r16 with the profile's engine and scores every split
    print(result.summary("validation"))      # EM/F1 with 95% CIs, ΔF1 vs the baseline, gate failures
    sweep.save()                             # runs/tiny/results.json, and the card

The phases are explicit: ``train`` and ``train_selected`` are the only methods that train; ``load``, ``evaluate``,
``parity`` and the latency calls use adapters already trained, and say so when one is missing. One model is resident
at a time. With ``inference.engine: merged`` one dequantized base serves the whole sweep, so ``train_selected`` trains
every selected adapter before the first ``load`` (no training then shares the GPU with it), and each variant is merged
into the base in turn. Compiled artifacts are kept between sessions (``restore_compiled``, ``save``); timed figures
are reused (``harness.measure.reuse``). The session's lazy state is a ``SweepState``; what it records beside the
scores is ``harness.report.recording``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .config.preflight import prepare_profile
from .config.profiles import load_profile
from .config.schema import Profile
from .data.prompt import encode_prompt
from .engines.builds import start_engine_builds
from .measure.evaluate import SplitScores, compare_to_baseline, score_split
from .measure import latency
from .measure.gates import quality_failures, vram_failures
from .measure.memory import free_memory, peak_memory, reset_peak_memory
from .measure.predictions import eval_key, eval_key_parts, predictions_path, read_matching, write_predictions
from .measure.quality_compare import regressions_against
from .report.phases import log_to, note, timed
from .report.provenance import PROJECT_ROOT, device_name
from .report.recording import record_eval, record_variant
from .report.results import ResultsRecorder, card_results_path, results_path, save_progress, save_results
from .sweep_state import Loaded, SweepState
from .train.adapters import ensure_adapter
from .train.oom import VariantOutOfMemory, call_with_oom_guard
from .train.trainer import peft_dir

__all__ = ["Sweep", "VariantEval"]


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
    retime: bool = False  # time every round: reuse no latency or engine figure timed earlier (harness.measure.reuse)
    recorder: ResultsRecorder = None  # type: ignore[assignment]
    state: SweepState = field(default_factory=SweepState)
    saved_runs_dir: Path | None = None  # --quality-compare: a saved run's runs dir to hold quality against

    # -- the recipe -------------------------------------------------------------------------------------------

    @classmethod
    def prepare(cls, profile: str | Path | Profile, runs_dir: str | Path | None = None, card: str | Path | None = None,
                retrain: bool = False, session_id: str | None = None, retime: bool = False) -> Sweep:
        """Validate the profile and its data, and pin a hub model's revision (harness.revision); nothing is loaded or
        written yet. ``runs_dir`` and ``card`` default to the project's ``runs/`` and ``MODEL_CARD.md``."""
        profile, splits, data_fp = prepare_profile(profile if isinstance(profile, Profile) else load_profile(profile))
        return cls(profile, splits, Path(runs_dir) if runs_dir else PROJECT_ROOT / "runs",
                   Path(card) if card else PROJECT_ROOT / "MODEL_CARD.md", retrain, retime,
                   ResultsRecorder(profile, data_fp, session_id))

    def own_phase_log(self) -> None:
        """Send the phase lines to ``runs/<profile>/phases.log``: at the first load, and again at the end (see save)."""
        log_to(results_path(self.runs_dir, self.profile.name).with_name("phases.log"))

    def select(self, names) -> None:
        """The variants this session will run: ``train_selected`` trains these (default: all of the profile's). With
        any selected, the engines' kernels start building now, beside what comes before the first test."""
        self.state.selected = [v for v in self.profile.variants if v in set(names)]
        if self.state.selected:
            start_engine_builds(self.profile.inference.speed_engines, self.runs_dir / "_kernels")

    def restore_compiled(self) -> dict[str, Any]:
        """Load the compiled artifacts of this session's key from ``runs/_compile/`` once, before anything compiles
        (``harness.engines.compile_cache``; ``train``, ``load`` call it); returns their label. Starts the phase log."""
        s = self.state
        if s.compile_cache is None:
            from .engines.compile_cache import restore

            self.own_phase_log()
            with timed("compile-cache", "load"):
                s.compile_cache = restore(self.runs_dir, self.profile)
            note("compile-cache", f"{'loaded' if s.compile_cache['loaded'] else 'none'} (key {s.compile_cache['key']})")
        return s.compile_cache

    def train(self, name: str) -> tuple[Path, dict[str, Any]] | None:
        """The one place that decides to train: reuse a complete artifact under the variant's key, unless
        ``retrain`` asks for a fresh one and this session has not trained it yet. Returns (artifact dir, manifest),
        None for the baseline. A failure is remembered, so a variant that failed to train is not trained again in
        the same session, and raised again whenever the variant is used."""
        s = self.state
        if self.profile.variant(name).is_baseline:
            return None
        self.restore_compiled()
        if name in s.adapter_errors:
            raise s.adapter_errors[name]
        if name not in s.adapters:
            retrain = self.retrain and name not in s.retrained
            s.retrained.add(name)
            try:
                path, manifest = self._guard(name, "train", ensure_adapter, self.profile, self.profile.variant(name),
                                             self.splits, self.tokenizer, self.runs_dir, retrain)
            except Exception as e:  # noqa: BLE001 - kept and raised again for this variant alone
                s.adapter_errors[name] = e
                raise
            s.adapters[name] = (path, {**manifest, "artifact_dir": str(path)})
        return s.adapters[name]

    def train_selected(self) -> None:
        """The training phase: every selected variant (all of the profile's when none were selected) before any
        model is loaded, so a merged base never shares the GPU with training; on CUDA the engines' kernels build beside
        it. A variant that fails keeps its error, raised when that variant is trained, loaded or evaluated."""
        start_engine_builds(self.profile.inference.speed_engines, self.runs_dir / "_kernels")  # if select did not
        for name in self.state.selected if self.state.selected is not None else self.profile.variants:
            try:
                self.train(name)
            except Exception:  # noqa: BLE001 - the variant meets its own error when it is used
                pass

    def wait_for_kernels(self) -> None:
        """Let the kernel builds ``select`` or ``train_selected`` started end before a timed round (``decode_call``,
        the comparison): they compile on every core; a cold run once timed a latency on 13 of 16 busy cores."""
        from .engines.kernel_build import background_build_running, wait_for_background_build

        if background_build_running():
            with timed("kernels", "waited for the kernels' background build"):
                wait_for_background_build()

    def evaluate(self, name: str, record: bool = True) -> VariantEval:
        """Score ``name`` on every evaluation split, pair it with the baseline and hold it to the gates."""
        done = self.state.evals
        if name in done:
            if record and name not in self.state.recorded:  # evaluated earlier only to pair ΔF1; now asked for
                record_eval(self.recorder, done[name], self.load(name), self.saved_runs_dir is not None)
                self.state.recorded.add(name)
            return done[name]
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
        regressions = [] if self.saved_runs_dir is None else regressions_against(  # --quality-compare
            self.saved_runs_dir, self.profile, name, scores, self.recorder.data_fingerprint)
        result = VariantEval(name, scores, quality_failures(self.profile, name, {k: v.summary for k, v in
                                                                                  scores.items()}) + regressions,
                             vram_failures(self.profile, name, "inference", memory.get("peak_allocated_gib"),
                                           device_name()), memory, note)
        write_predictions(predictions_path(self.runs_dir, self.profile, name),
                          [r for s in scores.values() for r in s.rows], self.eval_key(),
                          eval_key_parts(self.profile, self.recorder.data_fingerprint))
        if record:
            record_eval(self.recorder, result, loaded, self.saved_runs_dir is not None)
            self.state.recorded.add(name)
        done[name] = result
        return result

    def parity(self, name: str) -> tuple[dict[str, Any], list[str]]:
        """The profile's engine for ``name`` against the seed path, built separately (a fresh NF4 base with the
        variant's adapter unmerged, HF generate): greedy tokens and teacher-forced logits on every evaluation
        prompt, held to ``inference.parity_*``. Returns (figures, gate failures) and records both."""
        from .engines.decoding import HFGreedy
        from .measure.parity import parity, parity_check_count, parity_failures
        from .models.nf4 import load_nf4_with_adapter

        loaded, inf = self.load(name), self.profile.inference
        adapter_dir = None if loaded.variant.is_baseline else peft_dir(self.adapter(name)[0])
        with timed("model-load", f"{name}: parity reference"):
            reference = self._guard(name, "inference", load_nf4_with_adapter, self.profile, adapter_dir,
                                    self.runs_dir / "_models")
        try:
            result = self._guard(name, "inference", parity, HFGreedy(reference, self.tokenizer),
                                 self.load(name).engine, self.tokenizer, self.eval_prompts(), inf.parity_new_tokens,
                                 self.profile.eval.batch_size, inf.parity_tie_logits)
        finally:
            del reference
            free_memory()
        failures = parity_failures(result, inf, label=f"{name}: {loaded.engine.name} vs seed path")
        engine = loaded.engine.name
        record_variant(self.recorder, loaded)
        result["max_relative_error"] = inf.parity_max_relative_error  # the limit applied; null: not gated
        self.recorder.record(name, "parity", {**result, "engine": engine, "failures": failures}, engine=engine)
        self.recorder.record(name, "gates", {"parity": {"checked": parity_check_count(result, inf),
                                                        "failures": failures}}, engine=engine)
        return result, failures

    def decode_call(self, name: str) -> Callable[[], list[list[int]]]:
        """One timed unit of the latency benchmark (``harness.measure.latency``): the fixed prompt greedy-decoded
        to exactly ``latency.max_new_tokens`` tokens with ``name`` loaded."""
        return latency.decode_call(self, name)

    def earlier_latency(self, name: str, rounds: int) -> dict[str, Any] | None:
        """``name``'s latency timed earlier on this machine under this session's key, to confirm before reuse."""
        return latency.earlier_latency(self, name, rounds)

    def record_latency(self, name: str, samples: list[float], load_before: dict, load_after: dict,
                       timer: str = "pytest-benchmark", earlier: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """Record timed rounds of ``decode_call(name)``, or the ``earlier`` figure they confirm (None: they do not)."""
        return latency.record_latency(self, name, samples, load_before, load_after, timer, earlier)

    def measure_latency(self, name: str, rounds: int | None = None, reuse_earlier: bool = True) -> dict[str, Any]:
        """``decode_call`` timed with a plain clock (the benchmark suite times the same call with pytest-benchmark)."""
        return latency.measure_latency(self, name, rounds, reuse_earlier)

    def compare_engines(self):
        """The engines side by side on ``inference.speed_variant`` (``harness.engines.compare``); train that
        variant first (``train``)."""
        from .engines.compare import EngineComparison

        self.wait_for_kernels()
        return EngineComparison(self)

    def save(self, card: bool = True) -> dict[str, Any]:
        """Merge this session's figures into ``runs/<profile>/results.json`` (and the card); keep what it compiled."""
        figures = self.recorder.figures
        results = save_results(results_path(self.runs_dir, self.profile.name), self.profile, figures,
                               self.recorder.data_fingerprint)
        if card and self.card is not None and figures:
            self.write_card(figures)
        self._progress_path().unlink(missing_ok=True)
        if self.state.compile_cache is not None:  # after the figures: a cache that cannot be written loses none
            from .engines.compile_cache import keep

            self.own_phase_log()  # a sweep made inside a test (the real-OOM test's) may have taken the log over
            with timed("compile-cache", "save"):
                keep(self.runs_dir, self.profile, self.state.compile_cache, self.recorder.session_id)
        return results

    def save_progress(self) -> None:
        """This session's figures so far in ``runs/<profile>/progress-<session>-<pid>.json``, rewritten after each test
        and removed by ``save``: a process that dies natively or is interrupted leaves what it measured there."""
        save_progress(self._progress_path(), self.profile, self.recorder.figures, self.recorder.data_fingerprint)

    def write_card(self, figures: dict[str, dict[str, Any]]) -> None:
        from .report.card import write_card

        write_card(self.card, card_results_path(self.card, self.profile.name), self.profile, figures,
                   self.recorder.data_fingerprint)

    # -- resources --------------------------------------------------------------------------------------------

    @property
    def tokenizer(self):
        if self.state.tokenizer is None:
            from .models.base import load_tokenizer

            self.state.tokenizer = load_tokenizer(self.profile.model, self.runs_dir / "_models")
        return self.state.tokenizer

    def adapter(self, name: str) -> tuple[Path, dict[str, Any]]:
        """``name``'s trained adapter: (artifact dir, manifest). Trains nothing: ``train(name)`` comes first."""
        if name in self.state.adapter_errors:
            raise self.state.adapter_errors[name]
        if name not in self.state.adapters:
            raise RuntimeError(f"variant {name!r} has no adapter in this session yet; call sweep.train({name!r}) "
                               f"(or sweep.train_selected()) before loading or evaluating it")
        return self.state.adapters[name]

    def load(self, name: str) -> Loaded:
        """``name`` ready to generate with the profile's engine, the previous variant released; ``train`` first."""
        s = self.state
        if s.loaded is not None and s.loaded.variant.name == name:
            return s.loaded
        variant = self.profile.variant(name)
        path, manifest = (None, {}) if variant.is_baseline else self.adapter(name)
        self.restore_compiled()
        self.release()
        merged = self._merged_base() if self.profile.inference.engine == "merged" else None
        adapter_dir = None if path is None else peft_dir(path)
        if merged is not None:
            with timed("merge", name):
                model = self._guard(name, "inference", merged.activate, name, adapter_dir)
            engine = merged.engine
        else:
            from .engines.decoding import HFGreedy
            from .engines.nf4_layers import nf4_compiled
            from .models.nf4 import load_nf4_with_adapter

            model = self._guard(name, "inference", load_nf4_with_adapter, self.profile, adapter_dir,
                                self.runs_dir / "_models")
            engine = (HFGreedy(model, self.tokenizer) if self.profile.inference.engine == "seed"
                      else nf4_compiled(model, self.tokenizer, self.profile.inference))
        s.loaded = Loaded(variant, model, engine, manifest)
        return s.loaded

    def release(self) -> None:
        """Drop the loaded variant (the merged base, shared by the sweep, stays until ``close``)."""
        if self.state.loaded is not None:
            self.state.loaded.model = self.state.loaded.engine = None
            self.state.loaded = None
            free_memory()

    def close(self) -> None:
        self.release()
        if self.state.merged is not None:
            self.state.merged.model = self.state.merged.engine = None
            self.state.merged = None
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
        s = self.state
        if s.merged_error is not None:
            raise s.merged_error
        if s.merged is None:
            from .engines.merged import MergedBase

            def build():
                with timed("engine-build", "merged base"):
                    base = MergedBase(self.profile, self.runs_dir / "_models", self.tokenizer)
                with timed("compile", "merged: eval and latency shapes"):
                    base.warmup(self.eval_prompts(), self.latency_prompt(), self.profile.eval,
                                self.profile.latency.max_new_tokens)
                return base

            # the bf16 base serves every variant: an OOM here ends all of them, with one message
            try:
                s.merged = self._guard("merged base (all variants)", "inference", build)
            except VariantOutOfMemory as e:
                s.merged_error = e
                raise

        return s.merged

    def _progress_path(self) -> Path:
        return results_path(self.runs_dir, self.profile.name).with_name(
            f"progress-{self.recorder.session_id}-{os.getpid()}.json")

    def eval_key(self) -> str:
        """What stored predictions must match to be paired (``harness.predictions.eval_key_parts``)."""
        return eval_key(self.profile, self.recorder.data_fingerprint)

    def _baseline_rows(self) -> tuple[dict[str, list[dict]] | None, str | None]:
        """The baseline's per-example rows to pair ΔF1 with: this session's, a stored file made under the same
        eval key, or (when the profile sweeps a baseline) a fresh evaluation. Never another config's."""
        if "baseline" in self.state.evals:
            return {k: v.rows for k, v in self.state.evals["baseline"].scores.items()}, None
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

