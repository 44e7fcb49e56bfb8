"""The model card: template + data. Only our marked region and the model-index metadata change.

Between ``<!-- results:start -->`` and ``<!-- results:end -->`` each profile owns one block
(``<!-- results:<profile>:start -->`` ... ``:end -->``); a run rewrites its own profile's block and leaves the
others, and every byte outside the region, alone. The front matter goes through huggingface_hub's ``ModelCard``:
keys we do not own survive, and ``model-index`` is built from ``EvalResult`` objects, never hand-written YAML.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tabulate import tabulate

from .artifacts import atomic_write_text

__all__ = ["START", "END", "render_section", "update_card", "results_table"]

START, END = "<!-- results:start -->", "<!-- results:end -->"
NA_RANDOM = "n/a (random weights)"


def _dataset_name(profile: str) -> str:
    """Each profile's model-index entries carry its name, so a run replaces only its own."""
    return f"domain_qa ({profile} profile)"


def _block_markers(profile: str) -> tuple[str, str]:
    return f"<!-- results:{profile}:start -->", f"<!-- results:{profile}:end -->"


def _fmt(x, spec=".3f", unit=""):
    return "n/a" if x is None else f"{x:{spec}}{unit}"


def _ci(pair):
    return "n/a" if not pair else f"[{pair[0]:.2f}, {pair[1]:.2f}]"


def results_table(results: dict[str, Any]) -> str:
    """The seed's table (Model Variant | EM | F1 | Latency p50 | Latency p95 | VRAM (GB)) plus CIs and costs."""
    split = (results.get("eval_splits") or ["validation"])[0]
    show = results.get("show_quality", True)
    rows = []
    order = results.get("variant_order") or list(results["variants"])
    for name in [v for v in order if v in results["variants"]]:
        row = results["variants"][name]
        q = row.get("quality", {}).get(split, {})
        lat, mem, train = row.get("latency", {}), row.get("memory", {}), row.get("training", {})
        vram = mem.get("inference_peak_allocated_gib")
        rows.append([
            row.get("info", {}).get("label", name),
            _fmt(q.get("em")) if show else NA_RANDOM,
            _fmt(q.get("f1")) if show else NA_RANDOM,
            _fmt(lat.get("p50_s"), unit="s"),
            _fmt(lat.get("p95_s"), unit="s"),
            _fmt(vram, ".1f") if vram is not None else "n/a (CPU)",
            _ci(q.get("em_ci")) if show else NA_RANDOM,
            _ci(q.get("f1_ci")) if show else NA_RANDOM,
            (f"{q['f1_delta_vs_baseline']:+.2f} {_ci(q['f1_delta_vs_baseline_ci'])}"
             if show and "f1_delta_vs_baseline" in q else "n/a"),
            f"{train['trainable_params']:,}" if "trainable_params" in train else "n/a",
            _fmt(train.get("train_wall_s"), ".1f", "s"),
            _fmt(train.get("train_tokens_per_s"), ",.0f"),
            _fmt(mem.get("train_peak_allocated_gib"), ".1f") if "train_peak_allocated_gib" in mem else "n/a",
            _fmt(lat.get("tokens_per_s"), ",.1f"),
        ])
    headers = ["Model Variant", "EM", "F1", "Latency p50", "Latency p95", "VRAM (GB)", "EM 95% CI", "F1 95% CI",
               "ΔF1 vs baseline [95% CI]", "Trainable params", "Train time", "Train tok/s", "Train VRAM (GB)",
               "Decode tok/s"]
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def _detail_table(results: dict[str, Any]) -> str:
    rows = []
    for name in results.get("variant_order") or list(results["variants"]):
        for split, q in results["variants"].get(name, {}).get("quality", {}).items():
            rows.append([name, split, q.get("n"), _fmt(q.get("em")), _fmt(q.get("f1")), _fmt(q.get("em_en")),
                         _fmt(q.get("em_fr")), _fmt(q.get("f1_en")), _fmt(q.get("f1_fr"))])
    if not rows:
        return ""
    return tabulate(rows, headers=["Variant", "Split", "n", "EM", "F1", "EM (en)", "EM (fr)", "F1 (en)", "F1 (fr)"],
                    tablefmt="github", disable_numparse=True)


ENGINE_LABELS = {
    "seed": "NF4 + unmerged LoRA, HF generate (the seed's path)",
    "nf4-compiled": "NF4 + unmerged LoRA, static cache, compiled decode on CUDA (low memory)",
    "merged": "dequantized base + merged LoRA, static cache, compiled decode on CUDA (fast)",
}


def _speed_table(results: dict[str, Any]) -> str:
    """The engines measured side by side in one session by suites/test_speed.py, and the merge parity check."""
    for name in results.get("variant_order", []):
        speed = results["variants"].get(name, {}).get("speed")
        if speed:
            break
    else:
        return ""
    rows = []
    for engine, f in speed.items():
        if engine.startswith("parity") or not isinstance(f, dict):
            continue
        first = f.get("first_call_s") or {}
        ratio = f"{f['speedup_vs_seed']:.1f}x" if "speedup_vs_seed" in f else ("1.0x" if engine == "seed" else "n/a")
        rows.append([f"`{engine}`", ENGINE_LABELS.get(engine, ""), _fmt(f.get("p50_s"), unit="s"),
                     _fmt(f.get("p95_s"), unit="s"), ratio,
                     _fmt(f.get("peak_vram_gib"), ".1f") if "peak_vram_gib" in f else "n/a (CPU)",
                     ", ".join(f"{k}: {v:.0f}s" for k, v in first.items()) or "none", str(f.get("rounds", "n/a"))])
    table = tabulate(rows, headers=["Engine", "What", "p50", "p95", "vs seed", "Peak VRAM (GB)",
                                    "First call (compile)", "Rounds"], tablefmt="github", disable_numparse=True)
    tokens = next((f.get("new_tokens") for f in speed.values() if isinstance(f, dict) and "new_tokens" in f), "n/a")
    out = [f"**Inference engines**, variant `{name}`, {tokens} greedy tokens, same machine and session "
           f"(pytest -k speed):", "", table] if rows else []
    par = speed.get("parity")
    if par:
        out += ["", f"Merge parity ({par.get('merged_dtype')} merged vs NF4 + unmerged adapter, {par['prompts']} "
                    f"prompts, {par['new_tokens']} greedy tokens): max |logit diff| {par['max_logit_diff']:.3f} "
                    f"(largest |logit| {par['max_abs_logit']:.2f}), token agreement {par['token_agreement']:.2f}, "
                    f"identical sequences {par['identical_sequences']:.2f}."]
    return "\n".join(out)


def render_section(results: dict[str, Any], plots: dict[str, str] | None = None) -> str:
    """One profile's block: caption, the results table, per-split/per-language detail, plot links."""
    profile = results["profile"]
    variants = [results["variants"][v] for v in results.get("variant_order", []) if v in results["variants"]]
    prov = variants[0].get("provenance", {}) if variants else {}
    versions = prov.get("versions", {})
    split = (results.get("eval_splits") or ["validation"])[0]
    weights = "real weights" if results.get("weights") == "real" else "synthetic (random) weights"
    rounds = sorted({v.get("latency", {}).get("rounds") for v in variants if v.get("latency")} - {None})
    lines = [
        f"### Profile `{profile}`",
        "",
        f"*{results.get('description', '')}.* Weights: **{weights}**. Device: {prov.get('device', 'n/a')}. "
        f"Updated {results.get('updated', 'n/a')}, git `{prov.get('git_sha', 'n/a')}`. "
        f"Libraries: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".",
        "",
        f"EM/F1 on the `{split}` split (greedy, {results.get('max_new_tokens', 128)} new tokens), 95% bootstrap CIs; "
        f"latency p50/p95 of greedy generation over {', '.join(map(str, rounds)) or 'n/a'} rounds; VRAM is peak "
        f"`torch.cuda.max_memory_allocated` (GiB).",
        "",
        results_table(results),
    ]
    if not results.get("show_quality", True):
        lines += ["", "Quality is not reported: the weights are random, so EM/F1 would say nothing about "
                      "Mistral-7B. Latency, VRAM and throughput are true for the model's shape."]
    elif results.get("show_quality") and results.get("weights") != "real":
        lines += ["", "These EM/F1 figures come from a random-init toy model and measure memorisation of the "
                      "train split by the pipeline, not Mistral-7B quality."]
    engines = sorted({v.get("latency", {}).get("engine") for v in variants if v.get("latency")} - {None})
    if engines:
        lines += ["", f"Latency and VRAM columns use the `{'`, `'.join(engines)}` inference engine "
                      f"(`inference.engine`; harness/engines.py)."]
    speed = _speed_table(results)
    if speed:
        lines += ["", speed]
    detail = _detail_table(results) if results.get("show_quality", True) else ""
    if detail:
        lines += ["", "<details><summary>Per split and language</summary>", "", detail, "", "</details>"]
    for title, href in (plots or {}).items():
        lines += ["", f"![{title}]({href})"]
    return "\n".join(lines)


def _replace_block(body: str, profile: str, section: str, nl: str = "\n") -> str:
    start, end = _block_markers(profile)
    block = f"{start}\n{section}\n{end}".replace("\n", nl)
    if START not in body or END not in body:
        body = body.rstrip("\r\n") + f"{nl}{nl}## Results{nl}{nl}{START}{nl}{END}{nl}"
    region_start = body.index(START) + len(START)
    region_end = body.index(END)
    region = body[region_start:region_end]
    if start in region and end in region:
        a, b = region.index(start), region.index(end) + len(end)
        region = region[:a] + block + region[b:]
    else:
        region = region.rstrip("\r\n") + nl + block + nl
    return body[:region_start] + region + body[region_end:]


def _eval_results(results: dict[str, Any]) -> list:
    from huggingface_hub import EvalResult

    if not results.get("show_quality", True) or results.get("weights") != "real":
        return []  # the Hub shows model-index as the model's scores: only real weights may put numbers there
    out = []
    for name in results.get("variant_order", []):
        for split, q in results["variants"].get(name, {}).get("quality", {}).items():
            for metric, key in (("exact_match", "em"), ("f1", "f1")):
                if key in q:
                    out.append(EvalResult(
                        task_type="question-answering", task_name="Domain QA (fr/en)", dataset_type="domain_qa",
                        dataset_name=_dataset_name(results["profile"]), dataset_split=split,
                        metric_type=metric, metric_value=round(float(q[key]), 4), metric_name=f"{key.upper()} {name}"))
    return out


def update_card(card_path: Path, results: dict[str, Any], plots: dict[str, str] | None = None,
                base_model: str | None = None) -> None:
    """Rewrite this profile's block and model-index in the card; everything else is kept byte for byte."""
    from huggingface_hub import ModelCard

    card_path = Path(card_path)
    # bytes, not read_text: universal newlines would turn a user's CRLF into LF outside our region
    text = card_path.read_bytes().decode("utf-8") if card_path.exists() else "# Model card\n"
    card = ModelCard(text) if text.startswith("---") else ModelCard("---\n{}\n---\n" + text)
    nl = "\r\n" if "\r\n" in text else "\n"  # the card's own line ending, also inside our region
    card.text = _replace_block(card.text, results["profile"], render_section(results, plots), nl)
    data = card.data
    kept = [r for r in (data.eval_results or []) if r.dataset_name != _dataset_name(results["profile"])]
    new = _eval_results(results)
    data.eval_results = kept + new or None
    if data.eval_results and not data.model_name:
        data.model_name = "Mistral-7B-Instruct-v0.3 QLoRA domain QA"
    if base_model and not getattr(data, "base_model", None):
        data.base_model = base_model
    new_text = str(card)
    if new_text != text:
        atomic_write_text(card_path, new_text)
