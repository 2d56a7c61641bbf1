"""Python values given to the API (`ptqconv.convert`, `ConvertSettings.create`,
`BenchmarkSettings.create`) as the raw values the flags' parsers take, or a one-line usage
error naming the flag: bytes and path-like paths become strings, a mapping of input names
becomes its pairs, and a value of no type the flag takes is refused instead of failing
deep inside (a bytes name list would have been iterated into its byte values)."""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

from ptqconv.errors import PtqUsageError


def path(flag: str, value: Any) -> str | None:
    """A path given as str, bytes or os.PathLike, as a str (None stays None)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (bytes, os.PathLike)):
        found = os.fspath(value)
        return os.fsdecode(found) if isinstance(found, bytes) else found
    raise PtqUsageError(f"{flag}: {_shown(value)} is not a path (str, bytes or os.PathLike)")


def each_path(*given: tuple[str, Any]) -> list[str | None]:
    """`path` of each (flag, value) pair, in order."""
    return [path(flag, value) for flag, value in given]


def paths(flag: str, value: Any) -> str | list[Any] | None:
    """One path, or several (a sequence; pairs of (input name, path) kept as pairs; a mapping
    of input name to path as its pairs), with each path as a str."""
    if value is None or isinstance(value, (str, bytes, os.PathLike)):
        return path(flag, value)
    if isinstance(value, Mapping):
        return [(_name(flag, k), path(flag, v)) for k, v in value.items()]
    if not isinstance(value, Iterable):
        raise PtqUsageError(f"{flag}: {_shown(value)} is not a path or a list of paths")
    return [(None if item[0] is None else _name(flag, item[0]), path(flag, item[1]))
            if isinstance(item, tuple) and len(item) == 2 else path(flag, item)
            for item in value]


def names(flag: str, value: Any) -> str | list[str] | None:
    """Comma-separated names as a str, or a list of str."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (bytes, Mapping)) or not isinstance(value, Iterable):
        raise PtqUsageError(f"{flag}: {_shown(value)} is not a name or a list of names (str)")
    return [_name(flag, item) for item in value]


def shapes(flag: str, value: Any) -> Any:
    """`name:d0,d1;...` as a str, (name, dims) pairs, or a mapping of input name to dims."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        value = list(value.items())
    if isinstance(value, bytes) or not isinstance(value, Iterable):
        raise PtqUsageError(f"{flag}: {_shown(value)} is not a shape (name:d0,d1,...;... or a "
                            "mapping of input name to dimensions)")
    return [(_name(flag, item[0]), item[1]) if isinstance(item, tuple) and len(item) == 2
            else item for item in value]


def _name(flag: str, value: Any) -> str:
    if not isinstance(value, str):
        raise PtqUsageError(f"{flag}: {_shown(value)} is not a name (str)")
    return value


def _shown(value: Any) -> str:
    """`value`'s repr, or its type where the repr would make a long line."""
    text = repr(value)
    return text if len(text) <= 60 else f"a {type(value).__name__}"


def known_keywords(function: str, given: Iterable[str], accepted: Iterable[str]) -> None:
    """Refuse a keyword `function` does not take, suggesting the nearest one it does (a flag's
    spelling, bitNum, is matched as bit_num)."""
    accepted = list(accepted)
    for keyword in given:
        if keyword in accepted:
            continue
        snake = re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", keyword).lower().lstrip("-")
        near = ([snake] if snake in accepted else
                difflib.get_close_matches(snake, accepted, n=1, cutoff=0.6))
        hint = f"; did you mean {near[0]!r}?" if near else f"; allowed: {', '.join(accepted)}"
        raise PtqUsageError(f"{function}: unknown keyword {keyword!r}{hint}")


# The keyword a converter flag is, where its name is not the flag's in snake case.
_FLAG_KEYWORDS = {"--cosineDistanceThreshold": "cosine_threshold"}


def as_keywords(message: str, keywords: Iterable[str]) -> str:
    """`message` with each converter flag (--bitNum) written as the keyword a Python caller
    gave (bit_num)."""
    flags = {"--" + re.sub(r"_([a-z0-9])", lambda m: m.group(1).upper(), k): k
             for k in keywords}
    flags.update({f: k for f, k in _FLAG_KEYWORDS.items() if k in flags.values()})
    pattern = re.compile("(?:" + "|".join(re.escape(f) for f in sorted(flags, key=len,
                                                                         reverse=True))
                         + r")(?![A-Za-z0-9])")
    # "--inputShape / input_shape" (the flag or the config key) reads as the keyword alone.
    named = pattern.sub(lambda m: flags[m.group(0)], message)
    keywords = "|".join(re.escape(k) for k in flags.values())
    return re.sub(rf"(?<![A-Za-z0-9_])({keywords}) / \1(?![A-Za-z0-9_])", r"\1", named)

