"""A structural gate on what the loss sees: in every batch the trainer's collator builds, each prompt token is
labelled -100 and each answer has at least one labelled token.

Completion-only loss is easy to lose without any score noticing: trl builds the labels from the ``completion_mask``
column only while ``completion_only_loss`` is on, and a mask of all ones (or the option off) trains on the system
prompt and the question too. On a model that memorises 20 answers the train-split scores barely move, so the
quality gates cannot catch it; this check reads the collated batches themselves. The prompt is located by its own
token ids (``encode_prompt``), independently of the mask under test, so a wrong mask cannot vouch for itself.
"""

from __future__ import annotations

from .dataset import Example
from .prompt import encode_prompt

__all__ = ["IGNORE_INDEX", "LossMaskError", "loss_mask_failures", "check_loss_mask"]

IGNORE_INDEX = -100  # the label value transformers' causal-LM loss skips


class LossMaskError(RuntimeError):
    """The collated labels put loss on prompt tokens, or on no token of an answer."""


def _find(row: list[int], needle: list[int], start: int = 0) -> int:
    """Index of the first occurrence of ``needle`` in ``row`` at or after ``start``, or -1."""
    n = len(needle)
    first = needle[0]
    for i in range(start, len(row) - n + 1):
        if row[i] == first and row[i:i + n] == needle:
            return i
    return -1


def loss_mask_failures(trainer, tokenizer, examples: list[Example]) -> list[str]:
    """Collate ``trainer.train_dataset`` with ``trainer.data_collator`` and check every example found in it.

    For each collated row, every occurrence of an example's generation prompt must carry label -100 on all its
    positions, and the tokens after it (the answer, up to the next prompt or the row's end) must have at least
    one label that is not -100. Works with packed rows (several examples a row). Returns failure messages; empty
    means the loss sees answers only. Also fails when an example's prompt is found in no row at all.
    """
    prompts = {ex.id: encode_prompt(tokenizer, ex.instruction, ex.input) for ex in examples}
    dataset, collate = trainer.train_dataset, trainer.data_collator
    batch_size = max(1, trainer.args.per_device_train_batch_size)
    failures: list[str] = []
    found: dict[str, int] = {ex_id: 0 for ex_id in prompts}
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        for ids_t, labels_t in zip(batch["input_ids"], batch["labels"], strict=True):
            ids, labels = ids_t.tolist(), labels_t.tolist()
            spans = []  # (begin, end of prompt, example id)
            for ex_id, prompt in prompts.items():
                at = _find(ids, prompt)
                while at >= 0:
                    spans.append((at, at + len(prompt), ex_id))
                    at = _find(ids, prompt, at + len(prompt))
            spans.sort()
            for k, (begin, end, ex_id) in enumerate(spans):
                found[ex_id] += 1
                on_prompt = sum(label != IGNORE_INDEX for label in labels[begin:end])
                if on_prompt:
                    failures.append(f"{ex_id}: {on_prompt} of its {end - begin} prompt tokens carry a label: the loss "
                                    f"trains on the prompt (completion_mask not applied; check completion_only_loss "
                                    f"and build_training_example's mask)")
                answer_end = spans[k + 1][0] if k + 1 < len(spans) else len(ids)
                if all(label == IGNORE_INDEX for label in labels[end:answer_end]):
                    failures.append(f"{ex_id}: no answer token carries a label: the loss never sees this answer")
    missing = sorted(ex_id for ex_id, n in found.items() if n == 0)
    if missing:
        failures.append(f"{len(missing)} example(s) whose prompt is in no collated row (e.g. {missing[0]}): the "
                        f"training rows do not start with encode_prompt's ids, so training and serving prompts "
                        f"differ")
    return failures


def check_loss_mask(trainer, tokenizer, examples: list[Example]) -> None:
    """Raise LossMaskError listing every problem ``loss_mask_failures`` finds."""
    failures = loss_mask_failures(trainer, tokenizer, examples)
    if failures:
        shown = failures[:5] + ([f"... and {len(failures) - 5} more"] if len(failures) > 5 else [])
        raise LossMaskError("the training loss is not completion-only:\n  " + "\n  ".join(shown))
