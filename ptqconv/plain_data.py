"""Figures as JSON-ready data: what `ConversionReport.to_dict` returns, for callers that store
or compare reports (`json.dumps(report.to_dict(), allow_nan=False)` works)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from enum import Enum
from pathlib import PurePath
from typing import Any

import numpy as np


def plain(value: Any) -> Any:
    """`value` with dataclasses as dicts of their fields, paths as str, enums as their value
    (str enums) or name, sets sorted, numpy arrays and scalars as lists and numbers, NaN as
    None and infinities as "inf" / "-inf" (the benchmark report's convention). Objects with a
    `result()` (output comparisons) give its figures; anything else its str."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Enum):
        return value.value if isinstance(value.value, str) else value.name
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, np.ndarray):
        return plain(value.tolist())
    if isinstance(value, np.generic):
        return plain(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None if math.isnan(value) else (
            "inf" if value > 0 else "-inf")
    if value is None or isinstance(value, (str, int)):
        return value
    if isinstance(value, Mapping):
        return {str(plain(k)): plain(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted((plain(v) for v in value), key=str)
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if callable(getattr(value, "result", None)):
        return plain(value.result())
    return str(value)
