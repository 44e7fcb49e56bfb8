"""The error base for bad user input (a profile, a dataset) and the shared "did you mean" hint.

Every problem found is collected first and raised once: ``InputError`` lists them all, as
``N problem(s) in <what>:`` followed by one indented line per problem (``file:line: key: what; how to fix``).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["InputError", "ConfigError", "DataError", "did_you_mean", "closest"]


class InputError(ValueError):
    """User input is invalid; the message lists every problem found. Subclasses name what was read."""

    what = "input"

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        n = len(self.problems)
        super().__init__(f"{n} problem{'s' if n != 1 else ''} in {self.what}:\n  " + "\n  ".join(self.problems))


class ConfigError(InputError):
    """A profile or variants YAML is invalid; the message lists every problem found."""

    what = "config"


class DataError(InputError):
    """A dataset file is invalid; the message lists every problem as path:line: field ..."""

    what = "dataset"


def closest(value: object, choices: Iterable[object]) -> str | None:
    """The choice most like ``value`` (difflib, compared as strings), or None when none is close."""
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
    return close[0] if close else None


def did_you_mean(value: object, choices: Iterable[object]) -> str:
    """``"did you mean 'x'? "`` for the choice closest to ``value``, or ``""`` when none is close."""
    match = closest(value, choices)
    return f"did you mean {match!r}? " if match is not None else ""
