"""Flags and config -> one frozen settings object per mode; every usage error is raised here.

Precedence, resolved once: a value given as a flag (or Python argument) wins over the config
file, which wins over the default below. Nothing after this module reads the raw config.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ptqconv import target as target_module
from ptqconv import values
from ptqconv.config import QuantConfig, load_config
from ptqconv.errors import PtqUsageError, shown
from ptqconv.files import input_file
from ptqconv.target import Target
from ptqconv.values import QuantType

T = TypeVar("T")

# docs/reference.md §1: --bitNum ranges (0: mixed bit, docs/reference.md §5).
BIT_RANGE = {QuantType.WEIGHT_QUANT: (0, 16), QuantType.POST_TRAINING: (1, 8)}
SUPPORTED_FMK = ("ONNX",)
# MindSpore's defaults (docs/reference.md §1), then ptqconv's own for the keys MindSpore lacks.
DEFAULT_BIT_NUM = 8
DEFAULT_QUANT_WEIGHT_SIZE = 0
DEFAULT_QUANT_WEIGHT_CHANNEL = 16
DEFAULT_CALIBRATE_SIZE = 100
# With no method in the config, ptqconv measures which suits the model (post_training).
AUTO = "AUTO"
# docs/reference.md §5: MindSpore's mixed-bit defaults.
DEFAULT_INIT_SCALE = 0.02
DEFAULT_MAX_ITERATIONS = 40
DEFAULT_THREADS = 1
# Everything, when eval_size is not given.
ALL_SAMPLES = 2**31


@dataclass(frozen=True)
class DataSource:
    """Where samples come from: `.bin` directories paired with model inputs (by name, or by
    position when every name is None), the first `size` files of each, and the shapes of
    dynamic inputs. `what` starts every message about them."""

    paths: tuple[tuple[str | None, Path], ...]
    size: int
    shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()
    what: str = "calibration data"


@dataclass(frozen=True)
class MixedBitSettings:
    """`--bitNum=0`: each layer's bits from MindSpore's relative-error target."""

    init_scale: float = DEFAULT_INIT_SCALE
    auto_tune: bool = False  # search init_scale for an output cosine of about 0.995
    max_iterations: int = DEFAULT_MAX_ITERATIONS


@dataclass(frozen=True)
class WeightQuantSettings:
    bit_num: int  # 0: mixed bit
    min_size: int  # quantize a weight only when it has more elements than this
    min_channel: int  # ... and, for convs, more output channels than this
    skip: tuple[str, ...] = ()  # node names or op types kept float
    per_channel: bool = True
    # MindSpore's var/mean weight correction (and, with calibration data, the mean output
    # shift into Conv/Gemm biases). Off unless asked: MindSpore's default is on.
    bias_correction: bool = False
    quant_strategy: str = "MAX_MIN"  # or "GPTQ" (needs calibration)
    mixed_bit: MixedBitSettings | None = None  # with bit_num 0
    block_size: int = 0  # MatMul/Gemm/Gather weights in blocks of this many (0: per channel)
    calibration: DataSource | None = None
    threads: int = DEFAULT_THREADS


@dataclass(frozen=True)
class PostTrainingSettings:
    bit_num: int  # weights
    activation_bits: int
    method: str  # activation range method, one of calibrate.observers.OBSERVERS, or AUTO
    calibration: DataSource
    # The CPU the model will run on; reduce_range follows it unless the config sets it.
    target: Target
    # None: measured on the calibration data (post_training); a value forces it.
    bias_correction: bool | None = None
    per_channel: bool = True
    # 7-bit weights for the GEMM kernels: U8S8 int16 saturation on x86 without VNNI.
    reduce_range: bool = True
    smooth_quant: bool | None = None
    equalize: bool | None = None
    quant_strategy: str = "MAX_MIN"  # how weights are rounded: MAX_MIN (nearest) or GPTQ
    threads: int = DEFAULT_THREADS
    skip: tuple[str, ...] = ()
    debug_dir: Path | None = None  # per-layer report
    sensitivity: bool = False  # rank node units by the error each causes alone


@dataclass(frozen=True)
class GateSettings:
    """The accuracy gate run on held-out samples after the model is written."""

    data: DataSource
    accuracy_threshold: float | None  # percent mean bias (MindSpore's benchmark)
    cosine_threshold: float | None
    threads: int = DEFAULT_THREADS


@dataclass(frozen=True)
class ConvertSettings:
    """Everything one conversion needs, checked. Build it with `ConvertSettings.create`."""

    model_file: Path
    output_file: Path
    quant_type: QuantType
    mode: WeightQuantSettings | PostTrainingSettings
    gate: GateSettings | None = None

    @property
    def bit_num(self) -> int:
        return self.mode.bit_num

    @classmethod
    def create(
        cls,
        model_file: str | os.PathLike | None,
        output_file: str | os.PathLike | None,
        quant_type: str | QuantType | None = None,
        bit_num: int | str | None = None,
        quant_weight_size: int | str | None = None,
        quant_weight_channel: int | str | None = None,
        config_file: str | os.PathLike | None = None,
        skip_quant_node: str | Iterable[str] | None = None,
        fmk: str | None = None,
        input_shape: str | None = None,
        debug_dir: str | os.PathLike | None = None,
        accuracy_threshold: float | str | None = None,
        cosine_threshold: float | str | None = None,
        sensitivity: bool = False,
    ) -> ConvertSettings:
        """Check raw values (strings from the command line, or Python values; None: not
        given) and resolve them against the config file and the defaults."""
        if fmk is not None and str(fmk).strip().upper() not in SUPPORTED_FMK:
            raise PtqUsageError(f"--fmk: {fmk!r} is not supported; allowed: ONNX")
        config_path = None if config_file is None else input_file("--configFile", config_file)
        config = None if config_path is None else load_config(config_path)
        pick = _Picker(config)
        qtype = pick.one("--quantType", quant_type, "quant_type", values.quant_type, None)
        if qtype is None:
            raise PtqUsageError(f"--quantType is required; allowed: {values.QUANT_TYPE_ALLOWED}")
        model = input_file("--modelFile", model_file)
        output = _output_file(output_file, model)
        low, high = BIT_RANGE[qtype]
        bits = pick.one("--bitNum", bit_num, "bit_num",
                        lambda v: values.integer(v, low, high), DEFAULT_BIT_NUM,
                        f" for {qtype.value}")
        shapes = dict(pick.config("input_shape") or ())
        if input_shape:
            shapes.update(_flag("--inputShape", input_shape, values.shapes))
        skip = values.names([*values.names(skip_quant_node or ()),
                             *(pick.config("skip_quant_node") or ())])
        threads = pick.config("thread_num") or DEFAULT_THREADS
        mode: WeightQuantSettings | PostTrainingSettings
        if qtype is QuantType.WEIGHT_QUANT:
            mode = _weight_quant(
                pick, bits,
                pick.one("--quantWeightSize", quant_weight_size, "min_quant_weight_size",
                         lambda v: values.integer(v, 0), DEFAULT_QUANT_WEIGHT_SIZE),
                pick.one("--quantWeightChannel", quant_weight_channel,
                         "min_quant_weight_channel", lambda v: values.integer(v, 0),
                         DEFAULT_QUANT_WEIGHT_CHANNEL),
                skip, threads, tuple(shapes.items()))
        else:
            mode = _post_training(pick, bits, skip, threads, tuple(shapes.items()), debug_dir,
                                  sensitivity)
        gate = _gate(pick, accuracy_threshold, cosine_threshold, tuple(shapes.items()), threads)
        return cls(model, output, qtype, mode, gate)


def _weight_quant(pick: _Picker, bits: int, min_size: int, min_channel: int,
                  skip: tuple[str, ...], threads: int,
                  shapes: tuple[tuple[str, tuple[int, ...]], ...]) -> WeightQuantSettings:
    config = pick.source
    mixed_keys = [k for k in ("init_scale", "auto_tune", "max_iterations")
                  if pick.config(k) is not None]
    if mixed_keys and bits != 0:
        assert config is not None
        raise PtqUsageError(f"{config.where(mixed_keys[0])}: applies only to mixed bit "
                            f"(bit_num=0), not to {bits} bits")
    mixed = MixedBitSettings(
        pick.config("init_scale") or DEFAULT_INIT_SCALE, bool(pick.config("auto_tune")),
        pick.config("max_iterations") or DEFAULT_MAX_ITERATIONS) if bits == 0 else None
    per_channel = pick.switch("weight_per_channel", True)
    block = pick.config("block_size") or 0
    if block and not per_channel:
        assert config is not None
        raise PtqUsageError(f"{config.where('block_size')}: blocks need per_channel=true "
                            "(per_channel=false asks for one scale per weight)")
    strategy = pick.config("weight_quant_strategy") or "MAX_MIN"
    paths = pick.config("calibrate_path")
    calibration = (DataSource(paths, pick.config("calibrate_size") or DEFAULT_CALIBRATE_SIZE,
                              shapes) if paths else None)
    for needs, key in ((strategy == "GPTQ", "weight_quant_strategy"),
                       (mixed is not None and mixed.auto_tune, "auto_tune")):
        if needs and calibration is None:
            assert config is not None
            raise PtqUsageError(f"{config.where(key)}: needs calibration data: set "
                                "calibrate_path in [data_preprocess_param]")
    return WeightQuantSettings(
        bits, min_size, min_channel, skip,
        per_channel=per_channel,
        bias_correction=pick.switch("weight_bias_correction", False),
        quant_strategy=strategy,
        mixed_bit=mixed,
        block_size=block,
        calibration=calibration,
        threads=threads)


def _post_training(pick: _Picker, bits: int, skip: tuple[str, ...], threads: int,
                   shapes: tuple[tuple[str, tuple[int, ...]], ...],
                   debug_dir: str | os.PathLike | None, sensitivity: bool,
                   ) -> PostTrainingSettings:
    config = pick.source
    if config is None:
        raise PtqUsageError("--configFile is required for --quantType=PostTraining")
    paths = config.calibrate_path
    if not paths:
        raise PtqUsageError(
            f"{config.source}: no calibration data: set calibrate_path in "
            "[data_preprocess_param] (or image_path in the flat form)")
    device = target_module.resolve(pick.config("target_device") or "auto")
    debug = Path(debug_dir) if debug_dir else config.debug_info_save_path
    if debug is not None and debug.exists() and not debug.is_dir():
        raise PtqUsageError(f"--debugDir: not a directory: {shown(debug)}")
    return PostTrainingSettings(
        bit_num=bits,
        activation_bits=pick.config("activation_bit_num") or bits,
        method=pick.config("activation_quant_method") or AUTO,
        calibration=DataSource(paths, pick.config("calibrate_size") or DEFAULT_CALIBRATE_SIZE,
                               shapes),
        bias_correction=pick.config("bias_correction"),
        per_channel=pick.switch("per_channel", True),
        target=device,
        reduce_range=pick.switch("reduce_range", device.saturates),
        smooth_quant=pick.config("smooth_quant"),
        equalize=pick.config("equalize"),
        quant_strategy=pick.config("quant_strategy") or "MAX_MIN",
        threads=threads,
        skip=skip,
        debug_dir=debug,
        sensitivity=bool(sensitivity),
    )


def _gate(pick: _Picker, accuracy: float | str | None, cosine: float | str | None,
          shapes: tuple[tuple[str, tuple[int, ...]], ...], threads: int) -> GateSettings | None:
    accuracy = pick.one("--accuracyThreshold", accuracy, "accuracy_threshold",
                        lambda v: values.real(v, 0.0, 1e6), None)
    cosine = pick.one("--cosineDistanceThreshold", cosine, "cosine_threshold",
                      lambda v: values.real(v, -1.0, 1.0), None)
    if accuracy is None and cosine is None:
        return None
    paths = pick.config("eval_path")
    if not paths:
        raise PtqUsageError(
            "--accuracyThreshold needs held-out data: set eval_path in [evaluate_param] "
            "of the config (name:dir like calibrate_path)")
    data = DataSource(paths, pick.config("eval_size") or ALL_SAMPLES, shapes, "eval data")
    return GateSettings(data, accuracy, cosine, threads)


class _Picker:
    """Flag > config > default for one config file (or none)."""

    def __init__(self, source: QuantConfig | None) -> None:
        self.source = source

    def config(self, key: str) -> Any:
        return None if self.source is None else getattr(self.source, key)

    def one(self, flag: str, given: Any, key: str, parse: Callable[[Any], T],
            default: T, where: str = "") -> T:
        if given is not None and not (isinstance(given, str) and not given.strip()):
            return _flag(flag, given, parse, where)
        found = self.config(key)
        if found is None:
            return default
        try:  # the config's value is checked again where the mode narrows its range
            return parse(found)
        except values.Invalid as exc:
            assert self.source is not None
            raise PtqUsageError(f"{self.source.where(key)}: {exc}{where}") from None

    def switch(self, key: str, default: bool) -> bool:
        found = self.config(key)
        return default if found is None else found


def _flag(flag: str, given: Any, parse: Callable[[Any], T], where: str = "") -> T:
    try:
        return parse(given)
    except values.Invalid as exc:
        raise PtqUsageError(f"{flag}: {exc}{where}") from None


def _output_file(value: str | os.PathLike | None, model: Path) -> Path:
    if value is None or str(value) == "":
        raise PtqUsageError("--outputFile is required")
    path = Path(value)
    parent = path.parent
    if not parent.is_dir():
        raise PtqUsageError(f"--outputFile: directory does not exist: {shown(parent)}")
    if path.is_dir():
        raise PtqUsageError(f"--outputFile: is a directory: {shown(path)}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PtqUsageError(f"--outputFile: directory is not writable: {shown(parent)}")
    if path.resolve() == model.resolve():
        raise PtqUsageError(f"--outputFile: must differ from --modelFile ({shown(path)})")
    return path
