"""Parsers for the values that flags, config files and the benchmark share.

Each parser takes the text as typed (or a Python value) and returns the checked value, or
raises `Invalid` whose message says what is wrong and what is allowed, without saying where
the value came from: the caller prefixes `--flag: ` or `file:line: [section] key: `.
"""

from __future__ import annotations

import configparser
import numbers
import re
from collections.abc import Iterable, Sequence
from enum import Enum


class Invalid(ValueError):
    """A value that does not parse; the message is the tail of a one-line error."""


# --- numbers and booleans ------------------------------------------------------------------------

_INT = re.compile(r"[+-]?[0-9]+")


def allowed_range(low: int | float, high: int | float | None) -> str:
    def shown(bound: int | float) -> str:  # integer bounds in full (1048576, not 1.04858e+06)
        return str(bound) if isinstance(bound, int) else f"{bound:g}"

    if high is None:
        return f">= {shown(low)}"
    return shown(low) if low == high else f"[{shown(low)}, {shown(high)}]"


def integer(value: str | int, low: int, high: int | None = None) -> int:
    """A base-10 integer in [low, high] (no upper bound when `high` is None)."""
    allowed = allowed_range(low, high)
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = int(value)  # numpy's integers too
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise Invalid(f"{value!r} is not an integer; allowed: {allowed}")
    text = str(value).strip()
    if not _INT.fullmatch(text):
        raise Invalid(f"{value!r} is not an integer; allowed: {allowed}")
    # Far out of range; int() would also refuse more than 4300 digits.
    if len(text.lstrip("+-").lstrip("0")) > 18:
        raise Invalid(f"{text} is too {'small' if text.startswith('-') else 'large'}; "
                      f"allowed: {allowed}")
    number = int(text, 10)
    if number < low or (high is not None and number > high):
        raise Invalid(f"{text} is out of range; allowed: {allowed}")
    return number


def real(value: str | float, low: float, high: float, open_interval: bool = False) -> float:
    """A finite number in [low, high], or in (low, high) with `open_interval`."""
    allowed = f"({low:g}, {high:g})" if open_interval else allowed_range(low, high)
    if isinstance(value, bool):
        raise Invalid(f"{value!r} is not a number; allowed: {allowed}")
    try:
        number = float(str(value).strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise Invalid(f"{value!r} is not a number; allowed: {allowed}") from None
    if not low <= number <= high or (open_interval and number in (low, high)):  # and nan
        raise Invalid(f"{str(value).strip()} is out of range; allowed: {allowed}")
    return number


def reals(value: str | Sequence[str | float], low: float, high: float,
          counts: tuple[int, ...] = (1, 3)) -> tuple[float, ...]:
    """MindSpore's vectors: `[127.5, 127.5, 127.5]` (brackets optional, or a list), each in
    [low, high], as many as one of `counts`."""
    allowed = f"[v1, ...] with {' or '.join(map(str, counts))} numbers in " \
              f"{allowed_range(low, high)}"
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("[") and text.endswith("]"):
            text = text[1:-1]
        parts: list = items(text, allowed=allowed)
    else:
        parts = list(value)
    if len(parts) not in counts:
        raise Invalid(f"{len(parts)} numbers given; allowed: {allowed}")
    found = []
    for part in parts:
        try:
            found.append(real(part, low, high))
        except Invalid:
            raise Invalid(f"{str(part).strip()!r} is not a number in "
                          f"{allowed_range(low, high)}; allowed: {allowed}") from None
    return tuple(found)


def open_real(value: str | float, low: float, high: float) -> float:
    """A finite number strictly inside (low, high)."""
    allowed = f"({low:g}, {high:g}), bounds excluded"
    try:
        number = real(value, low, high)
    except Invalid as exc:
        raise Invalid(str(exc).rsplit("; allowed: ", 1)[0] + f"; allowed: {allowed}") from None
    if number in (low, high):
        raise Invalid(f"{str(value).strip()} is out of range; allowed: {allowed}")
    return number


BLOCK_SIZE_ALLOWED = "0 (per channel) or a power of two >= 16"


def block_size(value: str | int) -> int:
    """0, or a power of two of at least 16 (onnxruntime fuses no other block into
    MatMulNBits, docs/reference.md §6)."""
    try:
        number = integer(value, 0, 1 << 20)
    except Invalid as exc:  # the rule, not only the bounds
        raise Invalid(f"{str(exc).split('; allowed')[0]}; allowed: {BLOCK_SIZE_ALLOWED}, at "
                      f"most {1 << 20}") from None
    if number and (number < 16 or number & (number - 1)):
        raise Invalid(f"{number} is not allowed; allowed: {BLOCK_SIZE_ALLOWED}")
    return number


BOOLEAN_ALLOWED = "true, false (also 1/0, yes/no, on/off)"


def boolean(value: str | bool, strict: bool = False) -> bool:
    """true/false in any case; also 1/0, yes/no, on/off unless `strict` (MindSpore's flat form
    knows only `true`)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if strict:
        if text not in ("true", "false"):
            raise Invalid(f"{value!r} is not a boolean; allowed: true, false")
        return text == "true"
    found = configparser.ConfigParser.BOOLEAN_STATES.get(text)
    if found is None:
        raise Invalid(f"{value!r} is not a boolean; allowed: {BOOLEAN_ALLOWED}")
    return found


def choice(value: str, options: Sequence[str]) -> str:
    """One of `options`, in any case, underscores optional (RemovalOutlier is REMOVAL_OUTLIER)."""
    spellings = {o.upper().replace("_", ""): o for o in options}
    found = spellings.get(str(value).strip().upper().replace("_", ""))
    if found is None:
        raise Invalid(f"{value!r} is not supported; allowed: {', '.join(options)}")
    return found


# --- lists ---------------------------------------------------------------------------------------


def items(text: str, separator: str = ",", what: str = "item", allowed: str = "") -> list[str]:
    """`text` split at `separator`, each item stripped; a trailing separator is ignored, an
    empty item elsewhere is an error."""
    parts = [part.strip() for part in text.split(separator)]
    if len(parts) > 1 and not parts[-1]:
        parts.pop()
    for position, part in enumerate(parts, 1):
        if not part and len(parts) > 1:
            raise Invalid(f"{what} {position} of {len(parts)} is empty"
                          + (f"; allowed: {allowed}" if allowed else ""))
    return [part for part in parts if part]


def names(value: str | Iterable[str]) -> tuple[str, ...]:
    """Comma-separated names (or a list of them); empty items are dropped, order kept, once."""
    parts = value.split(",") if isinstance(value, str) else list(value)
    return tuple(dict.fromkeys(str(p).strip() for p in parts if str(p).strip()))


NAME_DIRS_ALLOWED = "name:dir[,name:dir...] with the input name before the last ':'"
DIRS_ALLOWED = "dir[,dir...], one directory per model input, in input order"


def name_dirs(
    value: str | Iterable[str | tuple[str | None, str]], positional: bool = False,
) -> tuple[tuple[str | None, str], ...]:
    """`name:dir,name2:dir2` pairs, each item split at its LAST ':' (input names may hold ':',
    directories may not), as MindSpore's calibrate_path. With `positional`, items without a
    name are directories paired with the model inputs by position (MindSpore's image_path):
    every item then has a name or none has."""
    allowed = f"{NAME_DIRS_ALLOWED}" + (f", or {DIRS_ALLOWED}" if positional else "")
    raw = items(value, allowed=allowed) if isinstance(value, str) else list(value)
    pairs: list[tuple[str | None, str]] = []
    for item in raw:
        if isinstance(item, tuple):
            name, directory = item
            pairs.append((None if name is None else str(name).strip(), str(directory).strip()))
            continue
        text = str(item).strip()
        name, colon, directory = text.rpartition(":")
        if not colon:
            if not positional:
                raise Invalid(f"{text!r} has no input name; expected name:dir (e.g. "
                              "input:calib/input), items separated by ','")
            pairs.append((None, text))
            continue
        pairs.append((name.strip(), directory.strip()))
    if not pairs:
        raise Invalid(f"no directory given; allowed: {allowed}")
    named = [name is not None for name, _ in pairs]
    if any(named) and not all(named):
        raise Invalid("some directories are named by input and some are not; name every one "
                      "(input:dir) or none")
    seen: set[str] = set()
    for name, directory in pairs:
        if name is not None and not name:
            raise Invalid(f"empty input name before {directory!r}; allowed: {allowed}")
        if not directory:
            raise Invalid(f"empty directory for input {name!r}; allowed: {allowed}")
        if name is not None:
            if name in seen:
                raise Invalid(f"input {name!r} given twice; each input has one directory")
            seen.add(name)
    return tuple(pairs)


SHAPES_ALLOWED = "name:d0,d1,...[;name:d0,d1,...] with every dimension a positive integer"
_DIM = re.compile(r"\+?[0-9]{1,18}")


def dims(value: str | Iterable[str | int], name: str) -> tuple[int, ...]:
    """Positive dimensions `1,3,224,224` (or a list) of input `name`."""
    if not isinstance(value, (str, Iterable)) or isinstance(value, bytes):
        raise Invalid(f"input {name!r}: {value!r} is not a list of dimensions; allowed: "
                      f"{SHAPES_ALLOWED}")
    parts = value.split(",") if isinstance(value, str) else list(value)
    texts = [str(p).strip() for p in parts]
    if texts in ([""], []):
        raise Invalid(f"input {name!r} has no dimensions; allowed: {SHAPES_ALLOWED}")
    shape = []
    for text in texts:
        if not _DIM.fullmatch(text) or int(text) < 1:
            raise Invalid(f"input {name!r}: dimension {text!r} is not a positive integer; "
                          f"allowed: {SHAPES_ALLOWED}")
        shape.append(int(text))
    return tuple(shape)


def shapes(
    value: str | Iterable[str | tuple[str, str | Iterable[str | int]]],
) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """MindSpore's `--inputShape`: `name:1,3,224,224;name2:1,64`, each entry split at its LAST
    ':' (names such as `x:0` work); empty entries (a trailing ';') are skipped."""
    raw = value.split(";") if isinstance(value, str) else list(value)
    result: list[tuple[str, tuple[int, ...]]] = []
    for entry in raw:
        if isinstance(entry, tuple):
            name, given = str(entry[0]).strip(), entry[1]
        else:
            text = str(entry).strip()
            if not text:
                continue
            name, colon, given = text.rpartition(":")
            name = name.strip()
            if not colon or not name:
                raise Invalid(f"{text!r} has no input name; expected name:d0,d1,... "
                              "(e.g. input:1,3,8,8)")
        if not name:
            raise Invalid(f"empty input name; allowed: {SHAPES_ALLOWED}")
        if any(name == seen for seen, _ in result):
            raise Invalid(f"input {name!r} given twice")
        result.append((name, dims(given if given is not None else "", name)))
    if not result:
        raise Invalid(f"no input given; allowed: {SHAPES_ALLOWED}")
    return tuple(result)


# --- the quantization type -----------------------------------------------------------------------


class QuantType(str, Enum):
    WEIGHT_QUANT = "WeightQuant"
    POST_TRAINING = "PostTraining"
    DYNAMIC_QUANT = "DynamicQuant"


# MindSpore's config spellings (WEIGHT_QUANT, FULL_QUANT, DYNAMIC_QUANT) and the flags'
# (WeightQuant, PostTraining, DynamicQuant) are accepted everywhere, in any case, underscores
# optional.
_QUANT_TYPES = {
    "WEIGHTQUANT": QuantType.WEIGHT_QUANT,
    "FULLQUANT": QuantType.POST_TRAINING,
    "POSTTRAINING": QuantType.POST_TRAINING,
    "DYNAMICQUANT": QuantType.DYNAMIC_QUANT,
}
QUANT_TYPE_ALLOWED = ("WeightQuant, PostTraining, DynamicQuant (MindSpore: WEIGHT_QUANT, "
                      "FULL_QUANT, DYNAMIC_QUANT)")


def quant_type(value: str | QuantType) -> QuantType:
    if isinstance(value, QuantType):
        return value
    key = str(value).strip().upper().replace("_", "")
    if key not in _QUANT_TYPES:
        raise Invalid(f"{value!r} is not supported; allowed: {QUANT_TYPE_ALLOWED}")
    return _QUANT_TYPES[key]


# --- data layout ---------------------------------------------------------------------------------

DATA_FORMATS = ("NHWC", "NCHW")


def data_format(value: str) -> str:
    """MindSpore's `--inputDataFormat`: NHWC or NCHW, any case."""
    return choice(value, DATA_FORMATS)


POSITIONAL_SHAPES_ALLOWED = "d0,d1,...[:d0,d1,...], one shape per model input in input order"


def positional_shapes(value: str) -> tuple[tuple[int, ...], ...]:
    """MindSpore benchmark's `--inputShapes`: `1,3,224,224:1,64`, one shape per model input, by
    position (its own `:`-separated form, not the converter's named `--inputShape`)."""
    parts = items(str(value), ":", what="shape", allowed=POSITIONAL_SHAPES_ALLOWED)
    if not parts:
        raise Invalid(f"no shape given; allowed: {POSITIONAL_SHAPES_ALLOWED}")
    return tuple(dims(part, f"#{index}") for index, part in enumerate(parts, 1))
