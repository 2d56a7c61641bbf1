"""Flags -> one validated, immutable options object; every usage error is raised here."""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

from ptqconv.calibrate.dataset import parse_input_shape
from ptqconv.errors import PtqUsageError, shown

if TYPE_CHECKING:
    from ptqconv.config import QuantConfig


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
    """Everything a conversion needs, checked. Build it with `ConvertOptions.create`.

    Values given on the command line win over the config file, which wins over defaults.
    """

    model_file: Path
    output_file: Path
    quant_type: QuantType
    bit_num: int = 8
    quant_weight_size: int = 0
    quant_weight_channel: int = 16
    config_file: Path | None = None
    skip_quant_node: tuple[str, ...] = ()
    config: QuantConfig | None = None
    input_shape: tuple[tuple[str, tuple[int, ...]], ...] = ()
    debug_dir: Path | None = None  # per-layer report (PostTraining)
    accuracy_threshold: float | None = None  # percent mean bias on eval data (the gate)
    cosine_threshold: float | None = None
    sensitivity: bool = False  # rank node units by the error each causes alone

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
        input_shape: str | None = None,
        debug_dir: str | os.PathLike | None = None,
        accuracy_threshold: float | str | None = None,
        cosine_threshold: float | str | None = None,
        sensitivity: bool = False,
    ) -> ConvertOptions:
        """Validate raw values (strings from the command line, or Python values)."""
        from ptqconv.config import load_config  # config uses QuantType from this module

        if fmk is not None and str(fmk).upper() not in SUPPORTED_FMK:
            raise PtqUsageError(f"--fmk: {fmk!r} is not supported; allowed: ONNX")
        config_path = None if config_file is None else input_file("--configFile", config_file)
        config = None if config_path is None else load_config(config_path)
        if quant_type is None and config is not None and config.quant_type is not None:
            quant_type = config.quant_type
        qtype = parse_quant_type(quant_type)
        model = input_file("--modelFile", model_file)
        output = _output_file(output_file, model)
        low, high = BIT_RANGE[qtype]
        where = f" for {qtype.value}"
        if bit_num is not None:
            bits = _int("--bitNum", bit_num, low, high, where)
        elif config is not None and config.bit_num is not None:
            bits = _int(f"{config.line_of('bit_num')}: bit_num", config.bit_num, low, high, where)
        else:
            bits = 8
        size = _pick("--quantWeightSize", quant_weight_size,
                     config and config.min_quant_weight_size, 0)
        channel = _pick("--quantWeightChannel", quant_weight_channel,
                        config and config.min_quant_weight_channel, 16)
        if qtype is QuantType.POST_TRAINING:
            if config is None:
                raise PtqUsageError("--configFile is required for --quantType=PostTraining")
            if not config.calibrate_path:
                raise PtqUsageError(
                    f"{config.source}: no calibration data: set calibrate_path in "
                    "[data_preprocess_param] (or image_path in the flat form)")
        shapes = dict(config.input_shape) if config is not None else {}
        if input_shape:
            shapes.update(parse_input_shape(input_shape))
        skip = _names(skip_quant_node) + (config.skip_quant_node if config else ())
        debug = Path(debug_dir) if debug_dir else (config.debug_info_save_path if config
                                                   else None)
        if debug is not None and debug.exists() and not debug.is_dir():
            raise PtqUsageError(f"--debugDir: not a directory: {debug}")
        accuracy = (_real("--accuracyThreshold", accuracy_threshold, 0.0, 1e6)
                    if accuracy_threshold is not None
                    else (config.accuracy_threshold if config else None))
        cosine = (_real("--cosineDistanceThreshold", cosine_threshold, -1.0, 1.0)
                  if cosine_threshold is not None else (config.cosine_threshold if config
                                                        else None))
        if (accuracy is not None or cosine is not None) and not (config and config.eval_path):
            raise PtqUsageError(
                "--accuracyThreshold needs held-out data: set eval_path in [evaluate_param] "
                "of the config (name:dir like calibrate_path)")
        return cls(model, output, qtype, bits, size, channel, config_path,
                   tuple(dict.fromkeys(skip)), config, tuple(shapes.items()), debug, accuracy,
                   cosine, bool(sensitivity) and qtype is QuantType.POST_TRAINING)


def _pick(flag: str, value: int | str | None, from_config: int | None, default: int) -> int:
    if value is not None:
        return _int(flag, value, 0)
    return default if from_config is None else from_config


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


def _real(flag: str, value: float | str, low: float, high: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise PtqUsageError(
            f"{flag}: {value!r} is not a number; allowed: [{low:g}, {high:g}]") from None
    if not low <= number <= high:
        raise PtqUsageError(f"{flag}: {value} is out of range; allowed: [{low:g}, {high:g}]")
    return number


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
