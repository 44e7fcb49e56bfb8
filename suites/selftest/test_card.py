"""The model card: a user's text outside our region keeps its bytes, line endings included."""

from __future__ import annotations

from huggingface_hub import ModelCard

from harness.card import END, START, update_card

CARD = ("---\nlicense: mit\nmy_team: search-quality\n---\n\n# Our card\n\nWritten by hand  \nwith\ta tab.\n\n"
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


def test_only_real_weights_put_scores_in_the_model_index(tmp_path):
    """The Hub shows model-index as the model's own scores: a random-weight profile's EM must never get there,
    while its table still shows in the card body with its disclaimer; a real-weights run is indexed per profile."""
    card = tmp_path / "MODEL_CARD.md"
    card.write_text(CARD, encoding="utf-8")
    update_card(card, {**RESULTS, "weights": "synthetic"})
    assert not ModelCard.load(card).data.eval_results
    assert "LoRA r16/a32" in card.read_text(encoding="utf-8")
    update_card(card, {**RESULTS, "profile": "mistral-7b", "weights": "real"})
    results = ModelCard.load(card).data.eval_results
    assert {(r.dataset_name, r.metric_type, r.metric_value) for r in results} == {
        ("domain_qa (mistral-7b profile)", "exact_match", 0.4), ("domain_qa (mistral-7b profile)", "f1", 0.5)}
    assert ModelCard.load(card).data.to_dict()["my_team"] == "search-quality"
