"""Checks on the files a run reads and writes, made before any work starts."""

from __future__ import annotations

import os
from pathlib import Path

from ptqconv.errors import PtqUsageError, shown


def input_file(flag: str, value: str | os.PathLike | None) -> Path:
    """`value` as a readable file given with `flag`, or the usage error naming what is wrong."""
    if value is None or str(value) == "" or (isinstance(value, (list, tuple)) and not value):
        raise PtqUsageError(f"{flag} is required")
    path = Path(value)
    if not path.exists():
        raise PtqUsageError(f"{flag}: no such file: {shown(path)}")
    if path.is_dir():
        raise PtqUsageError(f"{flag}: is a directory, not a file: {shown(path)}")
    if not os.access(path, os.R_OK):
        raise PtqUsageError(f"{flag}: permission denied: {shown(path)}")
    return path
