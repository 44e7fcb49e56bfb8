"""The model card: a user's text outside our region keeps its bytes, line endings included."""

from __future__ import annotations

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
