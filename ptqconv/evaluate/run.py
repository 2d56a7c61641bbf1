"""One benchmark run: samples, sessions, comparison, latency and the verdict.

`ptqconv benchmark` follows MindSpore Lite's benchmark tool (docs/reference.md §4): the model
given by `--modelFile` is run on input samples and its outputs are compared, by name, with
the outputs of `--referenceModel` on the same samples, or with a MindSpore benchmark data
file (`--benchmarkDataFile`). The verdict fails when the model's mean bias is above
`--accuracyThreshold` percent, when an output's cosine similarity is below
`--cosineDistanceThreshold`, or when the model outputs NaN/Inf. Outputs of the model missing
from a data file are not compared (as in MindSpore); a tensor of the file that is not an
output of the model is an error. Without input data the inputs are random (one seeded sample,
as MindSpore's benchmark does): only latency is measured, with no accuracy verdict.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from ptqconv import files, modelio
from ptqconv.calibrate.dataset import CalibrationSet, InputSpec, model_inputs
from ptqconv.errors import PtqUsageError, shown
from ptqconv.evaluate.comparison import check_same_io, compare_sessions, gate_failures, names
from ptqconv.evaluate.data_file import BenchmarkTensor, read_benchmark_data, shape_text
from ptqconv.evaluate.kernels import kernel_share
from ptqconv.evaluate.metrics import OutputComparison
from ptqconv.evaluate.options import BenchmarkSettings
from ptqconv.evaluate.report import BenchmarkReport
from ptqconv.runtime import Session


def benchmark(
    settings: BenchmarkSettings,
    progress: Callable[[int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> BenchmarkReport:
    """Compare, time both models and decide; writes `settings.report_file` when it is set
    (whether the gate passes or not). `on_start(n)` is called with the number of samples
    once everything is checked, then `progress(1)` after each sample.

    Raise PtqUsageError for wrong flags or data, PtqError when a model cannot be run.
    """
    if not isinstance(settings, BenchmarkSettings):
        raise PtqUsageError(f"benchmark takes BenchmarkSettings.create(...), not "
                            f"{type(settings).__name__}")
    level, threads = settings.graph_optimization_level, settings.num_threads
    if settings.random_inputs:
        return _latency_only(settings, progress, on_start)
    data_file = None
    if settings.benchmark_data_file is not None:
        # Read and check the file before any model runs.
        data_file = read_benchmark_data(settings.benchmark_data_file)
    samples = open_samples(settings)
    if settings.report_file is not None:
        files.refuse_inputs([("--reportFile", settings.report_file)],
                            [("an input sample", path) for paths in samples.files.values()
                             for path in paths])
    model = Session(settings.model_file, threads, level,
                    f"--modelFile {shown(settings.model_file)}")
    first: list[Mapping[str, np.ndarray]] = []
    not_compared: list[str] = []
    reference_latency = None
    if settings.reference_model is not None:
        reference = Session(settings.reference_model, threads, level,
                            f"--referenceModel {shown(settings.reference_model)}")
        check_same_io(model, reference)
        if on_start:
            on_start(len(samples))
        comparisons = compare_sessions(model, reference, samples, progress, first)
        reference_size = modelio.model_size(settings.reference_model)
        reference_latency = reference.latency_ms(first[0], settings.loop_count,
                                                 settings.warm_up_loop_count)
    else:
        assert data_file is not None and settings.benchmark_data_file is not None
        comparisons = _compare_with_data(model, data_file, settings.benchmark_data_file,
                                         samples, on_start, progress, first)
        not_compared = [n for n in model.outputs if n not in comparisons]
        reference_size = settings.benchmark_data_file.stat().st_size
    model_latency = model.latency_ms(first[0], settings.loop_count, settings.warm_up_loop_count)
    kernels = kernel_share(settings.model_file, first[0], threads, level)
    report = BenchmarkReport(
        settings=settings,
        model_size=modelio.model_size(settings.model_file),
        model_latency_ms=model_latency,
        reference_size=reference_size,
        reference_latency_ms=reference_latency,
        kernels=kernels,
        samples=len(samples),
        comparisons=comparisons,
        not_compared=not_compared,
        failures=gate_failures(comparisons, settings.accuracy_threshold,
                               settings.cosine_distance_threshold),
        data=samples.format,
    )
    if settings.report_file is not None:
        report.write(settings.report_file)
    return report


def open_samples(settings: BenchmarkSettings) -> CalibrationSet:
    """The samples the settings point at, all checked against the model's inputs."""
    inputs = model_inputs(settings.model_file)
    shapes = _shapes(inputs, settings)
    layout, image = settings.input_data_format, settings.image
    if settings.in_data_dir:
        return CalibrationSet.open(inputs, settings.in_data_dir, sys.maxsize, shapes,
                                   what="--inDataDir", layout=layout, image=image)
    return CalibrationSet.from_files(inputs, settings.in_data_file, shapes, what="--inDataFile",
                                     layout=layout, image=image)


def _shapes(inputs: list[InputSpec], settings: BenchmarkSettings) -> dict[str, tuple[int, ...]]:
    """--inputShape by name, or MindSpore's --inputShapes paired with the inputs by position."""
    if not settings.input_shapes:
        return dict(settings.input_shape)
    if len(settings.input_shapes) != len(inputs):
        raise PtqUsageError(
            f"--inputShapes: {len(settings.input_shapes)} shape(s) for {len(inputs)} model "
            f"input(s) ({names(s.name for s in inputs)}); give one per input, in input order, "
            "separated by ':'")
    return {spec.name: shape for spec, shape in zip(inputs, settings.input_shapes, strict=True)}


def random_sample(inputs: list[InputSpec], shapes: Mapping[str, tuple[int, ...]],
                  ) -> dict[str, np.ndarray]:
    """One seeded random sample: floats in [0, 1), integers and booleans 0 or 1 (valid ids and
    masks for any model). A dynamic batch is 1; other dynamic dimensions need a shape."""
    rng = np.random.default_rng(0)
    sample = {}
    for spec in inputs:
        shape = shapes.get(spec.name)
        if shape is None:
            declared = spec.shape
            if declared is None:
                raise PtqUsageError(f"random inputs: input {spec.name!r} declares no shape; "
                                    "give --inputShapes (or --inputShape)")
            dims = [d if isinstance(d, int) and d > 0 else None for d in declared]
            if dims and dims[0] is None:
                dims[0] = 1
            if None in dims:
                raise PtqUsageError(
                    f"random inputs: input {spec.name!r} has dynamic dimensions "
                    f"{_shape_text(declared)}; give --inputShapes (or --inputShape)")
            shape = tuple(int(d) for d in dims)
        if spec.dtype.kind == "f":
            sample[spec.name] = rng.random(shape, dtype=np.float32).astype(spec.dtype)
        elif spec.dtype.kind in "iub":
            sample[spec.name] = rng.integers(0, 2, shape).astype(spec.dtype)
        else:
            raise PtqUsageError(f"random inputs: input {spec.name!r} is {spec.dtype.name}; "
                                "give --inDataDir or --inDataFile")
    return sample


def _shape_text(shape: tuple) -> str:
    return "[" + ",".join(str(d) if isinstance(d, int) and d > 0 else "?" for d in shape) + "]"


def _latency_only(settings: BenchmarkSettings, progress: Callable[[int], None] | None,
                  on_start: Callable[[int], None] | None) -> BenchmarkReport:
    level, threads = settings.graph_optimization_level, settings.num_threads
    inputs = model_inputs(settings.model_file)
    sample = random_sample(inputs, _shapes(inputs, settings))
    model = Session(settings.model_file, threads, level,
                    f"--modelFile {shown(settings.model_file)}")
    if on_start:
        on_start(1)
    loops, warm = settings.loop_count, settings.warm_up_loop_count
    reference_latency = None
    reference_size = 0
    if settings.reference_model is not None:
        reference = Session(settings.reference_model, threads, level,
                            f"--referenceModel {shown(settings.reference_model)}")
        check_same_io(model, reference)
        reference_latency = reference.latency_ms(sample, loops, warm)
        reference_size = modelio.model_size(settings.reference_model)
    report = BenchmarkReport(
        settings=settings,
        model_size=modelio.model_size(settings.model_file),
        model_latency_ms=model.latency_ms(sample, loops, warm),
        reference_size=reference_size,
        reference_latency_ms=reference_latency,
        samples=0,
        comparisons={},
    )
    if progress:
        progress(1)
    if settings.report_file is not None:
        report.write(settings.report_file)
    return report


def _compare_with_data(
    model: Session,
    data: Mapping[str, BenchmarkTensor],
    path: Path,
    samples: CalibrationSet,
    on_start: Callable[[int], None] | None,
    progress: Callable[[int], None] | None,
    first: list[Mapping[str, np.ndarray]],
) -> dict[str, OutputComparison]:
    where = f"--benchmarkDataFile: {shown(path)}"
    for tensor in data.values():
        if tensor.name not in model.outputs:
            raise PtqUsageError(
                f"{where} line {tensor.line}: {tensor.name!r} is not an output of --modelFile; "
                f"its outputs: {names(model.outputs)}")
    if len(samples) != 1:
        raise PtqUsageError(
            f"{where} holds the outputs of one sample but {len(samples)} samples were given")
    if on_start:
        on_start(1)
    sample = next(iter(samples))
    first.append(sample)
    outputs = model.run(sample, sample="the --inDataFile sample")
    comparisons = {}
    for name in model.outputs:  # the model's output order
        if name not in data:
            continue
        tensor = data[name]
        if tuple(tensor.values.shape) != tuple(outputs[name].shape):
            raise PtqUsageError(
                f"{where} line {tensor.line}: tensor {name!r} has shape "
                f"{shape_text(tensor.values.shape)} but the model's output has shape "
                f"{shape_text(outputs[name].shape)}")
        comparison = OutputComparison(name)
        comparison.update(tensor.values, outputs[name])
        comparisons[name] = comparison
    if progress:
        progress(1)
    return comparisons
