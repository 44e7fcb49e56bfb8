"""Check what a profile points at before anything runs: the model source exists, every split loads, every train
example fits in ``training.max_length`` once tokenized, and ``latency.prompt_id`` names an example.

The plugin calls ``check_profile_data`` at configure time, so a bad dataset is one error before the first test,
not the same error repeated in every test, and nothing in ``runs/`` or the card is touched.
"""

from __future__ import annotations

from pathlib import Path

from ..data.dataset import SPLITS, Example, load_splits
from .errors import ConfigError, DataError, did_you_mean
from .schema import Profile
from .yamlload import read_yaml

__all__ = ["check_profile_data", "prepare_profile"]


def check_profile_data(profile: Profile) -> dict[str, list[Example]]:
    """Load and cross-check the profile's splits; raise DataError naming file:line and the fix for every problem
    (ConfigError for a model source, max_length or ``latency.prompt_id`` that cannot work).

    The length check needs the tokenizer. It runs here for ``tokenizer: v3`` (shipped with mistral-common, loads
    offline in seconds); an ``auto`` tokenizer may need the model's files or the hub, so its examples are checked
    when training starts, with the same message.
    """
    _check_model_source(profile)
    splits = load_splits({split: profile.data_path(split) for split in SPLITS})
    trains = any(not profile.variant(name).is_baseline for name in profile.variants)
    if trains and profile.model.tokenizer == "v3":
        _check_lengths(profile, splits["train"])
    _check_latency_prompt(profile, splits)
    return splits


def prepare_profile(profile: Profile) -> tuple[Profile, dict[str, list[Example]], str]:
    """What a run of ``profile`` is keyed by: the profile with a hub model's revision pinned to a commit, its checked
    splits, and their fingerprint. The sweep stamps every figure with these; a card block re-rendered from a results
    file holds that file's figures to them."""
    from ..data.dataset import fingerprint
    from ..models.revision import pin_revision

    profile = pin_revision(profile)
    splits = check_profile_data(profile)
    return profile, splits, fingerprint([e for s in splits.values() for e in s])


def _where(profile: Profile, *keypath: str) -> str:
    """``profile.yaml:LINE`` of a key, for a problem found after loading."""
    line = read_yaml(Path(profile.source_file))[1].get(keypath)
    return f"{profile.source_file}{f':{line}' if line else ''}: {'.'.join(keypath)}"


def _check_model_source(profile: Profile) -> None:
    """A synthetic name or a local directory that does not exist would fail in every test; say so once."""
    source = profile.model.source
    if source.startswith("synthetic:"):
        from ..models.base import SYNTHETIC_SHAPES

        names = [f"synthetic:{name}" for name in SYNTHETIC_SHAPES]
        if source not in names:
            hint = did_you_mean(source, names)
            raise ConfigError([f"{_where(profile, 'model', 'source')}: no synthetic model {source!r}; {hint}"
                               f"choose one of: {', '.join(names)}"])
    elif source.startswith("pypi:"):  # a missing wheel would error every test: one message, with the install line
        from ..models.pretrained import MissingWheelError, parse_pypi_source, wheel_gguf

        try:
            wheel_gguf(*parse_pypi_source(source))
        except (MissingWheelError, ValueError) as e:
            raise ConfigError([f"{_where(profile, 'model', 'source')}: {e}"]) from None
    elif source.startswith(("/", "./", "../", "~")) and not Path(source).expanduser().is_dir():
        raise ConfigError([f"{_where(profile, 'model', 'source')}: {source!r} is not a directory; give a local "
                           f"checkpoint directory or a hub id such as mistralai/Mistral-7B-Instruct-v0.3"])


def _check_lengths(profile: Profile, train: list[Example]) -> None:
    """Every train example must fit ``training.max_length`` whole; when none does, the limit is the mistake."""
    from ..data.prompt import build_training_example, training_rows, v3_tokenizer

    tokenizer, max_length = v3_tokenizer(), profile.training.max_length
    try:
        training_rows(tokenizer, train, max_length)
    except DataError as e:
        if len(train) < 2 or len(e.problems) < len(train):
            raise
        need = sorted(len(build_training_example(tokenizer, ex.instruction, ex.input, ex.output)["input_ids"])
                      for ex in train)
        raise ConfigError([f"{_where(profile, 'training', 'max_length')}: {max_length} is shorter than every "
                           f"train example ({need[0]} to {need[-1]} tokens with the prompt and EOS); raise it to at "
                           f"least {need[-1]}"]) from None


def _check_latency_prompt(profile: Profile, splits: dict[str, list[Example]]) -> None:
    """``latency.prompt_id`` must name an example: a typo would silently time another prompt."""
    wanted = profile.latency.prompt_id
    ids = [e.id for split in SPLITS for e in splits[split]]
    if not wanted or wanted in ids:
        return
    hint = did_you_mean(wanted, ids)
    raise ConfigError([f"{_where(profile, 'latency', 'prompt_id')}: {wanted!r} is not the id of any example in the "
                       f"data; {hint}give the id of the prompt to time, e.g. {splits['validation'][0].id!r}"])
