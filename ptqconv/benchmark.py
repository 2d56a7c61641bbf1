"""Accuracy gate: compare a quantized model with its float model (or saved outputs).

``ptqconv benchmark`` follows MindSpore Lite's benchmark tool (REFERENCE.md §4): the model
given by ``--modelFile`` is run on input samples and its outputs are compared, by name, with
the outputs of ``--referenceModel`` on the same samples, or with a MindSpore benchmark data
file (``--benchmarkDataFile``). The verdict fails when the model's mean bias (MindSpore's
formula, `ptqconv.metrics`) is above ``--accuracyThreshold`` percent, when an output's cosine
similarity is below ``--cosineDistanceThreshold``, or when the model outputs NaN/Inf.

Input samples are either the calibration ``.bin`` layout (``--inDataDir``: one directory per
model input, every file one sample, all samples used, read one at a time) or MindSpore's
``--inDataFile`` (one ``.bin`` file per input: one sample).

Benchmark data file (MindSpore's text format), for every output tensor two lines::

    name ndims d0 ... d{ndims-1}
    v0 v1 v2 ...            (prod(d) whitespace-separated numbers, C order)

Blank lines between tensors are ignored. Stricter than MindSpore, which silently keeps the
first of duplicated names, ignores extra tokens and reads missing values as garbage: here a
duplicated name, a malformed header, a dimension that is not a positive integer, a wrong
number of values or a value that is not a number is an error naming the file and the line.
Outputs of the model missing from the file are not compared (as in MindSpore); a tensor of
the file that is not an output of the model is an error.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from ptqconv import modelio
from ptqconv.calibrate import dataset
from ptqconv.calibrate.collector import session_options
from ptqconv.calibrate.dataset import CalibrationSet, InputSpec, model_inputs, parse_input_shape
from ptqconv.errors import PtqError, PtqUsageError
from ptqconv.errors import one_line as _oneline
from ptqconv.errors import shown as _p
from ptqconv.metrics import OutputComparison, model_mean_bias_percent
from ptqconv.options import input_file as _input_file

SCHEMA = "ptqconv.benchmark/1"
LEVELS = ("disable", "basic", "extended", "all")
# MindSpore benchmark defaults (benchmark_base.h): accuracyThreshold 0.5, numThreads 2,
# loopCount 10, warmUpLoopCount 3; its cosineDistanceThreshold default -1.1 means "off".
DEFAULT_ACCURACY_THRESHOLD = 0.5
DEFAULT_THREADS = 2
DEFAULT_LOOP_COUNT = 10
DEFAULT_WARM_UP_LOOP_COUNT = 3
MAX_TABLE_ROWS = 20
MAX_FAILURES_SHOWN = 3

ModelSource = str | os.PathLike | bytes | onnx.ModelProto | ir.Model


# ---------------------------------------------------------------------------------------------
# Options


@dataclass(frozen=True)
class BenchmarkOptions:
    """Everything a benchmark run needs, checked. Build it with `BenchmarkOptions.create`."""

    model_file: Path
    reference_model: Path | None = None
    benchmark_data_file: Path | None = None
    in_data_dir: tuple[tuple[str | None, Path], ...] = ()
    in_data_file: tuple[Path, ...] = ()
    input_shape: tuple[tuple[str, tuple[int, ...]], ...] = ()
    accuracy_threshold: float = DEFAULT_ACCURACY_THRESHOLD
    cosine_distance_threshold: float | None = None
    report_file: Path | None = None
    graph_optimization_level: str = "all"
    num_threads: int = DEFAULT_THREADS
    loop_count: int = DEFAULT_LOOP_COUNT
    warm_up_loop_count: int = DEFAULT_WARM_UP_LOOP_COUNT

    @classmethod
    def create(
        cls,
        model_file: str | os.PathLike | None,
        reference_model: str | os.PathLike | None = None,
        in_data_dir: str | Sequence[str | os.PathLike | tuple[str | None, Any]] | None = None,
        in_data_file: str | Sequence[str | os.PathLike] | None = None,
        benchmark_data_file: str | os.PathLike | None = None,
        input_shape: str | Mapping[str, Sequence[int]] | None = None,
        accuracy_threshold: float | str | None = None,
        cosine_distance_threshold: float | str | None = None,
        report_file: str | os.PathLike | None = None,
        graph_optimization_level: str | None = None,
        num_threads: int | str | None = None,
        loop_count: int | str | None = None,
        warm_up_loop_count: int | str | None = None,
    ) -> BenchmarkOptions:
        """Validate raw values (strings from the command line, or Python values).

        Raise PtqUsageError, one line naming the flag, for anything wrong.
        """
        model = _input_file("--modelFile", model_file)
        if _given(reference_model) and _given(benchmark_data_file):
            raise PtqUsageError(
                "--referenceModel and --benchmarkDataFile both given; give one: the float "
                "model to run on the same inputs, or a file of its saved outputs"
            )
        if not _given(reference_model) and not _given(benchmark_data_file):
            raise PtqUsageError(
                "no reference: give --referenceModel (the float model) or --benchmarkDataFile "
                "(its outputs in MindSpore's benchmark data format)"
            )
        reference = (
            _input_file("--referenceModel", reference_model) if _given(reference_model) else None
        )
        data_file = (
            _input_file("--benchmarkDataFile", benchmark_data_file)
            if _given(benchmark_data_file)
            else None
        )
        if _given(in_data_dir) and _given(in_data_file):
            raise PtqUsageError(
                "--inDataDir and --inDataFile both given; give one: directories of .bin samples "
                "(--inDataDir) or one .bin file per input (--inDataFile)"
            )
        if not _given(in_data_dir) and not _given(in_data_file):
            raise PtqUsageError(
                "no input data: give --inDataDir (name:dir,... directories of .bin samples) or "
                "--inDataFile (one .bin file per model input, comma-separated)"
            )
        if data_file is not None and _given(in_data_dir):
            raise PtqUsageError(
                "--benchmarkDataFile holds the outputs of one sample; give that sample with "
                "--inDataFile (one .bin file per input), not --inDataDir"
            )
        dirs = _parse_in_data_dir(in_data_dir) if _given(in_data_dir) else ()
        files = _parse_in_data_file(in_data_file) if _given(in_data_file) else ()
        shapes: dict[str, tuple[int, ...]] = {}
        if isinstance(input_shape, str):
            if input_shape.strip():
                shapes = parse_input_shape(input_shape)
        elif input_shape:
            shapes = {str(k): tuple(v) for k, v in input_shape.items()}
        accuracy = (
            DEFAULT_ACCURACY_THRESHOLD
            if accuracy_threshold is None
            else _real("--accuracyThreshold", accuracy_threshold, 0.0, 1e6)
        )
        cosine = (
            None
            if cosine_distance_threshold is None
            else _real("--cosineDistanceThreshold", cosine_distance_threshold, -1.0, 1.0)
        )
        level = "all" if graph_optimization_level is None else str(graph_optimization_level)
        if level.strip().lower() not in LEVELS:
            raise PtqUsageError(
                f"--graphOptimizationLevel: {level!r} is not supported; allowed: "
                + ", ".join(LEVELS)
            )
        report = _report_file(report_file) if _given(report_file) else None
        return cls(
            model_file=model,
            reference_model=reference,
            benchmark_data_file=data_file,
            in_data_dir=dirs,
            in_data_file=files,
            input_shape=tuple(shapes.items()),
            accuracy_threshold=accuracy,
            cosine_distance_threshold=cosine,
            report_file=report,
            graph_optimization_level=level.strip().lower(),
            num_threads=_int("--numThreads", num_threads, DEFAULT_THREADS, 1, 1024),
            loop_count=_int("--loopCount", loop_count, DEFAULT_LOOP_COUNT, 1, 1_000_000),
            warm_up_loop_count=_int(
                "--warmUpLoopCount", warm_up_loop_count, DEFAULT_WARM_UP_LOOP_COUNT, 0, 1_000_000
            ),
        )


def _given(value: object) -> bool:
    if value is None:
        return False
    if isinstance(value, (str, os.PathLike)):
        return str(value).strip() != ""
    if isinstance(value, Sequence):
        return len(value) > 0
    return True


def _report_file(value: str | os.PathLike) -> Path:
    path = Path(value)
    if path.is_dir():
        raise PtqUsageError(f"--reportFile: is a directory: {_p(path)}")
    if not path.parent.is_dir():
        raise PtqUsageError(f"--reportFile: directory does not exist: {_p(path.parent)}")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise PtqUsageError(f"--reportFile: directory is not writable: {_p(path.parent)}")
    return path


def _int(flag: str, value: int | str | None, default: int, low: int, high: int) -> int:
    if value is None:
        return default
    allowed = f"an integer in [{low}, {high}]"
    if isinstance(value, bool):
        raise PtqUsageError(f"{flag}: {value!r} is not an integer; allowed: {allowed}")
    try:
        number = value if isinstance(value, int) else int(str(value).strip(), 10)
    except ValueError:
        raise PtqUsageError(f"{flag}: {value!r} is not an integer; allowed: {allowed}") from None
    if not low <= number <= high:
        raise PtqUsageError(f"{flag}: {value} is out of range; allowed: {allowed}")
    return number


def _real(flag: str, value: float | str, low: float, high: float) -> float:
    allowed = f"a number in [{low:g}, {high:g}]"
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise PtqUsageError(f"{flag}: {value!r} is not a number; allowed: {allowed}") from None
    if not low <= number <= high:  # also rejects nan
        raise PtqUsageError(f"{flag}: {value} is out of range; allowed: {allowed}")
    return number


_IN_DATA_DIR_ALLOWED = "name:dir[,name:dir...] (input name before the last ':') or dir[,dir...]"


def _parse_in_data_dir(
    value: str | Sequence[str | os.PathLike | tuple[str | None, Any]],
) -> tuple[tuple[str | None, Path], ...]:
    """``name:dir,name2:dir2`` (split at the last ':', like calibrate_path) or ``dir,dir2``."""
    if not isinstance(value, str):
        pairs: list[tuple[str | None, Path]] = []
        for item in value:
            if isinstance(item, tuple):
                pairs.append((item[0], Path(item[1])))
            else:
                pairs.extend(_parse_in_data_dir(os.fspath(item)))
        return tuple(pairs)
    items = [item.strip() for item in value.split(",")]
    if items and not items[-1]:
        items.pop()  # a trailing comma
    result: list[tuple[str | None, Path]] = []
    for position, item in enumerate(items, 1):
        if not item:
            raise PtqUsageError(
                f"--inDataDir: item {position} of {len(items)} is empty; "
                f"allowed: {_IN_DATA_DIR_ALLOWED}"
            )
        name, colon, directory = item.rpartition(":")
        if not colon:
            result.append((None, Path(item)))
            continue
        if not name.strip():
            raise PtqUsageError(
                f"--inDataDir: {item!r} has no input name before ':'; "
                f"allowed: {_IN_DATA_DIR_ALLOWED}"
            )
        if not directory.strip():
            raise PtqUsageError(
                f"--inDataDir: {item!r} has no directory after ':'; allowed: {_IN_DATA_DIR_ALLOWED}"
            )
        result.append((name.strip(), Path(directory.strip())))
    if not result:
        raise PtqUsageError(f"--inDataDir: no directory given; allowed: {_IN_DATA_DIR_ALLOWED}")
    return tuple(result)


def _parse_in_data_file(value: str | Sequence[str | os.PathLike]) -> tuple[Path, ...]:
    """Comma-separated ``.bin`` files, one per model input in input order."""
    items = (
        [item.strip() for item in value.split(",")]
        if isinstance(value, str)
        else [os.fspath(v) for v in value]
    )
    if items and not items[-1]:
        items.pop()
    for position, item in enumerate(items, 1):
        if not item:
            raise PtqUsageError(
                f"--inDataFile: file {position} of {len(items)} is empty; allowed: "
                "file.bin[,file2.bin...], one file per model input, in input order"
            )
    return tuple(Path(item) for item in items)


# ---------------------------------------------------------------------------------------------
# Input samples


def open_samples(
    model_file: Path,
    options: BenchmarkOptions,
) -> tuple[list[InputSpec], CalibrationSet]:
    """The input specs of `model_file` and the samples the options point at, all checked."""
    inputs = model_inputs(model_file)
    shapes = dict(options.input_shape)
    if options.in_data_dir:
        data = CalibrationSet.open(
            inputs, options.in_data_dir, sys.maxsize, shapes, check_values=True, what="--inDataDir"
        )
    else:
        data = single_sample(inputs, options.in_data_file, shapes)
    return inputs, data


def single_sample(
    inputs: Sequence[InputSpec],
    files: Sequence[Path],
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    what: str = "--inDataFile",
) -> CalibrationSet:
    """One sample from one ``.bin`` file per input (paired by position), checked like
    `CalibrationSet.open` checks a directory's files (shape resolution, size, NaN/Inf)."""
    inputs = tuple(inputs)
    listed = ", ".join(repr(s.name) for s in inputs)
    if not inputs:
        raise PtqUsageError(f"{what}: the model has no inputs to feed")
    if len(files) != len(inputs):
        raise PtqUsageError(
            f"{what}: {len(files)} file(s) given for {len(inputs)} model input(s) ({listed}); "
            "give one .bin file per input, in the model's input order, separated by ','"
        )
    # The checks of CalibrationSet.open, applied to single files (dataset.py has no public
    # entry point for files that are not the whole content of a directory).
    user = dataset._check_user_shapes(inputs, shapes or {}, what)
    resolved: dict[str, tuple[int, ...]] = {}
    for spec, path in zip(inputs, files, strict=True):
        if spec.dtype.kind == "O" or spec.dtype.name in dataset._SUB_BYTE_DTYPES:
            raise PtqError(
                f"{what}: input {spec.name!r} has type {spec.dtype.name}, which raw .bin "
                "files cannot hold (only types of whole bytes per value)"
            )
        if not path.exists():
            raise PtqUsageError(f"{what}: input {spec.name!r}: no such file: {_p(path)}")
        if not path.is_file():
            raise PtqUsageError(f"{what}: input {spec.name!r}: not a file: {_p(path)}")
        shape, inferred = dataset._resolve_shape(spec, user.get(spec.name), path, what)
        expected = math.prod(shape) * spec.dtype.itemsize
        size = dataset._size(spec.name, path, what)
        if size != expected:
            origin = ", inferred from the file size" if inferred else ""
            raise PtqUsageError(
                f"{what}: input {spec.name!r}: {_p(path)} is {size} bytes; expected {expected} "
                f"({spec.dtype.name} {dataset._fmt(shape)}{origin})"
            )
        dataset._check_values(spec, shape, path, what)
        resolved[spec.name] = shape
    return CalibrationSet(
        inputs, resolved, {s.name: [p] for s, p in zip(inputs, files, strict=True)}, what
    )


# ---------------------------------------------------------------------------------------------
# Benchmark data file (MindSpore's text format)


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
    where = f"{what}: {_p(path)}"
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
                f"{where} line {number + 1}: tensor {name!r} {_shape(dims)} needs {count} "
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


def write_benchmark_data(path: str | os.PathLike, outputs: Mapping[str, np.ndarray]) -> None:
    """Write ``{name: array}`` as a MindSpore benchmark data file (float32, round-trip digits)."""
    with open(path, "w", encoding="utf-8") as handle:
        for name, array in outputs.items():
            if not name or any(c.isspace() for c in name):
                raise PtqError(f"tensor name {name!r} cannot be written: it must have no spaces")
            array = np.asarray(array, dtype=np.float32)
            handle.write(" ".join([name, str(array.ndim), *map(str, array.shape)]) + "\n")
            handle.write(" ".join(f"{float(v):.9g}" for v in array.ravel()) + "\n")


# ---------------------------------------------------------------------------------------------
# Sessions and the comparison


class _Session:
    """One onnxruntime session with the benchmark's session options and labelled errors."""

    def __init__(self, source: ModelSource, label: str, level: str, threads: int) -> None:
        self.label = label
        if isinstance(source, onnx.ModelProto):
            source = source.SerializeToString()
        elif isinstance(source, ir.Model):
            source = ir.to_proto(source).SerializeToString()
        elif not isinstance(source, bytes):
            source = os.fspath(source)
        try:
            self.session = ort.InferenceSession(
                source, session_options(threads, level), providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            raise PtqError(f"{label}: onnxruntime cannot load the model: {_first(exc)}") from None
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.inputs = {i.name: i.type for i in self.session.get_inputs()}

    def run(self, feeds: Mapping[str, np.ndarray], sample: str) -> dict[str, np.ndarray]:
        try:
            values = self.session.run(None, dict(feeds))
        except Exception as exc:
            raise PtqError(f"{self.label}: inference failed on {sample}: {_first(exc)}") from None
        return dict(zip(self.outputs, values, strict=True))

    def latency_ms(self, feeds: Mapping[str, np.ndarray], loops: int, warm_up: int) -> float:
        """Median wall time of `loops` runs after `warm_up` runs, in milliseconds."""
        feeds = dict(feeds)
        for _ in range(warm_up):
            self.run(feeds, "the latency sample")
        times = []
        for _ in range(loops):
            start = time.perf_counter()
            self.session.run(None, feeds)
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1000.0


def _check_same_io(model: _Session, reference: _Session) -> None:
    if set(model.inputs) != set(reference.inputs):
        raise PtqUsageError(
            f"{reference.label} has inputs {_names(reference.inputs)} but {model.label} has "
            f"{_names(model.inputs)}; both models must take the same inputs"
        )
    for name, kind in model.inputs.items():
        if reference.inputs[name] != kind:
            raise PtqUsageError(
                f"input {name!r} is {kind} in {model.label} but {reference.inputs[name]} in "
                f"{reference.label}; both models must take the same inputs"
            )
    if set(model.outputs) != set(reference.outputs):
        only_model = [n for n in model.outputs if n not in reference.outputs]
        only_reference = [n for n in reference.outputs if n not in model.outputs]
        raise PtqUsageError(
            f"outputs are matched by name but {model.label} has {_names(model.outputs)} and "
            f"{reference.label} has {_names(reference.outputs)} (only in the model: "
            f"{_names(only_model) or 'none'}; only in the reference: "
            f"{_names(only_reference) or 'none'})"
        )


def _compare_sessions(
    model: _Session,
    reference: _Session,
    samples: Iterable[Mapping[str, np.ndarray]],
    progress: Callable[[int], None] | None = None,
    first: list[Mapping[str, np.ndarray]] | None = None,
) -> dict[str, OutputComparison]:
    comparisons = {name: OutputComparison(name) for name in model.outputs}
    for k, sample in enumerate(samples):
        if first is not None and k == 0:
            first.append(sample)
        label = f"sample {k}"
        expected = reference.run(sample, label)
        actual = model.run(sample, label)
        for name, comparison in comparisons.items():
            comparison.update(expected[name], actual[name])
        if progress:
            progress(1)
    return comparisons


def compare_models(
    model: ModelSource,
    reference: ModelSource,
    samples: Iterable[Mapping[str, np.ndarray]],
    level: str = "all",
    threads: int = DEFAULT_THREADS,
    progress: Callable[[int], None] | None = None,
) -> dict[str, OutputComparison]:
    """Run every sample through both models and compare their outputs, matched by name.

    `model` and `reference` are paths (external data is found beside the file), serialized
    bytes, ``onnx.ModelProto`` or ``onnx_ir.Model`` (serialized in memory, so under 2 GB).
    Both get the same session options (`session_options(threads, level)`). Samples are
    ``{input name: array}`` dicts, consumed once, one at a time; memory does not depend on
    their number. Returns one `OutputComparison` per output, in the model's output order.
    Raise PtqUsageError when the inputs or the output names of the two models differ,
    PtqError when a model cannot be loaded or run.
    """
    if level not in LEVELS:
        raise ValueError(f"level must be one of {', '.join(LEVELS)}, not {level!r}")
    quantized = _Session(model, _label("model", model), level, threads)
    float_model = _Session(reference, _label("reference", reference), level, threads)
    _check_same_io(quantized, float_model)
    return _compare_sessions(quantized, float_model, samples, progress)


def gate_failures(
    comparisons: Mapping[str, OutputComparison],
    accuracy_threshold: float | None,
    cosine_threshold: float | None = None,
    flags: tuple[str, str] = ("--accuracyThreshold", "--cosineDistanceThreshold"),
) -> list[str]:
    """Why the comparisons fail the gate (empty when they pass), one message per reason.

    Fails on NaN/Inf in the model's outputs, on a model mean bias (mean over outputs of their
    mean bias, percent) above `accuracy_threshold` or not a number, and on an output whose
    cosine is below `cosine_threshold` or not a number. None disables a threshold. `flags`
    name the thresholds in the messages.
    """
    failures = []
    for name, c in comparisons.items():
        if c.non_finite:
            failures.append(
                f"output {name!r}: {c.non_finite} NaN/Inf value(s) in the model's output"
            )
    if accuracy_threshold is not None and comparisons:
        bias = model_mean_bias_percent(comparisons)
        if math.isnan(bias):
            failures.append(f"mean bias is NaN (limit {flags[0]} {accuracy_threshold:g}%)")
        elif not bias <= accuracy_threshold:
            failures.append(f"mean bias {bias:.4g}% is above {flags[0]} {accuracy_threshold:g}%")
    if cosine_threshold is not None:
        for name, c in comparisons.items():
            cosine = c.cosine
            if math.isnan(cosine):
                failures.append(
                    f"output {name!r}: cosine is NaN (limit {flags[1]} {cosine_threshold:g})"
                )
            elif not cosine >= cosine_threshold:
                failures.append(
                    f"output {name!r}: cosine {cosine:.6f} is below {flags[1]} {cosine_threshold:g}"
                )
    return failures


# ---------------------------------------------------------------------------------------------
# The report


@dataclass
class BenchmarkReport:
    """The outcome of `run_benchmark`: figures, verdict, JSON and the printed table."""

    model_file: Path
    model_size: int
    model_latency_ms: float
    reference_model: Path | None
    benchmark_data_file: Path | None
    reference_size: int
    reference_latency_ms: float | None
    samples: int
    comparisons: dict[str, OutputComparison]
    accuracy_threshold: float
    cosine_distance_threshold: float | None
    graph_optimization_level: str
    num_threads: int
    loop_count: int
    warm_up_loop_count: int
    not_compared: list[str] = field(default_factory=list)  # model outputs not in the data file
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def mean_bias_percent(self) -> float:
        return model_mean_bias_percent(self.comparisons)

    def overall(self) -> dict[str, float]:
        results = [c.result() for c in self.comparisons.values()]
        return {
            "mean_bias_percent": self.mean_bias_percent,
            "min_cosine": _worst([r["cosine"] for r in results], min),
            "min_sqnr_db": _worst([r["sqnr_db"] for r in results], min),
            "max_abs_error": _worst([r["max_abs_error"] for r in results], max),
        }

    def to_dict(self) -> dict[str, Any]:
        """The JSON report (schema ``ptqconv.benchmark/1``); NaN -> null, ±inf -> "inf"."""
        reference: dict[str, Any]
        if self.reference_model is not None:
            reference = {"path": str(self.reference_model)}
        else:
            reference = {"benchmark_data_file": str(self.benchmark_data_file)}
        reference["size_bytes"] = self.reference_size
        reference["median_latency_ms"] = self.reference_latency_ms
        report = {
            "schema": SCHEMA,
            "model": {
                "path": str(self.model_file),
                "size_bytes": self.model_size,
                "median_latency_ms": self.model_latency_ms,
            },
            "reference": reference,
            "samples": self.samples,
            "outputs": {name: c.result() for name, c in self.comparisons.items()},
            "overall": self.overall(),
            "thresholds": {
                "accuracy_threshold_percent": self.accuracy_threshold,
                "cosine_distance_threshold": self.cosine_distance_threshold,
            },
            "passed": self.passed,
            "failures": list(self.failures),
            "session": {
                "graph_optimization_level": self.graph_optimization_level,
                "num_threads": self.num_threads,
            },
        }
        return _json_safe(report)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"

    def write(self, path: str | os.PathLike) -> None:
        path = Path(path)
        try:
            path.write_text(self.to_json(), encoding="utf-8")
        except OSError as exc:
            raise PtqError(
                f"--reportFile: cannot write {_p(path)}: {exc.strerror or exc}"
            ) from None

    def format(self, max_rows: int = MAX_TABLE_ROWS) -> str:
        """The table printed by the command: one screen whatever the number of outputs."""
        if self.reference_model is not None:
            against = _p(self.reference_model)
        else:
            against = f"benchmark data {_p(self.benchmark_data_file)}"
        lines = [
            f"benchmark: {_p(self.model_file)} vs {against}; {self.samples} sample"
            f"{'s' if self.samples != 1 else ''}, graph optimization "
            f"{self.graph_optimization_level}, {self.num_threads} thread"
            f"{'s' if self.num_threads != 1 else ''}"
        ]
        items = list(self.comparisons.items())
        shown = items
        if len(items) > max_rows:
            shown = sorted(items, key=lambda kv: _sort_key(kv[1].mean_bias_percent))[:max_rows]
        width = min(32, max([len("overall"), *(len(_cut(n, 32)) for n, _ in shown)]))
        head = (
            f"{'output':<{width}}  {'mean bias %':>11}  {'cosine':>9}  {'SQNR dB':>8}  "
            f"{'max abs err':>11}  {'top-1':>6}"
        )
        lines += [head, "-" * len(head)]
        for name, c in shown:
            r = c.result()
            top1 = r["top1_agreement"]
            lines.append(
                f"{_cut(name, width):<{width}}  {_num(r['mean_bias_percent'], '.4f'):>11}  "
                f"{_num(r['cosine'], '.6f'):>9}  {_num(r['sqnr_db'], '.2f'):>8}  "
                f"{_num(r['max_abs_error'], '.4g'):>11}  "
                f"{'-' if top1 is None else format(top1, '.1%'):>6}"
            )
        if len(items) > len(shown):
            lines.append(
                f"... {len(items) - len(shown)} more outputs with a lower mean bias "
                "(all of them in --reportFile)"
            )
        o = self.overall()
        lines.append(
            f"{'overall':<{width}}  {_num(o['mean_bias_percent'], '.4f'):>11}  "
            f"{_num(o['min_cosine'], '.6f'):>9}  {_num(o['min_sqnr_db'], '.2f'):>8}  "
            f"{_num(o['max_abs_error'], '.4g'):>11}"
        )
        lines.append("  (overall: mean bias averaged over outputs; worst cosine, SQNR, error)")
        if self.not_compared:
            lines.append(
                f"not in the benchmark data file, not compared: {_names(self.not_compared)}"
            )
        if self.reference_model is not None:
            lines.append(
                f"size:    model {_size(self.model_size)}, reference {_size(self.reference_size)}"
                f" ({_ratio(self.model_size, self.reference_size)})"
            )
            assert self.reference_latency_ms is not None
            lines.append(
                f"latency: model {self.model_latency_ms:.3f} ms, reference "
                f"{self.reference_latency_ms:.3f} ms "
                f"({_ratio(self.model_latency_ms, self.reference_latency_ms)}; median of "
                f"{self.loop_count} runs after {self.warm_up_loop_count} warm-up)"
            )
        else:
            lines.append(f"size:    model {_size(self.model_size)}")
            lines.append(
                f"latency: model {self.model_latency_ms:.3f} ms (median of {self.loop_count} "
                f"runs after {self.warm_up_loop_count} warm-up)"
            )
        cosine = (
            ""
            if self.cosine_distance_threshold is None
            else f", every cosine >= --cosineDistanceThreshold {self.cosine_distance_threshold:g}"
        )
        if self.passed:
            lines.append(
                f"PASS: mean bias {_num(self.mean_bias_percent, '.4g')}% <= --accuracyThreshold "
                f"{self.accuracy_threshold:g}%{cosine}, no NaN/Inf"
            )
        else:
            shown_failures = self.failures[:MAX_FAILURES_SHOWN]
            more = len(self.failures) - len(shown_failures)
            lines.append(
                "FAIL: "
                + "; ".join(shown_failures)
                + (f"; and {more} more (all of them in --reportFile)" if more else "")
            )
        return "\n".join(lines)


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        number = float(value)
        if math.isnan(number):
            return None
        if math.isinf(number):
            return "inf" if number > 0 else "-inf"
        return number
    return value


def _worst(values: list[float], pick: Callable[..., float]) -> float:
    if not values:
        return math.nan
    if any(math.isnan(v) for v in values):
        return math.nan
    return pick(values)


def _sort_key(bias: float) -> float:
    return -math.inf if math.isnan(bias) else -bias  # NaN first, then the largest bias


# ---------------------------------------------------------------------------------------------
# Running


def run_benchmark(
    model_file: str | os.PathLike,
    reference_model: str | os.PathLike | None = None,
    *,
    in_data_dir: str | Sequence[Any] | None = None,
    in_data_file: str | Sequence[str | os.PathLike] | None = None,
    benchmark_data_file: str | os.PathLike | None = None,
    input_shape: str | Mapping[str, Sequence[int]] | None = None,
    accuracy_threshold: float | str | None = None,
    cosine_distance_threshold: float | str | None = None,
    report_file: str | os.PathLike | None = None,
    graph_optimization_level: str | None = None,
    num_threads: int | str | None = None,
    loop_count: int | str | None = None,
    warm_up_loop_count: int | str | None = None,
    progress: Callable[[int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> BenchmarkReport:
    """Compare `model_file` with its reference, time both, decide, and write `report_file`.

    Arguments are the command's flags (strings or Python values, None for the default). The
    report file is written whether the gate passes or fails. `on_start(n)` is called with
    the number of samples once everything is checked, then `progress(1)` after each sample.
    Raise PtqUsageError for wrong flags or data, PtqError when a model cannot be run.
    """
    options = BenchmarkOptions.create(
        model_file,
        reference_model,
        in_data_dir=in_data_dir,
        in_data_file=in_data_file,
        benchmark_data_file=benchmark_data_file,
        input_shape=input_shape,
        accuracy_threshold=accuracy_threshold,
        cosine_distance_threshold=cosine_distance_threshold,
        report_file=report_file,
        graph_optimization_level=graph_optimization_level,
        num_threads=num_threads,
        loop_count=loop_count,
        warm_up_loop_count=warm_up_loop_count,
    )
    report = benchmark(options, progress, on_start)
    if options.report_file is not None:
        report.write(options.report_file)
    return report


def benchmark(
    options: BenchmarkOptions,
    progress: Callable[[int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> BenchmarkReport:
    """`run_benchmark` on checked options, without writing the report file."""
    level, threads = options.graph_optimization_level, options.num_threads
    data_file = None
    if options.benchmark_data_file is not None:
        # Read and check the file before any model runs.
        data_file = read_benchmark_data(options.benchmark_data_file)
    _, samples = open_samples(options.model_file, options)
    model = _Session(options.model_file, f"--modelFile {_p(options.model_file)}", level, threads)
    first: list[Mapping[str, np.ndarray]] = []
    not_compared: list[str] = []
    reference_latency = None
    if options.reference_model is not None:
        reference = _Session(
            options.reference_model,
            f"--referenceModel {_p(options.reference_model)}",
            level,
            threads,
        )
        _check_same_io(model, reference)
        if on_start:
            on_start(len(samples))
        comparisons = _compare_sessions(model, reference, samples, progress, first)
        reference_size = modelio.model_size(options.reference_model)
        reference_latency = reference.latency_ms(
            first[0], options.loop_count, options.warm_up_loop_count
        )
    else:
        assert data_file is not None and options.benchmark_data_file is not None
        comparisons = _compare_with_data(
            model, data_file, options.benchmark_data_file, samples, on_start, progress, first
        )
        not_compared = [n for n in model.outputs if n not in comparisons]
        reference_size = options.benchmark_data_file.stat().st_size
    model_latency = model.latency_ms(first[0], options.loop_count, options.warm_up_loop_count)
    failures = gate_failures(
        comparisons, options.accuracy_threshold, options.cosine_distance_threshold
    )
    return BenchmarkReport(
        model_file=options.model_file,
        model_size=modelio.model_size(options.model_file),
        model_latency_ms=model_latency,
        reference_model=options.reference_model,
        benchmark_data_file=options.benchmark_data_file,
        reference_size=reference_size,
        reference_latency_ms=reference_latency,
        samples=len(samples),
        comparisons=comparisons,
        accuracy_threshold=options.accuracy_threshold,
        cosine_distance_threshold=options.cosine_distance_threshold,
        graph_optimization_level=level,
        num_threads=threads,
        loop_count=options.loop_count,
        warm_up_loop_count=options.warm_up_loop_count,
        not_compared=not_compared,
        failures=failures,
    )


def _compare_with_data(
    model: _Session,
    data: Mapping[str, BenchmarkTensor],
    path: Path,
    samples: CalibrationSet,
    on_start: Callable[[int], None] | None,
    progress: Callable[[int], None] | None,
    first: list[Mapping[str, np.ndarray]],
) -> dict[str, OutputComparison]:
    where = f"--benchmarkDataFile: {_p(path)}"
    for tensor in data.values():
        if tensor.name not in model.outputs:
            raise PtqUsageError(
                f"{where} line {tensor.line}: {tensor.name!r} is not an output of --modelFile; "
                f"its outputs: {_names(model.outputs)}"
            )
    if len(samples) != 1:
        raise PtqUsageError(
            f"{where} holds the outputs of one sample but {len(samples)} samples were given"
        )
    if on_start:
        on_start(1)
    sample = next(iter(samples))
    first.append(sample)
    outputs = model.run(sample, "the --inDataFile sample")
    comparisons = {}
    for name in model.outputs:  # the model's output order
        if name not in data:
            continue
        tensor = data[name]
        if tuple(tensor.values.shape) != tuple(outputs[name].shape):
            raise PtqUsageError(
                f"{where} line {tensor.line}: tensor {name!r} has shape "
                f"{_shape(tensor.values.shape)} but the model's output has shape "
                f"{_shape(outputs[name].shape)}"
            )
        comparison = OutputComparison(name)
        comparison.update(tensor.values, outputs[name])
        comparisons[name] = comparison
    if progress:
        progress(1)
    return comparisons




# ---------------------------------------------------------------------------------------------
# Small formatting helpers


def _label(role: str, source: ModelSource) -> str:
    if isinstance(source, (str, os.PathLike)):
        return f"{role} {_p(Path(source))}"
    return role


def _first(exc: BaseException) -> str:
    text = str(exc).strip()
    return _oneline(text.splitlines()[0]) if text else type(exc).__name__


def _names(names: Iterable[str]) -> str:
    return ", ".join(repr(n) for n in names)


def _shape(shape: Iterable[int]) -> str:
    return "[" + ",".join(str(int(d)) for d in shape) + "]"


def _num(value: float | None, spec: str) -> str:
    if value is None or math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return format(value, spec)


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def _cut(name: str, width: int) -> str:
    name = _oneline(name)
    if len(name) <= width:
        return name
    keep = width - 3
    return name[: keep // 2] + "..." + name[len(name) - (keep - keep // 2) :]


def _clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."





# ---------------------------------------------------------------------------------------------
# The command

EPILOG = """\b
Examples:
  ptqconv benchmark --modelFile=model_int8.onnx --referenceModel=model.onnx \\
          --inDataDir=input:eval/input --reportFile=report.json
  ptqconv benchmark --modelFile=model_int8.onnx --inDataFile=sample.bin \\
          --benchmarkDataFile=sample.out --accuracyThreshold=1

\b
Benchmark data file (MindSpore's format), for every output:
  name ndims d0 ... dn-1
  v0 v1 v2 ...

\b
Exit status: 0 the gate passed, 1 it failed (or a model could not run), 2 a flag or an input
file is wrong.
"""


@click.command(
    name="benchmark",
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog=EPILOG,
)
@click.option("--modelFile", "model_file", metavar="PATH", help="Quantized ONNX model to check.")
@click.option(
    "--referenceModel",
    "reference_model",
    metavar="PATH",
    help="Float ONNX model run on the same inputs (or give --benchmarkDataFile).",
)
@click.option(
    "--inDataDir",
    "in_data_dir",
    metavar="DIRS",
    help="Input samples as .bin files, one directory per input: name:dir[,name:dir...] or "
    "dir[,dir...] in input order (like calibrate_path / image_path). All files are used.",
)
@click.option(
    "--inDataFile",
    "in_data_file",
    metavar="FILES",
    help="One sample: one .bin file per model input, comma-separated, in input order.",
)
@click.option(
    "--benchmarkDataFile",
    "benchmark_data_file",
    metavar="PATH",
    help="Reference outputs of the --inDataFile sample, in MindSpore's benchmark data format "
    "(instead of --referenceModel).",
)
@click.option(
    "--inputShape",
    "input_shape",
    metavar="SHAPES",
    help="Shapes of dynamic inputs: name:d0,d1,...[;name2:...].",
)
@click.option(
    "--accuracyThreshold",
    "accuracy_threshold",
    metavar="PERCENT",
    help="Fail when the model's mean bias (MindSpore's formula, percent) is above PERCENT.  "
    "[default: 0.5]",
)
@click.option(
    "--cosineDistanceThreshold",
    "cosine_distance_threshold",
    metavar="COS",
    help="Also fail when any output's cosine similarity is below COS.  [default: off]",
)
@click.option("--reportFile", "report_file", metavar="PATH", help="Write a JSON report to PATH.")
@click.option(
    "--graphOptimizationLevel",
    "graph_optimization_level",
    metavar="LEVEL",
    help="onnxruntime graph optimizations for both models: disable, basic, extended or all.  "
    "[default: all]",
)
@click.option("--numThreads", "num_threads", metavar="N", help="Threads per session.  [default: 2]")
@click.option(
    "--loopCount",
    "loop_count",
    metavar="N",
    help="Latency: timed runs of each model on the first sample.  [default: 10]",
)
@click.option(
    "--warmUpLoopCount",
    "warm_up_loop_count",
    metavar="N",
    help="Latency: untimed runs before timing.  [default: 3]",
)
@click.option("--quiet", is_flag=True, help="Print nothing but errors; the exit status tells.")
@click.option("--verbose", is_flag=True, help="Show tracebacks on errors.")
def benchmark_command(quiet: bool, verbose: bool, **flags: str | None) -> None:
    """Check a quantized model's accuracy against its float model (MindSpore benchmark flags)."""
    # Pass: returns None. Fail: raises click.exceptions.Exit(1), which click turns into exit
    # status 1 in standalone mode and into the return value 1 of .main(standalone_mode=False).
    # Errors propagate as PtqError / PtqUsageError for ptqconv.cli.main to print.
    show = not quiet and sys.stderr.isatty()
    bar: list[Any] = []

    def on_start(total: int) -> None:
        if show and total > 1:
            bar.append(
                click.progressbar(
                    length=total, label="comparing", file=sys.stderr, show_eta=True
                ).__enter__()
            )

    def progress(amount: int) -> None:
        if bar:
            bar[0].update(amount)

    try:
        report = run_benchmark(**flags, progress=progress, on_start=on_start)  # type: ignore[arg-type]
    finally:
        if bar:
            bar[0].__exit__(None, None, None)
    if not quiet:
        click.echo(report.format())
    if not report.passed:
        raise click.exceptions.Exit(1)
