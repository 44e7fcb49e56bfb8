"""The model card: template + data. Only our marked region and the model-index metadata change.

Between ``<!-- results:start -->`` and ``<!-- results:end -->`` each profile owns one block
(``<!-- results:<profile>:start -->`` ... ``:end -->``), rendered from ``card_assets/<profile>-results.json``
beside the card: a run merges the sections it measured into that file and re-renders the block, so rows it did
not measure come back byte for byte. Every byte outside the region is kept. The front matter goes through
huggingface_hub's ``ModelCard``: keys we do not own survive, and ``model-index`` is built from ``EvalResult``s,
only for a profile whose base model is the card's ``base_model`` (a SmolLM2 score never shows as Mistral's).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .atomic import atomic_write_json, atomic_write_text, file_lock
from .card_render import render_section
from .results import code_digest, load_results, merge_results

__all__ = ["START", "END", "CardError", "main", "update_card", "write_card"]

START, END = "<!-- results:start -->", "<!-- results:end -->"


class CardError(RuntimeError):
    """Writing the card would lose committed rows; nothing was written."""


def _dataset_name(profile: str) -> str:
    """Each profile's model-index entries carry its name, so a run replaces only its own."""
    return f"domain_qa ({profile} profile)"


def _block_markers(profile: str) -> tuple[str, str]:
    return f"<!-- results:{profile}:start -->", f"<!-- results:{profile}:end -->"


def write_card(card: Path, results_file: Path, profile, figures: dict[str, dict[str, Any]],
               data_fingerprint: str) -> dict[str, Any]:
    """Merge ``figures`` into the card's results file, then re-render the profile's block and plots from it."""
    from .plots import write_plots

    card, results_file = Path(card), Path(results_file)
    with file_lock(card):
        text = card.read_bytes().decode("utf-8") if card.exists() else ""
        start, _ = _block_markers(profile.name)
        if start in text and not results_file.exists():
            raise CardError(f"{card} has a block for profile {profile.name!r} but its results file {results_file} is "
                            f"missing, so the rows this run did not measure would be lost. Restore it "
                            f"(git checkout -- {results_file}) or delete the block between the {start} markers.")
        results = merge_results(load_results(results_file), profile, figures, data_fingerprint)
        assets = results_file.parent
        plots = write_plots(results, assets, link_prefix=os.path.relpath(assets, card.parent))
        atomic_write_json(results_file, results)
        update_card(card, results, plots)
    return results


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


def _eval_results(results: dict[str, Any], card_base: str | None) -> list:
    from huggingface_hub import EvalResult

    if (not results.get("show_quality", True) or results.get("weights") != "real"
            or not card_base or results.get("base_model") != card_base):
        return []  # the Hub shows model-index as the card's model's scores: only that model's real weights count
    out = []
    for name in results.get("variant_order", []):
        for split, q in (results["variants"].get(name, {}).get("quality") or {}).items():
            if split == "provenance":
                continue
            for metric, key in (("exact_match", "em"), ("f1", "f1")):
                if key in q:
                    out.append(EvalResult(
                        task_type="question-answering", task_name="Domain QA (fr/en)", dataset_type="domain_qa",
                        dataset_name=_dataset_name(results["profile"]), dataset_split=split,
                        metric_type=metric, metric_value=round(float(q[key]), 4), metric_name=f"{key.upper()} {name}"))
    return out


def update_card(card_path: Path, results: dict[str, Any], plots: dict[str, str] | None = None,
                now: dict[str, str] | None = None) -> None:
    """Rewrite this profile's block and model-index in the card; everything else is kept byte for byte. ``now``: the
    profile's config hash and data fingerprint as a run would stamp them (``main``), when they may differ from the
    results file's latest run."""
    from huggingface_hub import ModelCard

    card_path = Path(card_path)
    # bytes, not read_text: universal newlines would turn a user's CRLF into LF outside our region
    text = card_path.read_bytes().decode("utf-8") if card_path.exists() else "# Model card\n"
    card = ModelCard(text) if text.startswith("---") else ModelCard("---\n{}\n---\n" + text)
    nl = "\r\n" if "\r\n" in text else "\n"  # the card's own line ending, also inside our region
    # † against the harness code rendering the block, not only the results file's latest run: a block re-rendered
    # after the code (or, given ``now``, the profile or its data) changed marks every figure made before, until a run
    # re-makes it
    current = {**results, "code_digest": code_digest(), **(now or {})}
    card.text = _replace_block(card.text, results["profile"], render_section(current, plots), nl)
    data = card.data
    kept = [r for r in (data.eval_results or []) if r.dataset_name != _dataset_name(results["profile"])]
    new = _eval_results(results, getattr(data, "base_model", None))
    if new or len(kept) != len(data.eval_results or []):
        data.eval_results = kept + new or None
        if data.eval_results and not data.model_name:
            data.model_name = "Mistral-7B-Instruct-v0.3 QLoRA domain QA"
    new_text = str(card)
    if new_text != text:
        atomic_write_text(card_path, new_text)


def main(argv: list[str] | None = None) -> None:
    """``python -m harness.report.card PROFILE``: re-render a profile's card block from its committed results file
    (after copying in a results file measured on another machine, e.g. a GPU run's
    ``card_assets/<profile>-results.json``). PROFILE is what ``--profile`` takes, a name or a YAML file: figures made
    under another config or data than that profile's now are marked †, as a run of it would mark them."""
    import argparse

    from ..config.preflight import prepare_profile
    from ..config.profiles import config_hash, load_profile
    from .plots import write_plots

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("profile", help="the profile the block's figures were made with, as --profile takes it: a name "
                                    "(e.g. synthetic-7b) or a profile YAML file")
    ap.add_argument("--card", type=Path, default=Path(__file__).resolve().parents[2] / "MODEL_CARD.md")
    args = ap.parse_args(argv)
    from .results import card_results_path

    profile, _, data_fingerprint = prepare_profile(load_profile(args.profile))
    now = {"config_hash": config_hash(profile), "data_fingerprint": data_fingerprint}
    results_file = card_results_path(args.card, profile.name)
    results = load_results(results_file)
    if not results["variants"]:
        raise SystemExit(f"{results_file}: no results to render; run the benchmark or copy the file in first")
    with file_lock(args.card):
        plots = write_plots(results, results_file.parent, link_prefix=os.path.relpath(results_file.parent,
                                                                                          args.card.parent))
        update_card(args.card, results, plots, now)
    print(f"{args.card}: block {profile.name!r} rendered from {results_file}")


if __name__ == "__main__":
    main()
