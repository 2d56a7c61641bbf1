"""Flags -> one validated, immutable options object; every usage error is raised here."""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from ptqconv.errors import PtqUsageError


class QuantType(str, Enum):
    WEIGHT_QUANT = "WeightQuant"
    POST_TRAINING = "PostTraining"


# MindSpore r1.5+ config spellings are accepted on the command line too.
_QUANT_TYPE_ALIASES = {
    "weightquant": QuantType.WEIGHT_QUANT,
    "weight_quant": QuantType.WEIGHT_QUANT,
    "posttraining": QuantType.POST_TRAINING,
    "full_quant": QuantType.POST_TRAINING,
}
# REFERENCE.md §1: --bitNum ranges.
BIT_RANGE = {QuantType.WEIGHT_QUANT: (1, 16), QuantType.POST_TRAINING: (1, 8)}
SUPPORTED_FMK = ("ONNX",)


@dataclass(frozen=True)
class ConvertOptions:
    """Everything a conversion needs, checked. Build it with `ConvertOptions.create`."""

    model_file: Path
    output_file: Path
    quant_type: QuantType
    bit_num: int = 8
    quant_weight_size: int = 0
    quant_weight_channel: int = 16
    config_file: Path | None = None
    skip_quant_node: tuple[str, ...] = ()

    @classmethod
    def create(
        cls,
        model_file: str | os.PathLike | None,
        output_file: str | os.PathLike | None,
        quant_type: str | QuantType | None,
        bit_num: int | str | None = None,
        quant_weight_size: int | str | None = None,
        quant_weight_channel: int | str | None = None,
        config_file: str | os.PathLike | None = None,
        skip_quant_node: str | tuple[str, ...] | list[str] | None = None,
        fmk: str | None = None,
    ) -> ConvertOptions:
        """Validate raw values (strings from the command line, or Python values)."""
        if fmk is not None and str(fmk).upper() not in SUPPORTED_FMK:
            raise PtqUsageError(f"--fmk: {fmk!r} is not supported; allowed: ONNX")
        qtype = parse_quant_type(quant_type)
        model = _input_file("--modelFile", model_file)
        output = _output_file(output_file, model)
        low, high = BIT_RANGE[qtype]
        bits = 8 if bit_num is None else _int("--bitNum", bit_num, low, high, f" for {qtype.value}")
        size = 0 if quant_weight_size is None else _int("--quantWeightSize", quant_weight_size, 0)
        channel = (
            16
            if quant_weight_channel is None
            else _int("--quantWeightChannel", quant_weight_channel, 0)
        )
        config = None if config_file is None else _input_file("--configFile", config_file)
        if qtype is QuantType.POST_TRAINING and config is None:
            raise PtqUsageError("--configFile is required for --quantType=PostTraining")
        return cls(model, output, qtype, bits, size, channel, config, _names(skip_quant_node))


def parse_quant_type(value: str | QuantType | None) -> QuantType:
    allowed = ", ".join(q.value for q in QuantType)
    if value is None:
        raise PtqUsageError(f"--quantType is required; allowed: {allowed}")
    if isinstance(value, QuantType):
        return value
    found = _QUANT_TYPE_ALIASES.get(str(value).strip().lower())
    if found is None:
        raise PtqUsageError(f"--quantType: {value!r} is not supported; allowed: {allowed}")
    return found


def _int(flag: str, value: int | str, low: int, high: int | None = None, where: str = "") -> int:
    allowed = f"[{low}, {high}]" if high is not None else f">= {low}"
    try:
        number = int(str(value).strip(), 10) if not isinstance(value, int) else value
    except ValueError:
        raise PtqUsageError(
            f"{flag}: {value!r} is not an integer; allowed: {allowed}{where}"
        ) from None
    if isinstance(value, bool) or number < low or (high is not None and number > high):
        raise PtqUsageError(f"{flag}: {value} is out of range; allowed: {allowed}{where}")
    return number


def _input_file(flag: str, value: str | os.PathLike | None) -> Path:
    if value is None or str(value) == "":
        raise PtqUsageError(f"{flag} is required")
    path = Path(value)
    if not path.exists():
        raise PtqUsageError(f"{flag}: no such file: {path}")
    if path.is_dir():
        raise PtqUsageError(f"{flag}: is a directory, not a file: {path}")
    if not os.access(path, os.R_OK):
        raise PtqUsageError(f"{flag}: permission denied: {path}")
    return path


def _output_file(value: str | os.PathLike | None, model: Path) -> Path:
    if value is None or str(value) == "":
        raise PtqUsageError("--outputFile is required")
    path = Path(value)
    parent = path.parent
    if not parent.is_dir():
        raise PtqUsageError(f"--outputFile: directory does not exist: {parent}")
    if path.is_dir():
        raise PtqUsageError(f"--outputFile: is a directory: {path}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PtqUsageError(f"--outputFile: directory is not writable: {parent}")
    if path.resolve() == model.resolve():
        raise PtqUsageError(f"--outputFile: must differ from --modelFile ({path})")
    return path


def _names(value: str | tuple[str, ...] | list[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else value
    return tuple(n.strip() for n in items if n.strip())
