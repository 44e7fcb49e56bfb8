"""Check a profile's data before anything runs: every split loads, and every train example fits in
``training.max_length`` once tokenized.

The plugin calls ``check_profile_data`` at configure time, so a bad dataset is one error before the first test,
not the same error repeated in every test, and nothing in ``runs/`` or the card is touched.
"""

from __future__ import annotations

from .config import Profile
from .data import SPLITS, Example, load_splits

__all__ = ["check_profile_data"]


def check_profile_data(profile: Profile) -> dict[str, list[Example]]:
    """Load and cross-check the profile's splits; raise DataError naming file:line and the fix for every problem.

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
    return splits
