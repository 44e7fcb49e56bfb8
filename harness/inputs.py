"""Check a profile's data before anything runs: every split loads, every train example fits in
``training.max_length`` once tokenized, and ``latency.prompt_id`` names an example.

The plugin calls ``check_profile_data`` at configure time, so a bad dataset is one error before the first test,
not the same error repeated in every test, and nothing in ``runs/`` or the card is touched.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from .config import ConfigError, Profile, _read_yaml
from .data import SPLITS, Example, load_splits

__all__ = ["check_profile_data"]


def check_profile_data(profile: Profile) -> dict[str, list[Example]]:
    """Load and cross-check the profile's splits; raise DataError naming file:line and the fix for every problem
    (ConfigError for a ``latency.prompt_id`` that names no example).

    The length check needs the tokenizer. It runs here for ``tokenizer: v3`` (shipped with mistral-common, loads
    offline in seconds); an ``auto`` tokenizer may need the model's files or the hub, so its examples are checked
    when training starts, with the same message.
    """
    splits = load_splits({split: profile.data_path(split) for split in SPLITS})
    trains = any(not profile.variant(name).is_baseline for name in profile.variants)
    if trains and profile.model.tokenizer == "v3":
        from .prompt import v3_tokenizer
        from .train import training_rows

        training_rows(v3_tokenizer(), splits["train"], profile.training.max_length)
    _check_latency_prompt(profile, splits)
    return splits


def _check_latency_prompt(profile: Profile, splits: dict[str, list[Example]]) -> None:
    """``latency.prompt_id`` must name an example: a typo would silently time another prompt."""
    wanted = profile.latency.prompt_id
    ids = [e.id for split in SPLITS for e in splits[split]]
    if not wanted or wanted in ids:
        return
    path = Path(profile.source_file)
    line = _read_yaml(path)[1].get(("latency", "prompt_id"))
    close = difflib.get_close_matches(wanted, ids, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ConfigError([f"{path}{f':{line}' if line else ''}: latency.prompt_id: {wanted!r} is not the id of any "
                       f"example in the data; {hint}give the id of the prompt to time, e.g. "
                       f"{splits['validation'][0].id!r}"])
