"""MindSpore's benchmark data file: reference outputs as text (docs/reference.md §4).

For every output tensor two lines::

    name ndims d0 ... d{ndims-1}
    v0 v1 v2 ...            (prod(d) whitespace-separated numbers, C order)

Blank lines between tensors are ignored. Stricter than MindSpore, which silently keeps the
first of duplicated names, ignores extra tokens and reads missing values as garbage: here a
duplicated name, a malformed header, a dimension that is not a positive integer, a wrong
number of values or a value that is not a number is an error naming the file and the line.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ptqconv.errors import PtqUsageError, shown


@dataclass(frozen=True)
class BenchmarkTensor:
    """One tensor of a benchmark data file: values as float32 (as MindSpore reads them)."""

    name: str
    values: np.ndarray
    line: int  # line number of its header


def read_benchmark_data(
    path: str | os.PathLike, what: str = "--benchmarkDataFile"
) -> dict[str, BenchmarkTensor]:
    """Read a MindSpore benchmark data file into ``{name: tensor}`` in file order.

    Raise PtqUsageError naming the file and line for anything malformed (see module doc).
    """
    path = Path(path)
    where = f"{what}: {shown(path)}"
    header_form = "'name ndims d0 ... dn-1'"
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except OSError as exc:
        raise PtqUsageError(f"{where}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise PtqUsageError(f"{where}: not a text file (byte {exc.start} is not UTF-8)") from None
    tensors: dict[str, BenchmarkTensor] = {}
    i = 0
    while i < len(lines):
        header = lines[i].split()
        number = i + 1
        i += 1
        if not header:
            continue
        if len(header) < 2:
            raise PtqUsageError(
                f"{where} line {number}: header {_clip(lines[number - 1])!r} has no dimension "
                f"count; expected {header_form}"
            )
        name, ndims_text, dims_text = header[0], header[1], header[2:]
        if not re.fullmatch(r"[0-9]+", ndims_text):
            raise PtqUsageError(
                f"{where} line {number}: dimension count {_clip(ndims_text)!r} of tensor "
                f"{name!r} is not a non-negative integer; expected {header_form}"
            )
        ndims = int(ndims_text)
        if len(dims_text) != ndims:
            raise PtqUsageError(
                f"{where} line {number}: tensor {name!r} has {ndims} dimensions but the header "
                f"gives {len(dims_text)} sizes; expected {header_form}"
            )
        dims = []
        for d in dims_text:
            if not re.fullmatch(r"[0-9]+", d) or int(d) == 0:
                raise PtqUsageError(
                    f"{where} line {number}: dimension {_clip(d)!r} of tensor {name!r} is not a "
                    "positive integer"
                )
            dims.append(int(d))
        if name in tensors:
            raise PtqUsageError(
                f"{where} line {number}: tensor {name!r} is given twice (first on line "
                f"{tensors[name].line})"
            )
        count = math.prod(dims)
        if i >= len(lines):
            raise PtqUsageError(
                f"{where} line {number}: tensor {name!r} has no values line (expected {count} "
                f"values on line {number + 1})"
            )
        tokens = lines[i].split()
        i += 1
        if len(tokens) != count:
            raise PtqUsageError(
                f"{where} line {number + 1}: tensor {name!r} {shape_text(dims)} needs {count} "
                f"values, the line has {len(tokens)}"
            )
        values = _parse_values(tokens, f"{where} line {number + 1}: tensor {name!r}")
        tensors[name] = BenchmarkTensor(name, values.reshape(dims), number)
    if not tensors:
        raise PtqUsageError(
            f"{where}: no tensors (expected {header_form} lines, each followed by a line of values)"
        )
    return tensors


def _parse_values(tokens: list[str], where: str) -> np.ndarray:
    try:
        values = np.array([float(token) for token in tokens], dtype=np.float64)
    except ValueError:
        k, token = next((k, t) for k, t in enumerate(tokens, 1) if not _is_number(t))
        raise PtqUsageError(f"{where}: value {k} {_clip(token)!r} is not a number") from None
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        # A reference that is NaN or infinite cannot be compared with: the model would be
        # blamed for it ("mean bias is NaN").
        k = int(bad[0])
        raise PtqUsageError(f"{where}: value {k + 1} {tokens[k]!r} is not finite; reference "
                            "outputs must be finite numbers")
    with np.errstate(over="ignore"):
        single = values.astype(np.float32)
    overflow = np.flatnonzero(np.isinf(single) & np.isfinite(values))
    if overflow.size:
        k = int(overflow[0])
        raise PtqUsageError(f"{where}: value {k + 1} {tokens[k]!r} is out of the float32 range")
    return single


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def shape_text(shape: Iterable[int]) -> str:
    return "[" + ",".join(str(int(d)) for d in shape) + "]"


def _clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
