"""Base models: a hub id, a local checkpoint, or a synthetic Mistral built from a config.

Every source ends in the same call, ``AutoModelForCausalLM.from_pretrained(..., quantization_config=...)``:
synthetic models are seeded, written once as safetensors under ``runs/_models/``, then loaded from disk exactly
as real weights are. One exception, for speed: a synthetic base quantized for the 4-bit store
(``harness.models.nf4_store``) goes to that call as its drawn state dict, not through a 14.5 GB checkpoint written
and read back at the 7B shape; the same weights, so the same quantized model (a CPU self-test holds it to one
quantized from the written checkpoint, bit for bit).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..config.profiles import config_hash
from ..config.schema import LoraConfig, ModelConfig, QuantConfig, Variant
from ..measure.memory import free_memory
from ..report.atomic import atomic_dir, file_lock
from ..report.phases import timed
from ..report.provenance import library_versions, source_digest
from .host_copy import save_pretrained

__all__ = [
    "SYNTHETIC_SHAPES",
    "synthetic_config",
    "synthetic_key",
    "synthetic_model",
    "materialize_synthetic",
    "resolve_source",
    "bnb_config",
    "load_base",
    "load_tokenizer",
    "peft_config",
    "lora_trainable_params",
    "device",
]

# Mistral-7B-v0.3's shape, and a 2-layer model with the same vocabulary that memorises 20 answers in seconds.
SYNTHETIC_SHAPES = {
    "mistral-7b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, head_dim=128),
    "tiny": dict(hidden_size=128, intermediate_size=448, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32),
}
# the code that writes a synthetic checkpoint, in synthetic_key
SYNTHETIC_SOURCES = (Path(__file__).resolve(), Path(__file__).resolve().with_name("host_copy.py"))
_SYNTHETIC_PREFIX = "synthetic:"


def device() -> torch.device:
    """This process's device: under ``accelerate launch`` each process takes the GPU of its LOCAL_RANK."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def synthetic_config(name: str):
    """The MistralConfig of a synthetic shape (v0.3: vocab 32768, rope 1e6, no sliding window, untied)."""
    from transformers import MistralConfig

    if name not in SYNTHETIC_SHAPES:
        raise ValueError(f"unknown synthetic model {name!r}; choose one of: {', '.join(SYNTHETIC_SHAPES)}")
    return MistralConfig(
        vocab_size=32768, max_position_embeddings=32768, rms_norm_eps=1e-5, sliding_window=None,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, **SYNTHETIC_SHAPES[name],
    )


def synthetic_key(name: str, seed: int) -> str:
    """What a synthetic checkpoint's weights follow: the shape, the seed, the device whose generator draws them (CUDA's
    and the CPU's differ), torch's and transformers' versions (the generator and the init functions) and the code
    that writes them (this module and host_copy.py)."""
    versions = library_versions()
    return config_hash({"name": name, "seed": seed, "config": synthetic_config(name).to_dict(),
                        "device": device().type, "versions": {k: versions.get(k) for k in ("torch", "transformers")},
                        "code": source_digest(SYNTHETIC_SOURCES, "harness.models.base.SYNTHETIC_SOURCES")})[:12]


def synthetic_model(name: str, seed: int):
    """The seeded random model of a synthetic shape in bfloat16, on this process's device: what its checkpoint holds.
    Drawn on the GPU when there is one: random init of 7B params on 2 CPU cores takes minutes."""
    from transformers import MistralForCausalLM

    torch.manual_seed(seed)
    with torch.device(device()):
        return MistralForCausalLM(synthetic_config(name)).to(torch.bfloat16)


def materialize_synthetic(name: str, seed: int, cache_root: Path) -> Path:
    """Write a seeded random checkpoint once (atomically, under a lock) and return its directory, named by
    ``synthetic_key``."""
    final = Path(cache_root) / f"synthetic-{name}-{synthetic_key(name, seed)}"
    with file_lock(final):
        if (final / "config.json").exists():
            return final
        with timed("checkpoint", f"{final.name}: random weights drawn and written"):
            model = synthetic_model(name, seed)
            with atomic_dir(final) as tmp:
                save_pretrained(model, tmp)  # through pinned memory: a third of the time from the GPU
        del model
        free_memory()
    return final


def resolve_source(model_cfg: ModelConfig, cache_root: Path) -> str:
    """A path or hub id that from_pretrained can load; synthetic sources are written to disk first."""
    src = model_cfg.source
    if src.startswith(_SYNTHETIC_PREFIX):
        return str(materialize_synthetic(src[len(_SYNTHETIC_PREFIX):], model_cfg.synthetic_seed, cache_root))
    if src.startswith("pypi:"):  # a GGUF file inside an installed wheel, converted once (harness/models/pretrained.py)
        from . import pretrained

        return str(pretrained.resolve_pypi_gguf(src, cache_root))
    if os.path.isdir(os.path.expanduser(src)):
        return os.path.expanduser(src)
    return src  # a hub id; from_pretrained fetches it (or reads it from the HF cache)


def bnb_config(q: QuantConfig):
    if not q.load_in_4bit:
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=q.quant_type, bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, q.compute_dtype), bnb_4bit_quant_storage=getattr(torch, q.quant_storage),
    )


def load_base(model_cfg: ModelConfig, q: QuantConfig, cache_root: Path, fsdp: bool = False):
    """Load the base model, 4-bit quantized when configured, on the GPU if there is one.

    A 4-bit base is quantized once and then read from ``runs/_models/nf4-<key>/`` (``harness.models.nf4_store``).
    With ``fsdp`` it is quantized at every load, with no device map: accelerate's FSDP plugin places and shards the
    weights itself.
    """
    from transformers import AutoModelForCausalLM

    dev = device()

    def from_pretrained(path, quantization_config=None, revision=None, cls=AutoModelForCausalLM, **weights):
        # a stored 4-bit base carries its quantization config; passing None would load it as if it had none
        model = cls.from_pretrained(
            path, revision=revision, dtype=getattr(torch, q.compute_dtype),
            attn_implementation=model_cfg.attn_implementation,
            device_map=None if fsdp else ({"": dev.index or 0} if dev.type == "cuda" else {"": "cpu"}),
            **({"quantization_config": quantization_config} if quantization_config is not None else {}), **weights,
        )
        model.eval()
        return model

    def from_source():
        revision = None if model_cfg.source.startswith(_SYNTHETIC_PREFIX) else model_cfg.revision
        return from_pretrained(resolve_source(model_cfg, cache_root), bnb_config(q), revision)

    if not q.load_in_4bit or fsdp:
        return from_source()
    from . import nf4_store

    quantize = from_source
    if model_cfg.source.startswith(_SYNTHETIC_PREFIX):
        def quantize():  # the drawn weights as from_pretrained's state dict: no checkpoint written to read back
            name = model_cfg.source[len(_SYNTHETIC_PREFIX):]
            with timed("synthetic-weights", f"synthetic-{name}: random weights drawn, no checkpoint written"):
                drawn = synthetic_model(name, model_cfg.synthetic_seed)
            try:
                return from_pretrained(None, bnb_config(q), cls=type(drawn), config=drawn.config,
                                       state_dict=drawn.state_dict())
            finally:
                del drawn
                free_memory()
    return nf4_store.load(model_cfg, q, cache_root, dev.type, quantize, from_pretrained)


def load_tokenizer(model_cfg: ModelConfig, cache_root: Path):
    """The v3 tokenizer from mistral-common, or the source's own tokenizer with ``tokenizer: auto``."""
    from ..data.prompt import v3_tokenizer

    if model_cfg.tokenizer == "v3":
        return v3_tokenizer()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_source(model_cfg, cache_root), revision=model_cfg.revision)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def peft_config(lora: LoraConfig, variant: Variant):
    from peft import LoraConfig as PeftLoraConfig

    if variant.is_baseline:
        raise ValueError(f"variant {variant.name!r} has no adapter; it has no LoRA config")
    return PeftLoraConfig(r=variant.r, lora_alpha=variant.alpha, lora_dropout=lora.dropout,
                          target_modules=list(lora.target_modules), bias="none", task_type="CAUSAL_LM")


def lora_trainable_params(shape: str, lora: LoraConfig, variant: Variant) -> int:
    """Trainable LoRA params for a synthetic shape, counted by peft on a meta-device model (no memory)."""
    from peft import get_peft_model
    from transformers import MistralForCausalLM

    if variant.is_baseline:
        return 0
    with torch.device("meta"):
        model = MistralForCausalLM(synthetic_config(shape))
        peft_model = get_peft_model(model, peft_config(lora, variant))
    trainable, _ = peft_model.get_nb_trainable_parameters()
    return int(trainable)

