"""Mistral-7B-Instruct-v0.3's own prompt format, through mistral-common.

The v3 tokenizer ships inside the ``mistral-common`` wheel, so it loads offline. ``v3_tokenizer()`` wraps it in
transformers' ``MistralCommonBackend``: chat formatting is mistral-common's, so ``[INST]`` typed by a user stays
text and whitespace is handled as Mistral does, while padding, decoding and ``generate`` work as for any
transformers tokenizer. Other base models use their own chat template through the same ``apply_chat_template``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from ..config.errors import DataError

if TYPE_CHECKING:
    from .dataset import Example

__all__ = [
    "PROMPT_FORMAT",
    "V3_TOKENIZER_FILE",
    "AnswerTooLong",
    "EmptyAnswer",
    "v3_tokenizer",
    "v3_model_file",
    "user_content",
    "encode_prompt",
    "build_training_example",
    "training_rows",
    "decode_answer",
]

# Bump when the prompt or the training-sequence layout changes: it is part of every artifact key.
PROMPT_FORMAT = "mistral-v3-instruct/1"
V3_TOKENIZER_FILE = "mistral_instruct_tokenizer_240323.model.v3"


class AnswerTooLong(ValueError):
    """A training example does not fit in max_length with its whole answer and EOS."""


class EmptyAnswer(ValueError):
    """A training example has no answer to learn (mistral-common would reject it with its own exception)."""


def v3_model_file() -> Path:
    """Path of the v3 sentencepiece model inside the installed mistral-common wheel."""
    import mistral_common

    path = Path(mistral_common.__file__).parent / "data" / V3_TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall mistral-common (pip install -U mistral-common)")
    return path


@functools.lru_cache(maxsize=1)
def v3_tokenizer():
    """The Mistral v3 tokenizer as a transformers tokenizer (MistralCommonBackend), built offline."""
    from transformers import MistralCommonBackend

    # The constructor takes the wheel's own file: from_pretrained wants a folder holding one tokenizer file (the
    # wheel's folder holds seven), and a copy in a temp folder outlived every process (a deepcopy reopens the path).
    return MistralCommonBackend(tokenizer_path=str(v3_model_file()),
                                padding_side="left")  # batched greedy generation needs left padding


def user_content(instruction: str, input: str = "") -> str:
    """The user turn: the instruction, then a newline and the context when there is one."""
    return f"{instruction}\n{input}" if input else instruction


def _ids(encoded) -> list[int]:
    ids = encoded["input_ids"] if isinstance(encoded, Mapping) else encoded
    return list(ids)


def encode_prompt(tokenizer, instruction: str, input: str = "") -> list[int]:
    """Token ids of the generation prompt for one user message (BOS, [INST] ... [/INST] on v3)."""
    messages = [{"role": "user", "content": user_content(instruction, input)}]
    kwargs = {} if _is_mistral_common(tokenizer) else {"add_generation_prompt": True}
    return _ids(tokenizer.apply_chat_template(messages, tokenize=True, **kwargs))


def _is_mistral_common(tokenizer) -> bool:
    return type(tokenizer).__name__ == "MistralCommonBackend"


def build_training_example(tokenizer, instruction: str, input: str, answer: str,
                           max_length: int | None = None) -> dict[str, list[int]]:
    """Prompt ids + answer ids + EOS, with a completion mask that is 1 on the answer and EOS only.

    Raises AnswerTooLong rather than cutting the answer when the sequence exceeds ``max_length``, and EmptyAnswer
    for a blank answer.
    """
    if not answer:
        raise EmptyAnswer("the answer is ''; give the text the model should learn to answer")
    prompt = encode_prompt(tokenizer, instruction, input)
    full = _encode_conversation(tokenizer, user_content(instruction, input), answer)
    if full[: len(prompt)] != prompt:
        raise ValueError("the chat template does not extend the prompt with the answer; it cannot be used for "
                         "completion-only training")
    if full[-1] != tokenizer.eos_token_id:
        full.append(tokenizer.eos_token_id)
    if max_length is not None and len(full) > max_length:
        raise AnswerTooLong(f"prompt ({len(prompt)} tokens) + answer + EOS is {len(full)} tokens, over max_length "
                            f"{max_length}; raise training.max_length or shorten the example")
    return {"input_ids": full, "completion_mask": [0] * len(prompt) + [1] * (len(full) - len(prompt))}


def training_rows(tokenizer, examples: list[Example], max_length: int) -> list[dict[str, list[int]]]:
    """Tokenize every example; raise DataError naming file:line for any whose answer would be cut."""
    rows, problems = [], []
    for ex in examples:
        try:
            rows.append(build_training_example(tokenizer, ex.instruction, ex.input, ex.output, max_length))
        except AnswerTooLong as e:
            problems.append(f"{ex.where}: field 'output' does not fit: {e}")
        except EmptyAnswer as e:
            problems.append(f"{ex.where}: field 'output' is empty: {e}")
    if problems:
        raise DataError(problems)
    return rows


def _encode_conversation(tokenizer, user: str, answer: str) -> list[int]:
    if _is_mistral_common(tokenizer):
        # Mistral's own training layout: mistral-common's encode_instruct ends the assistant turn with EOS.
        from mistral_common.protocol.instruct.messages import AssistantMessage, UserMessage
        from mistral_common.protocol.instruct.request import InstructRequest

        request = InstructRequest(messages=[UserMessage(content=user), AssistantMessage(content=answer)])
        return list(tokenizer.tokenizer.instruct_tokenizer.encode_instruct(request).tokens)
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return _ids(tokenizer.apply_chat_template(messages, tokenize=True))


def decode_answer(tokenizer, new_token_ids) -> str:
    """Decode generated tokens (new tokens only, never the prompt) into the answer text."""
    ids = [int(t) for t in new_token_ids]
    if tokenizer.eos_token_id in ids:
        ids = ids[: ids.index(tokenizer.eos_token_id)]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()
