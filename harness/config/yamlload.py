"""YAML with line numbers: the parsed data plus a map from key path to the 1-based line it is written on.

Two equal keys in one mapping are an error (PyYAML would silently keep the last), and every way a file can fail to
read or parse becomes one ``ConfigError`` naming ``file:line``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

__all__ = ["read_yaml"]


def read_yaml(path: Path) -> tuple[Any, dict[tuple, int]]:
    """Parse YAML, returning the data and a map from key path to 1-based line number."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError([f"{path}: file not found; pass --profile with a name from data/configs or a YAML path"])
    except UnicodeDecodeError as e:
        raise ConfigError([f"{path}: not valid UTF-8 ({e.reason} at byte {e.start}); save the file as UTF-8"])
    except OSError as e:  # a directory, a fifo, no permission
        raise ConfigError([f"{path}: cannot be read ({e.strerror or e}); pass the path of a YAML file"])
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark, ctx = getattr(e, "problem_mark", None), getattr(e, "context_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        # e.g. an unclosed '[' is noticed lines later: say where the construct began too
        began = (f" ({e.context} that began on line {ctx.line + 1})"
                 if ctx and getattr(e, "context", None) and (not mark or ctx.line != mark.line) else "")
        raise ConfigError([f"{where}: invalid YAML: {getattr(e, 'problem', None) or e}{began}; fix the syntax"])
    lines: dict[tuple, int] = {}
    duplicates: list[str] = []  # PyYAML keeps the last of two equal keys without a word: that hides an edit

    def walk(n, prefix, ancestors=frozenset()):
        if id(n) in ancestors:  # a self-referencing anchor (&a [*a]): don't follow it forever
            return
        ancestors = ancestors | {id(n)}
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                key = prefix + (k.value,)
                if key in lines and k.value != "<<":
                    dotted = ".".join(str(x) for x in key)
                    duplicates.append(f"{path}:{k.start_mark.line + 1}: {dotted}: duplicate key {k.value!r} (first "
                                      f"on line {lines[key]}); keep one of them")
                    continue
                lines[key] = k.start_mark.line + 1
                walk(v, key, ancestors)
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                lines[prefix + (i,)] = v.start_mark.line + 1
                walk(v, prefix + (i,), ancestors)

    if node is not None:
        walk(node, ())
    if duplicates:
        raise ConfigError(duplicates)
    return data, lines
