"""One profile's block of the model card, rendered from its results file alone (a pure function of it).

Every line belongs to one variant, one section of one variant, or the profile: so a run that measured r16 changes
r16's lines and no other. A figure that may mislead says so where it stands: † measured under another config or data
than the profile's current one, or made by other harness code (``code_digest``), ‡ timed on a busy machine or on
rounds that spread, ↺ timed by an earlier run on the same machine under the same key and reused once fresh rounds
confirmed it (``harness.measure.reuse``; its provenance is the run that timed it). Provenance (git sha, engine,
device, time, config) is listed per variant and section.
"""

from __future__ import annotations

from typing import Any

from tabulate import tabulate

from ..measure.gates import gate_status
from ..measure.timing import doubt
from .results import SECTIONS
from ..config.schema import headline_split

__all__ = ["render_section", "results_table", "headline_of", "ENGINE_LABELS", "fmt_ratio"]

NA_RANDOM = "n/a (random weights)"
ENGINE_LABELS = {
    "seed": "NF4 + unmerged LoRA, HF generate (the seed's path)",
    "nf4-compiled": "NF4 + unmerged LoRA, static KV cache, decode step compiled on CUDA (low memory)",
    "merged": "dequantized base + merged LoRA, static KV cache, decode step compiled on CUDA (fast)",
}


def md_table(rows: list[list], headers: list[str], padded: bool = False) -> str:
    """A GitHub markdown table. Unpadded in the card: column widths that depend on every row would change every
    line when one row's cell grows, and the card must keep the lines of rows a run did not measure byte for byte.
    Padded (tabulate) for the terminal."""
    if padded:
        return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)
    line = lambda cells: "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "---|" * len(headers)] + [line(r) for r in rows])


def _fmt(x, spec=".3f", unit=""):
    return "n/a" if x is None else f"{x:{spec}}{unit}"


def _ci(pair):
    return "n/a" if not pair else f"[{pair[0]:.2f}, {pair[1]:.2f}]"


def fmt_ratio(x: float | None) -> str:
    """0.95 prints as 0.95x, not 1.0x: a slowdown must read as one."""
    return "n/a" if x is None else (f"{x:.2f}x" if x < 10 else f"{x:.1f}x")


def _stale(results: dict[str, Any], section: dict[str, Any] | None) -> bool:
    return _stale_config(results, section) or _stale_code(results, section)


def _stale_config(results: dict[str, Any], section: dict[str, Any] | None) -> bool:
    prov = (section or {}).get("provenance") or {}
    if not prov or "config_hash" not in results:
        return False
    return (prov.get("config_hash") != results["config_hash"]
            or prov.get("data_fingerprint") not in (None, results.get("data_fingerprint")))


def _stale_code(results: dict[str, Any], section: dict[str, Any] | None) -> bool:
    """Made by other harness code than the results file's latest run (sections from before the digest: unknown)."""
    made_by = ((section or {}).get("provenance") or {}).get("code_digest")
    return bool(made_by and results.get("code_digest") and made_by != results["code_digest"])


def _mark(text: str, results: dict, section: dict | None) -> str:
    return (text + ("†" if _stale(results, section) else "") + ("‡" if doubt(section or {}) else "")
            + ("↺" if (section or {}).get("reused") else ""))


def _reused_note(what: str, section: dict[str, Any]) -> str:
    """Where a reused figure comes from and what confirmed it (``harness.measure.reuse.confirm``)."""
    prov, check = section.get("provenance") or {}, section["reused"]
    return (f"↺ {what}: timed {prov.get('time', 'n/a')} by git {_sha(prov, 'unknown')} on this machine and reused by "
            f"the run of {check.get('time', 'n/a')} (git `{check.get('git_sha', 'unknown')}`) under the same key "
            f"(code, libraries, config, data, adapters, machine): {check['rounds']} fresh rounds read p50 "
            f"{check['p50_s']:.4f}s, {check['off']:+.1%} from it (tolerance {check['tolerance']:.0%}). `--retime` "
            f"times every round.")


def headline_of(results: dict[str, Any]) -> str:
    """The split the block headlines (``data.headline_split``); files written before the key get its default."""
    return headline_split(results.get("headline_split"), results.get("eval_splits") or ["validation"])


def _order(results: dict[str, Any]) -> list[str]:
    order = results.get("variant_order") or []
    return [v for v in order if v in results["variants"]] + [v for v in results["variants"] if v not in order]


def _in_order(mapping: dict[str, Any], order: list[str]) -> list[tuple[str, Any]]:
    """``mapping``'s items with the keys in ``order`` first, in that order, then the rest sorted: a block reads the same
    rendered in the session (insertion order) as re-rendered from its file (written with sorted keys)."""
    return sorted(mapping.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else len(order), kv[0]))


def _parity(p: dict | None) -> str:
    """Token agreement / max |logit diff| of the profile's engine against the separately built seed path, and its
    error as a fraction of the adapter's own effect (harness/measure/parity.py)."""
    if not p:
        return "n/a"
    return f"{p['token_agreement']:.2f} tok{_ties(p)}, {p['max_logit_diff']:.1e} logit" + _relative(p)


def _ties(p: dict) -> str:
    """The agreement to the first difference of any size beside the gated one, where near ties were passed over."""
    return f" ({p['token_agreement_exact']:.2f} exact)" if p.get("tie_logits") else ""


def _relative(p: dict) -> str:
    if "relative_error" not in p:  # recorded before the relative check existed
        return ""
    if p["relative_error"] is None:
        return ", err/effect n/a (no adapter)"
    return f", err/effect {p['relative_error']:.1e}{_not_gated(p)}"


def _not_gated(p: dict) -> str:
    """' (not gated)' where the run recorded a null ``inference.parity_max_relative_error`` (files written before
    the limit was recorded say nothing)."""
    return " (not gated)" if "max_relative_error" in p and p["max_relative_error"] is None else ""


def results_table(results: dict[str, Any], padded: bool = False) -> str:
    """The seed's table (Model Variant | EM | F1 | Latency p50 | Latency p95 | VRAM (GB)) plus CIs, gates, costs."""
    split = headline_of(results)
    show = results.get("show_quality", True)
    rows = []
    for name in _order(results):
        row = results["variants"][name]
        qs, lat, mem = row.get("quality"), row.get("latency") or {}, row.get("memory") or {}
        train = row.get("training") or {}
        q = (qs or {}).get(split, {})
        vram = mem.get("inference_peak_allocated_gib")
        delta = (f"{q['f1_delta_vs_baseline']:+.2f} {_ci(q['f1_delta_vs_baseline_ci'])}"
                 if "f1_delta_vs_baseline" in q else "n/a")
        rows.append([
            (row.get("info") or {}).get("label", name),
            _mark(_fmt(q.get("em")), results, qs) if show else NA_RANDOM,
            _mark(_fmt(q.get("f1")), results, qs) if show else NA_RANDOM,
            _mark(_fmt(lat.get("p50_s"), unit="s"), results, lat) if lat else "n/a",
            _mark(_fmt(lat.get("p95_s"), unit="s"), results, lat) if lat else "n/a",
            _fmt(vram, ".1f") if vram is not None else "n/a (CPU)",
            _ci(q.get("em_ci")) if show else NA_RANDOM,
            _ci(q.get("f1_ci")) if show else NA_RANDOM,
            delta if show else NA_RANDOM,
            gate_status({k: v for k, v in (row.get("gates") or {}).items() if k != "provenance"}),
            _parity(row.get("parity")),
            f"{train['trainable_params']:,}" if "trainable_params" in train else "n/a",
            _mark(_fmt(train.get("train_wall_s"), ".1f", "s"), results, train) if train else "n/a",
            _fmt(train.get("train_tokens_per_s"), ",.0f"),
            _fmt(train.get("train_peak_allocated_gib"), ".1f"),
            _fmt(lat.get("tokens_per_s"), ",.1f"),
        ])
    headers = ["Model Variant", "EM", "F1", "Latency p50", "Latency p95", "VRAM (GB)", "EM 95% CI", "F1 95% CI",
               "ΔF1 vs baseline [95% CI]", "Gates", "Parity vs seed path", "Trainable params", "Train time",
               "Train tok/s",
               "Train VRAM (GB)", "Decode tok/s"]
    return md_table(rows, headers, padded)


def _sections(row: dict[str, Any]) -> list[tuple[str, Any]]:
    """A row's sections in one fixed order, whatever order the file or the session recorded them in."""
    return _in_order(row, list(SECTIONS))


def _stale_notes(results: dict[str, Any], name: str) -> list[str]:
    """One † line per variant and reason, naming every section it covers: a block whose figures all came from
    older code says so once a variant, not once a section."""
    code: dict[str, list[str]] = {}
    config: dict[tuple[str, str], list[str]] = {}
    for section, data in _sections(results["variants"][name]):
        if not isinstance(data, dict) or section in ("info", "gates"):
            continue
        prov = data.get("provenance") or {}
        if _stale_code(results, data):
            code.setdefault(prov["code_digest"], []).append(section)
        if _stale_config(results, data):
            made_under = (str(prov.get("config_hash"))[:12], str(prov.get("data_fingerprint"))[:12])
            config.setdefault(made_under, []).append(section)

    def refresh(sections: list[str]) -> str:
        return f"Re-run `-k {name}` to refresh {'it' if len(sections) == 1 else 'them'}."

    return ([f"- † `{name}` {', '.join(sections)}: made by harness code `{digest}`, not the current "
             f"`{results['code_digest']}`. {refresh(sections)}" for digest, sections in code.items()]
            + [f"- † `{name}` {', '.join(sections)}: measured under config `{config_hash}`, data `{data_fp}`; the "
               f"profile or its data changed since. {refresh(sections)}"
               for (config_hash, data_fp), sections in config.items()])


def _footnotes(results: dict[str, Any]) -> list[str]:
    lines = []
    for name in _order(results):
        lines += _stale_notes(results, name)
        for section, data in _sections(results["variants"][name]):
            if section == "gates" and isinstance(data, dict):  # a per-device limit this device has no entry in
                lines += [f"- `{name}` gates: {note}" for kind in data.values() if isinstance(kind, dict)
                          for note in kind.get("unchecked") or []]
            if not isinstance(data, dict) or section in ("info", "gates"):
                continue
            if why := doubt(data):
                lines.append(f"- ‡ `{name}` {section}: {why}; not the code's steady speed.")
            if data.get("reused") and section != "speed":  # the engines table says it for the comparison
                lines.append("- " + _reused_note(f"`{name}` {section}", data))
            for failure in (data.get("vram_failures") or []) if section == "training" else []:
                lines.append(f"- `{name}` training: {failure}")
    return lines


def _detail_table(results: dict[str, Any]) -> str:
    rows = []
    for name in _order(results):
        for split, q in _in_order(results["variants"][name].get("quality") or {}, results.get("eval_splits") or []):
            if split == "provenance":
                continue
            rows.append([name, split, q.get("n"), _fmt(q.get("em")), _ci(q.get("em_ci")), _fmt(q.get("f1")),
                         _ci(q.get("f1_ci")),
                         (f"{q['f1_delta_vs_baseline']:+.2f} {_ci(q['f1_delta_vs_baseline_ci'])}"
                          if "f1_delta_vs_baseline" in q else "n/a"),
                         _fmt(q.get("em_en")), _fmt(q.get("em_fr")), _fmt(q.get("f1_en")), _fmt(q.get("f1_fr"))])
    if not rows:
        return ""
    return md_table(rows, ["Variant", "Split", "n", "EM", "EM 95% CI", "F1", "F1 95% CI", "ΔF1 [95% CI]", "EM (en)",
                           "EM (fr)",
                           "F1 (en)", "F1 (fr)"])


def _speed_table(results: dict[str, Any]) -> list[str]:
    name, speed = next(((n, results["variants"][n]["speed"]) for n in _order(results)
                        if results["variants"][n].get("speed")), (None, None))
    if not speed:
        return []
    speed = dict(_in_order(speed, list(ENGINE_ORDER)))  # one order, whatever order a session ran them
    reused, rows = bool(speed.get("reused")), []
    for engine, f in speed.items():
        if engine in ("provenance", "reuse_key", "reused") or engine.startswith(("parity", "quality_")) \
                or not isinstance(f, dict):
            continue
        first = f.get("first_call_s") or {}
        compile_cell = (", ".join(f"{k}: {v:.0f}s" for k, v in first.items()) or "none") if f.get("compiled") \
            else "not compiled"
        ratio = fmt_ratio(f.get("speedup_vs_seed")) if engine != "seed" else "1.00x"
        rounds = f"{f.get('rounds', 'n/a')}" + (f" ({f['rounds_from']})" if "rounds_from" in f else "")
        rows.append([f"`{engine}`", f.get("note") or ENGINE_LABELS.get(engine, ""),
                     _fmt(f.get("p50_s"), unit="s") + ("‡" if doubt(f) else "") + ("↺" if reused else ""),
                     _fmt(f.get("p95_s"), unit="s"),
                     ratio, _fmt(f.get("peak_vram_gib"), ".1f") if "peak_vram_gib" in f else "n/a (CPU)",
                     compile_cell, rounds])
    table = md_table(rows, ["Engine", "What", "p50", "p95", "vs seed", "Peak VRAM (GB)", "First call (compile)",
                            "Rounds"])
    prov = speed.get("provenance") or {}
    out = [f"**Inference engines**, variant `{name}`, {results.get('latency_tokens', 128)} greedy tokens, one "
           f"session on {prov.get('device', 'n/a')} (git {_sha(prov, 'n/a')}, {prov.get('time', 'n/a')}):",
           "", table]
    out += ["", _reused_note("the whole comparison (its ratios, parity and quality costs with it; the fresh rounds "
                             "are `merged`'s)", speed)] if reused else []
    doubts = [f"‡ `{engine}`: {why}; its p50 and the ratios on it are not the code's steady speed."
              for engine, f in speed.items() if isinstance(f, dict) and (why := doubt(f))]
    out += [""] + doubts if doubts else []
    out += _compile_cache_note(speed)
    for key, par in speed.items():
        if key.startswith("parity") and isinstance(par, dict):
            out += ["", f"Parity of `{par.get('candidate', 'merged')}` against the seed path ({par['prompts']} "
                        f"prompts, {par['new_tokens']} greedy tokens): token agreement {par['token_agreement']:.3f}"
                        f"{_ties(par)}, identical sequences {par['identical_sequences']:.2f}, max |logit diff| "
                        f"{par['max_logit_diff']:.4f} (largest |logit| {par['max_abs_logit']:.2f})"
                        + (f"; engine error {par['relative_error']:.2g} of the adapter's own effect (rms "
                           f"{par['engine_error_rms']:.3g} vs {par['adapter_effect_rms']:.3g} logits)"
                           + _not_gated(par) if par.get("relative_error") is not None else "") + "."]
    for key, per_variant in speed.items():
        if key.startswith("quality_") and not key.endswith("_gate") and isinstance(per_variant, dict):
            out += [""] + _quality_cost(per_variant, speed.get(f"{key}_gate"), _order(results),
                                        results.get("eval_splits") or [])
    return out


def _compile_cache_note(speed: dict[str, Any]) -> list[str]:
    """One line when the session loaded inductor's artifacts saved by an earlier one: its first calls then time
    loading them and capturing CUDA graphs, not compiling (harness.engines.compile_cache)."""
    label = next((f["compile_cache"] for f in speed.values() if isinstance(f, dict)
                  and (f.get("compile_cache") or {}).get("loaded")), None)
    if label is None:
        return []
    saved = label.get("saved") or {}
    return ["", f"First calls with inductor's compiled artifacts loaded from `runs/_compile/` (key `{label['key']}`, "
                f"saved {saved.get('time', 'n/a')} by git `{str(saved.get('git_sha', 'n/a'))[:12]}`): they time the "
                f"loading and the CUDA-graph capture, not a compile."]


def _cost_gate(gate: dict[str, Any] | None) -> str:
    """The caption's last sentence: how ``inference.quantized_max_f1_loss`` judged the cost (files written before
    the gate say nothing)."""
    if gate is None:
        return ""
    if gate["max_f1_loss"] is None:
        return " Not gated: `inference.quantized_max_f1_loss` is null in the profile."
    verdict = f"**FAIL** ({len(gate['failures'])} variant/split)" if gate["failures"] else "pass"
    return (f" Gate `inference.quantized_max_f1_loss` {gate['max_f1_loss']:g} (fails where the difference's CI lies "
            f"wholly below -{gate['max_f1_loss']:g}): {verdict}.")


def _quality_cost(per_variant: dict[str, Any], gate: dict[str, Any] | None = None, variants: list[str] = (),
                  splits: list[str] = ()) -> list[str]:
    """The table of what a quantized engine costs against ``merged``, a row per variant and split (in the block's
    ``variants`` and ``splits`` order), and its gate. Results written before every variant was measured hold one
    variant as {split: figures}."""
    if any("em" in q for q in per_variant.values()):
        per_variant = {next(iter(per_variant.values()))["variant"]: per_variant}
    rows, engine = [], None
    for variant, per_split in _in_order(per_variant, list(variants)):
        for split, q in _in_order(per_split, list(splits)):
            engine = q["engine"]
            delta = (f"{q['f1_delta_vs_merged']:+.3f} {_ci(q.get('f1_delta_vs_merged_ci'))}"
                     if "f1_delta_vs_merged" in q else "n/a")
            rows.append([f"`{variant}`", f"`{split}`", str(q.get("n")), f"{q['em']:.3f} / {q['em_merged']:.3f}",
                         f"{q['f1']:.3f} / {q['f1_merged']:.3f}", delta, f"{q['identical_predictions']:.2f}",
                         "n/a" if q.get("token_agreement") is None else f"{q['token_agreement']:.2f}"])
    caption = f"What `{engine}` costs against `merged` (same variant, same examples, paired)"
    return [f"{caption}.{_cost_gate(gate)}" if gate else f"{caption}:", "",
            md_table(rows, ["Variant", "Split", "n", f"EM {engine} / merged", f"F1 {engine} / merged", "ΔF1 (95% CI)",
                            "Identical answers", "Tokens agree"])]


ENGINE_ORDER = ("seed", "merged", "merged-int4", "merged-int8", "nf4-compiled")


def _sha(prov: dict[str, Any], missing: str) -> str:
    """The commit a figure names: the checkout's, and the declared one (``QLORA_GIT_SHA``) beside it when they
    differ, as on a machine whose copy of the tree carries a stale ``.git`` (the device tool's, 2026-12-02)."""
    sha = f"`{prov.get('git_sha') or missing}`"
    declared = prov.get("git_sha_declared")
    return f"{sha} (declared `{declared}`)" if declared else sha


def _provenance_table(results: dict[str, Any]) -> str:
    rows = []
    for name in _order(results):
        for section, data in _sections(results["variants"][name]):
            prov = data.get("provenance") if isinstance(data, dict) else None
            if section == "info" or not prov:
                continue
            rows.append([name, section, _sha(prov, "unknown (set QLORA_GIT_SHA)"),
                         prov.get("engine") or "-", prov.get("device") or "n/a", prov.get("time") or "n/a",
                         f"`{str(prov.get('config_hash'))[:12]}`"])
    return md_table(rows, ["Variant", "Section", "git", "Engine", "Device", "Measured (UTC)", "Config"]) if rows else ""


def _engine_caption(results: dict[str, Any]) -> str:
    """How this profile decodes (files written before the keys say nothing rather than guess)."""
    engine, dtype = results.get("engine"), results.get("merged_dtype")
    if engine == "merged" and dtype:
        return f" Engine: `merged`, the NF4 base dequantized to {dtype} with the adapter merged in {dtype}."
    return f" Engine: `{engine}`." if engine else ""


def render_section(results: dict[str, Any], plots: dict[str, str] | None = None) -> str:
    """One profile's block: caption, results table, footnotes, engines, per-split detail, provenance, plots."""
    split = headline_of(results)
    weights = "real weights" if results.get("weights") == "real" else "synthetic (random) weights"
    lines = [
        f"### Profile `{results['profile']}`", "",
        f"*{results.get('description', '')}.* Base: `{results.get('base_model', 'n/a')}`, **{weights}**.", "",
        f"EM/F1 on the `{split}` split (greedy, up to {results.get('max_new_tokens', 128)} new tokens), 95% bootstrap "
        f"CIs; the other evaluated splits are under 'Per split and language'. Latency: p50/p95 of greedy generation "
        f"of {results.get('latency_tokens', 128)} tokens. VRAM: peak `torch.cuda.max_memory_allocated` (GiB). Gates: "
        f"the profile's quality gates and VRAM ceilings.{_engine_caption(results)}", "",
        results_table(results),
    ]
    notes = _footnotes(results)
    if notes:
        lines += [""] + notes
    if not results.get("show_quality", True):
        lines += ["", "Quality is not reported: the weights are random, so EM/F1 would say nothing about the model. "
                      "Latency, VRAM and throughput are true for the model's shape."]
    elif results.get("weights") != "real":
        lines += ["", "These EM/F1 figures come from a random-init toy model: they measure memorisation by the "
                      "pipeline, not the quality of any real model."]
    speed = _speed_table(results)
    if speed:
        lines += [""] + speed
    detail = _detail_table(results) if results.get("show_quality", True) else ""
    if detail:
        lines += ["", "<details><summary>Per split and language</summary>", "", detail, "", "</details>"]
    prov = _provenance_table(results)
    if prov:
        lines += ["", "<details><summary>Provenance of each figure</summary>", "", prov, "", "</details>"]
    for title, href in (plots or {}).items():
        lines += ["", f"![{title}]({href})"]
    return "\n".join(lines)
