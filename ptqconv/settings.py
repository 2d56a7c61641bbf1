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

from ptqconv import arguments, encodings, files, values
from ptqconv import target as target_module
from ptqconv.calibrate.images import ImagePreprocess, image_preprocess
from ptqconv.config import QuantConfig, load_config
from ptqconv.encodings import EncodingsFile
from ptqconv.errors import PtqUsageError
from ptqconv.target import Target
from ptqconv.values import QuantType

T = TypeVar("T")

# docs/reference.md §1: --bitNum ranges (WeightQuant 0: mixed bit, docs/reference.md §6);
# dynamic quantization is 8-bit only.
BIT_RANGE = {QuantType.WEIGHT_QUANT: (0, 16), QuantType.POST_TRAINING: (1, 8),
             QuantType.DYNAMIC_QUANT: (8, 8)}
CONFIG_BIT_RANGE = BIT_RANGE
SUPPORTED_FMK = ("ONNX",)
# MindSpore's defaults (docs/reference.md §1), then ptqconv's own for the keys MindSpore lacks.
DEFAULT_BIT_NUM = 8
DEFAULT_QUANT_WEIGHT_SIZE = 0
DEFAULT_QUANT_WEIGHT_CHANNEL = 16
DEFAULT_CALIBRATE_SIZE = 100
# With no method in the config, ptqconv measures which suits the model (post_training).
AUTO = "AUTO"
# MindSpore's thread_num defaults to 1; left out, calibration runs on every CPU the process
# may use, as the latency timings do (docs/decisions.md, thread_num default).
DEFAULT_THREADS = target_module.usable_cpus()
# Everything, when eval_size is not given.
ALL_SAMPLES = 2**31
# [mixed_bit_weight_quant_param] and [dynamic_quant_param] defaults (docs/reference.md §1).
DEFAULT_INIT_SCALE = 0.02
DEFAULT_MAX_ITERATIONS = 40
# WeightQuant at 1-4 bits with block_size left out: MatMul/Gemm weights in blocks of 32 (the
# block of llama.cpp's Q4_0; onnxruntime's and NNCF's 4-bit tools block by default too) and
# Gather tables in 8 bits, as NNCF keeps embeddings (docs/decisions.md, low-bit recipe).
LOW_BIT_MAX = 4
LOW_BIT_BLOCK = 32
LOW_BIT_TABLE_BITS = 8
# With blocks, depthwise conv weights (one input channel per group: no block to form) are
# kept in 8 bits, as PostTraining keeps them (docs/decisions.md, blocked convs).
DEPTHWISE_BITS = 8
DEFAULT_DYNAMIC_STRATEGY = "ALWC"
# Where the config names no quant_strategy, GPTQ rounds PostTraining weights of fewer bits than
# GPTQ_BELOW (at 8 the activations' error dominates) and WeightQuant weights of up to
# GPTQ_WEIGHT_ONLY_MAX bits when calibration data is given (docs/decisions.md, GPTQ by default).
GPTQ_BELOW = 8
GPTQ_WEIGHT_ONLY_MAX = 8
# A calibration config is a few dozen lines; reading more than this is a wrong file.
MAX_CONFIG_BYTES = 1 << 20
# Beside --outputFile: its weights when it passes protobuf's 2 GB limit.
DATA_SUFFIX = ".data"


@dataclass(frozen=True)
class DataSource:
    """Where samples come from: `.bin` directories paired with model inputs (by name, or by
    position when every name is None), the first `size` files of each, and the shapes of
    dynamic inputs. `what` starts every message about them."""

    paths: tuple[tuple[str | None, Path], ...]
    size: int
    shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()
    what: str = "calibration data"
    # --inputDataFormat: the layout of 4-D .bin samples; None: the model's own.
    layout: str | None = None
    image: ImagePreprocess | None = None  # input_type=IMAGE: decoded and preprocessed
    # Where `size` was asked for (`calib.ini:5: calibrate_size`), when it was: MindSpore
    # refuses a directory with fewer files than that; None means "up to `size`".
    size_given: str | None = None


@dataclass(frozen=True)
class MixedBitSettings:
    """[mixed_bit_weight_quant_param]: bit_num=0 picks each layer's width."""

    init_scale: float = DEFAULT_INIT_SCALE  # target relative error per layer, (0, 1)
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
    strategy_default: bool = False  # GPTQ because the config left it to ptqconv
    mixed_bit: MixedBitSettings | None = None  # with bit_num 0
    block_size: int = 0  # MatMul/Gemm/Gather/Conv weights in blocks of this many (0: per channel)
    # block_size left out at 1-4 bits: MatMul/Gemm weights in blocks, Gather tables in 8 bits.
    low_bit_recipe: bool = False
    calibration: DataSource | None = None
    threads: int = DEFAULT_THREADS
    # Time the written model against float (on a calibration sample, else a random one).
    measure_latency: bool = True
    # Nearest-rounded Conv kernels keep their taps' sum (`weights.sum_rounding`).
    keep_kernel_sums: bool = True
    # Below 8 bits, shallow convs (image stems, 1x1 convs over few channels) on the 8-bit grid;
    # None: measured on the calibration samples, off without them (`weight_only`).
    shallow_convs_8bit: bool | None = None


@dataclass(frozen=True)
class DynamicQuantSettings:
    """int8 weights offline, activations quantized at run time (DYNAMIC_QUANT)."""

    bit_num: int
    min_size: int
    min_channel: int
    target: Target
    reduce_range: bool  # 7-bit weights: the U8S8 GEMM saturates on x86 without VNNI
    strategy: str = DEFAULT_DYNAMIC_STRATEGY  # ALWC | ACWL
    skip: tuple[str, ...] = ()
    measure_latency: bool = True  # time the written model against float (a random sample)


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
    strategy_default: bool = False  # GPTQ because the config left it to ptqconv
    # Keep float the units onnxruntime runs faster in float (passes/latency_plan.py).
    latency_aware: bool = True
    # Time the written model against the float one for the summary.
    measure_latency: bool = True
    # latency_aware left to the target, which is this machine: time what the cost model
    # decided (its plan against all-integer on x86_avx2; elsewhere all-integer against
    # float, then against the plan when slower; conversion._check_latency).
    latency_check: bool = False
    # Embedding tables (Gather of a float initializer) in int8 per row (passes/gather_quant.py).
    embedding_quant: bool = True
    # AUTO scores and times DynamicQuant's model too, and may write it (conversion).
    dynamic_candidate: bool = True
    # KL / MSE histograms from a strided sample of each tensor (calibrate/observers.py).
    histogram_sampling: bool = True
    # Below 8 bits, depthwise convs and image stems keep 8-bit weights (passes/qdq.py).
    shallow_convs_8bit: bool = True
    threads: int = DEFAULT_THREADS
    skip: tuple[str, ...] = ()
    debug_dir: Path | None = None  # per-layer report
    sensitivity: bool = False  # rank node units by the error each causes alone
    encodings_out: Path | None = None  # --encodingsFile: write the model's encodings there
    encodings_in: EncodingsFile | None = None  # encodings_path: imported as fixed grids


@dataclass(frozen=True)
class GateSettings:
    """The accuracy gate run on held-out samples after the model is written."""

    data: DataSource
    accuracy_threshold: float | None  # percent mean bias (MindSpore's benchmark)
    cosine_threshold: float | None
    threads: int = DEFAULT_THREADS
    # Where each threshold was set, for the messages: the flag, or the config's key.
    names: tuple[str, str] = ("--accuracyThreshold", "--cosineDistanceThreshold")


@dataclass(frozen=True)
class ConvertSettings:
    """Everything one conversion needs, checked. Build it with `ConvertSettings.create`."""

    model_file: Path
    output_file: Path
    quant_type: QuantType
    mode: WeightQuantSettings | PostTrainingSettings | DynamicQuantSettings
    gate: GateSettings | None = None
    # --fp16: what stays float is stored in float16; None (not given): as the model stores
    # its own float constants (`conversion._resolve_fp16`).
    fp16: bool | None = None
    config_file: Path | None = None
    # Where each --skipQuantNode / skip_quant_node name was given, for messages.
    skip_given: tuple[tuple[str, str], ...] = ()
    # --inputShape / input_shape: what a random sample for timing takes without data.
    input_shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()
    # fp16 set because the model stores its constants in float16: only these (their names
    # in the model read) are stored in float16 again.
    fp16_names: frozenset[str] | None = None

    @property
    def data_file(self) -> Path:
        """Where the output's weights go when it passes protobuf's 2 GB limit."""
        return self.output_file.with_name(self.output_file.name + DATA_SUFFIX)

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
        sensitivity: bool | str | None = False,
        input_data_format: str | None = None,
        fp16: bool | str | None = None,
        encodings_file: str | os.PathLike | None = None,
    ) -> ConvertSettings:
        """Check raw values (strings from the command line, or Python values; None: not
        given) and resolve them against the config file and the defaults."""
        model_file, output_file, config_file, debug_dir, encodings_file = arguments.each_path(
            ("--modelFile", model_file), ("--outputFile", output_file),
            ("--configFile", config_file), ("--debugDir", debug_dir),
            ("--encodingsFile", encodings_file))
        skip_quant_node = arguments.names("--skipQuantNode", skip_quant_node)
        input_shape = arguments.shapes("--inputShape", input_shape)
        sensitivity = sensitivity is not None and _flag("--sensitivity", sensitivity,
                                                        values.boolean)
        if fmk is not None and str(fmk).strip().upper() not in SUPPORTED_FMK:
            raise PtqUsageError(f"--fmk: {fmk!r} is not supported; allowed: ONNX")
        config_path = None if config_file is None else files.input_file(
            "--configFile", config_file, MAX_CONFIG_BYTES, "calibration config")
        config = None if config_path is None else load_config(config_path)
        pick = _Picker(config)
        qtype = _quant_type(pick, quant_type)
        _refuse_other_sections(config, qtype)
        model = files.input_file("--modelFile", model_file)
        if output_file:  # an input behind a link is named as such, not as a link
            output = Path(output_file)
            files.refuse_inputs(
                [("--outputFile", output),
                 ("--outputFile's data file", output.with_name(output.name + DATA_SUFFIX))],
                [("--modelFile", model),
                 *([("--configFile", config_path)] if config_path else [])])
        output = files.output_file("--outputFile", output_file, (DATA_SUFFIX,))
        encodings_out = None
        if encodings_file is not None and str(encodings_file) != "":
            if qtype is not QuantType.POST_TRAINING:
                raise PtqUsageError("--encodingsFile: only with --quantType=PostTraining")
            encodings_out = files.output_file("--encodingsFile", encodings_file, ())
        low, high = BIT_RANGE[qtype]
        config_low, config_high = CONFIG_BIT_RANGE[qtype]
        if _given_flag(bit_num):
            bits = _flag("--bitNum", bit_num, lambda v: values.integer(v, low, high),
                         f" for {qtype.value}")
        else:
            bits = pick.one("--bitNum", None, "bit_num",
                            lambda v: values.integer(v, config_low, config_high),
                            DEFAULT_BIT_NUM, f" for {qtype.value}")
        shapes = dict(pick.config("input_shape") or ())
        if input_shape:
            shapes.update(_flag("--inputShape", input_shape, values.shapes))
        flag_skip = values.names(skip_quant_node or ())
        config_skip = pick.config("skip_quant_node") or ()
        skip = values.names([*flag_skip, *config_skip])
        skip_given = {name: "--skipQuantNode" for name in flag_skip}
        for name in config_skip:
            assert config is not None
            skip_given.setdefault(name, config.where("skip_quant_node"))
        threads = pick.config("thread_num") or target_module.usable_cpus()
        layout = (None if input_data_format is None or not str(input_data_format).strip()
                  else _flag("--inputDataFormat", input_data_format, values.data_format))
        image = None if config is None else image_preprocess(config)
        _check_encode(pick, qtype, bits)
        min_size = pick.one("--quantWeightSize", quant_weight_size, "min_quant_weight_size",
                            lambda v: values.integer(v, 0), DEFAULT_QUANT_WEIGHT_SIZE)
        min_channel = pick.one("--quantWeightChannel", quant_weight_channel,
                               "min_quant_weight_channel", lambda v: values.integer(v, 0),
                               DEFAULT_QUANT_WEIGHT_CHANNEL)
        mode: WeightQuantSettings | PostTrainingSettings | DynamicQuantSettings
        if qtype is QuantType.WEIGHT_QUANT:
            _refuse_debug(pick, debug_dir, sensitivity)
            mode = _weight_quant(pick, bits, min_size, min_channel, skip, threads,
                                 tuple(shapes.items()), layout, image)
        elif qtype is QuantType.DYNAMIC_QUANT:
            device = target_module.resolve(pick.config("target_device") or "auto")
            mode = DynamicQuantSettings(
                bits, min_size, min_channel, device,
                reduce_range=pick.switch("reduce_range", device.saturates),
                strategy=pick.config("dynamic_quant_strategy") or DEFAULT_DYNAMIC_STRATEGY,
                skip=skip,
                measure_latency=pick.switch("dynamic_measure_latency", True))
        else:
            # MindSpore's full quantization configs carry min_quant_weight_size in
            # [common_quant_param]: the keys pass, the flags (weight quantization's) do not.
            for flag, given in (("--quantWeightSize", quant_weight_size),
                                ("--quantWeightChannel", quant_weight_channel)):
                if _given_flag(given):
                    raise PtqUsageError(f"{flag} is for --quantType=WeightQuant and "
                                        "DynamicQuant (PostTraining quantizes every weight "
                                        "of the units it quantizes)")
            mode = _post_training(pick, bits, skip, threads, tuple(shapes.items()), debug_dir,
                                  sensitivity, layout, image, encodings_out)
        gate = _gate(pick, accuracy_threshold, cosine_threshold, tuple(shapes.items()), threads,
                     layout, image)
        half = None if fp16 is None else _flag("--fp16", fp16, values.boolean)
        return cls(model, output, qtype, mode, gate, half, config_path,
                   tuple(skip_given.items()), tuple(shapes.items()))


def _check_encode(pick: _Picker, qtype: QuantType, bits: int) -> None:
    """MindSpore refuses enable_encode=false below 8 bits: its packing is the only storage
    there. ONNX int4/int2 tensors are always packed, so false changes nothing at 8 and 16."""
    if pick.config("enable_encode") is False and qtype is not QuantType.DYNAMIC_QUANT \
            and bits not in (8, 16):
        assert pick.source is not None
        raise PtqUsageError(
            f"{pick.source.where('enable_encode')}: false needs bit_num 8 or 16 (as in "
            f"converter_lite: {bits}-bit weights exist only packed)")


def _quant_type(pick: _Picker, given: str | QuantType | None) -> QuantType:
    """--quantType, else the config's quant_type; both given, they must agree (a config
    written for FULL_QUANT run as WeightQuant would silently ignore its calibration)."""
    config = pick.source
    found = pick.one("--quantType", given, "quant_type", values.quant_type, None)
    if found is None:
        raise PtqUsageError(f"--quantType is required; allowed: {values.QUANT_TYPE_ALLOWED}")
    written = pick.config("quant_type")
    if written is not None and written is not found:
        assert config is not None
        raise PtqUsageError(
            f"--quantType={found.value} contradicts {config.where('quant_type')}="
            f"{written.value}; give one of them, or make them agree")
    return found


# The sections of one quantization type: given to another, their keys would do nothing.
_OWN_SECTIONS = {
    "full_quant_param": QuantType.POST_TRAINING,
    "weight_quant_param": QuantType.WEIGHT_QUANT,
    "mixed_bit_weight_quant_param": QuantType.WEIGHT_QUANT,
    "dynamic_quant_param": QuantType.DYNAMIC_QUANT,
}


# Keys of [full_quant_param] that other types read too: GPTQ's calibration runs on
# thread_num threads, and DynamicQuant's weights follow the target.
_SHARED_KEYS = {
    "thread_num": frozenset({QuantType.WEIGHT_QUANT}),
    "target_device": frozenset({QuantType.DYNAMIC_QUANT}),
}


def _refuse_other_sections(config: QuantConfig | None, qtype: QuantType) -> None:
    """A key of another quantization type's section (a [full_quant_param] in a config run as
    WeightQuant) is an error, as an unknown key is: it was ignored in silence."""
    if config is None:
        return
    for name, key in config.keys.items():
        section = key[1:].split("]", 1)[0] if key.startswith("[") else ""
        owner = _OWN_SECTIONS.get(section)
        if owner is not None and owner is not qtype and qtype not in _SHARED_KEYS.get(
                name, ()):
            raise PtqUsageError(f"{config.where(name)}: [{section}] is for "
                                f"--quantType={owner.value}, not {qtype.value}: its keys would "
                                "do nothing; remove the section")


def _refuse_debug(pick: _Picker, debug_dir: str | os.PathLike | None,
                  sensitivity: bool) -> None:
    """The layer report and the sensitivity ranking measure quantized activations, which
    WeightQuant does not have: asking for them must not pass in silence. The config's
    debug_info_save_path is let through: MindSpore's documented weight quantization config
    carries it (in [common_quant_param], shared by every quant_type)."""
    why = "is for --quantType=PostTraining (WeightQuant leaves activations in float)"
    if debug_dir:
        raise PtqUsageError(f"--debugDir {why}")
    if sensitivity:
        raise PtqUsageError(f"--sensitivity {why}")


def _weight_quant(pick: _Picker, bits: int, min_size: int, min_channel: int,
                  skip: tuple[str, ...], threads: int,
                  shapes: tuple[tuple[str, tuple[int, ...]], ...], layout: str | None,
                  image: ImagePreprocess | None) -> WeightQuantSettings:
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
    given = pick.config("block_size")
    block = given if given is not None else (
        LOW_BIT_BLOCK if per_channel and 1 <= bits <= LOW_BIT_MAX else 0)
    if block and not per_channel:
        assert config is not None
        raise PtqUsageError(f"{config.where('block_size')}: blocks need per_channel=true "
                            "(per_channel=false asks for one scale per weight)")
    paths = pick.config("calibrate_path")
    strategy_given = pick.config("weight_quant_strategy")
    # With calibration data, GPTQ (docs/decisions.md, GPTQ by default).
    strategy_default = (strategy_given is None and bool(paths)
                        and 0 < bits <= GPTQ_WEIGHT_ONLY_MAX)
    strategy = strategy_given or ("GPTQ" if strategy_default else "MAX_MIN")
    calibration = (DataSource(paths, pick.config("calibrate_size") or DEFAULT_CALIBRATE_SIZE,
                              shapes, layout=layout, image=image,
                              size_given=_where(pick, "calibrate_size")) if paths else None)
    for needs, key in ((strategy_given == "GPTQ", "weight_quant_strategy"),
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
        strategy_default=strategy_default,
        mixed_bit=mixed,
        block_size=block,
        low_bit_recipe=given is None and block > 0,
        calibration=calibration,
        threads=threads,
        measure_latency=pick.switch("weight_measure_latency", True),
        keep_kernel_sums=pick.switch("keep_kernel_sums", True),
        shallow_convs_8bit=pick.config("weight_shallow_convs_8bit"))


def _post_training(pick: _Picker, bits: int, skip: tuple[str, ...], threads: int,
                   shapes: tuple[tuple[str, tuple[int, ...]], ...],
                   debug_dir: str | os.PathLike | None, sensitivity: bool,
                   layout: str | None, image: ImagePreprocess | None,
                   encodings_out: Path | None = None) -> PostTrainingSettings:
    config = pick.source
    if config is None:
        raise PtqUsageError("--configFile is required for --quantType=PostTraining")
    paths = config.calibrate_path
    if not paths:
        raise PtqUsageError(
            f"{config.source}: no calibration data: set calibrate_path in "
            "[data_preprocess_param] (or image_path in the flat form)")
    device = target_module.resolve(pick.config("target_device") or "auto")
    measure_latency = pick.switch("measure_latency", True)
    debug = Path(debug_dir) if debug_dir else config.debug_info_save_path
    if debug is not None:
        files.output_directory("--debugDir", debug)
    if encodings_out is not None and bits == 1:
        raise PtqUsageError("--encodingsFile: 1-bit weights ({-1, +1}) have no AIMET encoding; "
                            "allowed: --bitNum in [2, 8]")
    imported = None
    if config.encodings_path is not None:
        imported = encodings.read(files.input_file(config.where("encodings_path"),
                                                   config.encodings_path))
    strategy_given = pick.config("quant_strategy")
    # Below 8 bits, GPTQ (docs/decisions.md, GPTQ by default).
    strategy_default = strategy_given is None and bits < GPTQ_BELOW
    return PostTrainingSettings(
        bit_num=bits,
        activation_bits=pick.config("activation_bit_num") or bits,
        method=pick.config("activation_quant_method") or AUTO,
        calibration=DataSource(paths, pick.config("calibrate_size") or DEFAULT_CALIBRATE_SIZE,
                               shapes, layout=layout, image=image,
                               size_given=_where(pick, "calibrate_size")),
        bias_correction=pick.config("bias_correction"),
        per_channel=pick.switch("per_channel", True),
        target=device,
        reduce_range=pick.switch("reduce_range", device.saturates),
        smooth_quant=pick.config("smooth_quant"),
        equalize=_equalize(pick),
        # The cost model was measured on x86 without VNNI (docs/decisions.md): elsewhere
        # every unit stays integer unless asked.
        latency_aware=pick.switch("latency_aware", device.name == "x86_avx2"),
        measure_latency=measure_latency,
        # Timings on this machine say something only when the target is this machine.
        latency_check=(pick.config("latency_aware") is None and measure_latency
                       and device.name == target_module.detect().name),
        embedding_quant=pick.switch("embedding_quant", True),
        dynamic_candidate=pick.switch("dynamic_candidate", True),
        histogram_sampling=pick.switch("histogram_sampling", True),
        shallow_convs_8bit=pick.switch("shallow_convs_8bit", True),
        quant_strategy=strategy_given or ("GPTQ" if strategy_default else "MAX_MIN"),
        strategy_default=strategy_default,
        threads=threads,
        skip=skip,
        debug_dir=debug,
        sensitivity=bool(sensitivity),
        encodings_out=encodings_out,
        encodings_in=imported,
    )


def _gate(pick: _Picker, accuracy: float | str | None, cosine: float | str | None,
          shapes: tuple[tuple[str, tuple[int, ...]], ...], threads: int,
          layout: str | None, image: ImagePreprocess | None) -> GateSettings | None:
    given_accuracy = accuracy if _given_flag(accuracy) else None
    given_cosine = cosine if _given_flag(cosine) else None
    accuracy = pick.one("--accuracyThreshold", accuracy, "accuracy_threshold",
                        lambda v: values.real(v, 0.0, 1e6), None)
    cosine = pick.one("--cosineDistanceThreshold", cosine, "cosine_threshold",
                      lambda v: values.real(v, -1.0, 1.0), None)
    # Without a threshold the held-out data is left unread: one config may serve runs that
    # give the threshold as a flag and runs that do not.
    if accuracy is None and cosine is None:
        return None
    paths = pick.config("eval_path")
    if not paths:
        flag = "--accuracyThreshold" if accuracy is not None else "--cosineDistanceThreshold"
        raise PtqUsageError(
            f"{flag} needs held-out data: set eval_path in [evaluate_param] "
            "of the config (name:dir like calibrate_path)")
    data = DataSource(paths, pick.config("eval_size") or ALL_SAMPLES, shapes, "eval data",
                      layout, image, _where(pick, "eval_size"))
    names = tuple(flag if given is not None else f"{key} in [evaluate_param]"
                  for flag, given, key in (("--accuracyThreshold", given_accuracy,
                                            "accuracy_threshold"),
                                           ("--cosineDistanceThreshold", given_cosine,
                                            "cosine_threshold")))
    return GateSettings(data, accuracy, cosine, threads, names)


def _equalize(pick: _Picker) -> bool | None:
    """equalize=true needs per-channel weights: one scale per weight tensor cannot take the
    per-channel factors it moves into the weights."""
    equalize = pick.config("equalize")
    if equalize and not pick.switch("per_channel", True):
        assert pick.source is not None
        raise PtqUsageError(f"{pick.source.where('equalize')}: true needs per_channel=true "
                            "(cross-layer equalization rescales weight channels)")
    return equalize


def _given_flag(value: Any) -> bool:
    """A flag given a value (None and blank strings are a flag left out)."""
    return value is not None and not (isinstance(value, str) and not value.strip())


def _where(pick: _Picker, key: str) -> str | None:
    """`calib.ini:5: [section] key` when the config sets `key`."""
    if pick.source is None or pick.config(key) is None:
        return None
    return pick.source.where(key)


class _Picker:
    """Flag > config > default for one config file (or none)."""

    def __init__(self, source: QuantConfig | None) -> None:
        self.source = source

    def config(self, key: str) -> Any:
        return None if self.source is None else getattr(self.source, key)

    def one(self, flag: str, given: Any, key: str, parse: Callable[[Any], T],
            default: T, where: str = "") -> T:
        if _given_flag(given):
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
