"""`ptqconv benchmark` flags -> one frozen, checked `BenchmarkSettings`."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ptqconv import arguments, files, runtime, values
from ptqconv.calibrate.images import ImagePreprocess, image_preprocess
from ptqconv.config import load_config
from ptqconv.errors import PtqUsageError

SCHEMA = "ptqconv.benchmark/1"
# MindSpore benchmark defaults (benchmark_base.h): accuracyThreshold 0.5, numThreads 2,
# loopCount 10, warmUpLoopCount 3; its cosineDistanceThreshold default -1.1 means "off".
DEFAULT_ACCURACY_THRESHOLD = 0.5
DEFAULT_THREADS = 2
DEFAULT_LOOP_COUNT = 10
DEFAULT_WARM_UP_LOOP_COUNT = 3


@dataclass(frozen=True)
class BenchmarkSettings:
    """Everything a benchmark run needs, checked. Build it with `BenchmarkSettings.create`."""

    model_file: Path
    reference_model: Path | None = None
    benchmark_data_file: Path | None = None
    in_data_dir: tuple[tuple[str | None, Path], ...] = ()
    in_data_file: tuple[Path, ...] = ()
    input_shape: tuple[tuple[str, tuple[int, ...]], ...] = ()
    input_shapes: tuple[tuple[int, ...], ...] = ()  # MindSpore's --inputShapes, by position
    input_data_format: str | None = None  # of 4-D .bin samples; None: the model's layout
    image: ImagePreprocess | None = None  # --configFile with input_type=IMAGE
    # None: only --cosineDistanceThreshold was given, which then is the gate alone (as in
    # the converter's gate); with neither, MindSpore's 0.5%.
    accuracy_threshold: float | None = DEFAULT_ACCURACY_THRESHOLD
    cosine_distance_threshold: float | None = None
    report_file: Path | None = None
    graph_optimization_level: str = "all"
    num_threads: int = DEFAULT_THREADS
    loop_count: int = DEFAULT_LOOP_COUNT
    warm_up_loop_count: int = DEFAULT_WARM_UP_LOOP_COUNT

    @property
    def random_inputs(self) -> bool:
        """No data given: random inputs, latency only, no accuracy verdict."""
        return not self.in_data_dir and not self.in_data_file

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
        input_shapes: str | Sequence[Sequence[int]] | None = None,
        input_data_format: str | None = None,
        config_file: str | os.PathLike | None = None,
    ) -> BenchmarkSettings:
        """Check raw values (strings from the command line, or Python values; None: the
        default). Raise PtqUsageError, one line naming the flag, for anything wrong.

        Without input data the inputs are random and only latency is measured (MindSpore's
        benchmark does the same); a reference is then optional."""
        model_file, reference_model, benchmark_data_file, report_file, config_file = (
            arguments.each_path(("--modelFile", model_file),
                                ("--referenceModel", reference_model),
                                ("--benchmarkDataFile", benchmark_data_file),
                                ("--reportFile", report_file), ("--configFile", config_file)))
        in_data_dir = arguments.paths("--inDataDir", in_data_dir)
        in_data_file = arguments.paths("--inDataFile", in_data_file)
        input_shape = arguments.shapes("--inputShape", input_shape)
        model = files.input_file("--modelFile", model_file)
        random_inputs = not _given(in_data_dir) and not _given(in_data_file)
        if _given(reference_model) and _given(benchmark_data_file):
            raise PtqUsageError(
                "--referenceModel and --benchmarkDataFile both given; give one: the float "
                "model to run on the same inputs, or a file of its saved outputs")
        if not random_inputs and not _given(reference_model) \
                and not _given(benchmark_data_file):
            raise PtqUsageError(
                "no reference: give --referenceModel (the float model) or --benchmarkDataFile "
                "(its outputs in MindSpore's benchmark data format)")
        if random_inputs and _given(benchmark_data_file):
            raise PtqUsageError(
                "--benchmarkDataFile holds the outputs of one sample; give that sample with "
                "--inDataFile (one .bin file per input)")
        reference = (files.input_file("--referenceModel", reference_model)
                     if _given(reference_model) else None)
        data_file = (files.input_file("--benchmarkDataFile", benchmark_data_file)
                     if _given(benchmark_data_file) else None)
        if _given(in_data_dir) and _given(in_data_file):
            raise PtqUsageError(
                "--inDataDir and --inDataFile both given; give one: directories of .bin samples "
                "(--inDataDir) or one .bin file per input (--inDataFile)")
        if data_file is not None and _given(in_data_dir):
            raise PtqUsageError(
                "--benchmarkDataFile holds the outputs of one sample; give that sample with "
                "--inDataFile (one .bin file per input), not --inDataDir")
        dirs = _flag("--inDataDir", in_data_dir, _in_data_dir) if _given(in_data_dir) else ()
        sample_files = (_flag("--inDataFile", in_data_file, _in_data_file)
                 if _given(in_data_file) else ())
        shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()
        if _given(input_shape):
            shapes = _flag("--inputShape", input_shape, values.shapes)
        positional: tuple[tuple[int, ...], ...] = ()
        if isinstance(input_shapes, str) and _given(input_shapes):
            positional = _flag("--inputShapes", input_shapes, values.positional_shapes)
        elif input_shapes:
            if isinstance(input_shapes, (bytes, Mapping)) or not isinstance(input_shapes,
                                                                          Sequence):
                raise PtqUsageError(f"--inputShapes: {input_shapes!r} is not a list of "
                                    "shapes, one per model input")
            positional = tuple(_flag("--inputShapes", s, lambda v, i=i: values.dims(v, f"#{i}"))
                               for i, s in enumerate(input_shapes, 1))
        if shapes and positional:
            raise PtqUsageError("--inputShape and --inputShapes both given; give one: "
                                "name:d0,d1,...;... or MindSpore's d0,d1,...:... by position")
        layout = (_flag("--inputDataFormat", input_data_format, values.data_format)
                  if _given(input_data_format) else None)
        image = None
        if _given(config_file):
            image = image_preprocess(load_config(files.input_file("--configFile", config_file)))
        level = "all" if graph_optimization_level is None else str(graph_optimization_level)
        level = _flag("--graphOptimizationLevel", level,
                      lambda v: values.choice(v, tuple(runtime.LEVELS)).lower())
        return cls(
            model_file=model,
            reference_model=reference,
            benchmark_data_file=data_file,
            in_data_dir=dirs,
            in_data_file=sample_files,
            input_shape=shapes,
            input_shapes=positional,
            input_data_format=layout,
            image=image,
            accuracy_threshold=_optional("--accuracyThreshold", accuracy_threshold,
                                         lambda v: values.real(v, 0.0, 1e6),
                                         None if _given(cosine_distance_threshold)
                                         else DEFAULT_ACCURACY_THRESHOLD),
            cosine_distance_threshold=_optional("--cosineDistanceThreshold",
                                                cosine_distance_threshold,
                                                lambda v: values.real(v, -1.0, 1.0), None),
            report_file=_report_file(report_file, [model, reference, data_file, *sample_files])
            if _given(report_file) else None,
            graph_optimization_level=level,
            num_threads=_optional("--numThreads", num_threads,
                                  lambda v: values.integer(v, 1, 1024), DEFAULT_THREADS),
            loop_count=_optional("--loopCount", loop_count,
                                 lambda v: values.integer(v, 1, 1_000_000), DEFAULT_LOOP_COUNT),
            warm_up_loop_count=_optional("--warmUpLoopCount", warm_up_loop_count,
                                         lambda v: values.integer(v, 0, 1_000_000),
                                         DEFAULT_WARM_UP_LOOP_COUNT),
        )


def _given(value: object) -> bool:
    if value is None:
        return False
    if isinstance(value, (str, os.PathLike)):
        return str(value).strip() != ""
    if isinstance(value, Sequence):
        return len(value) > 0
    return True


def _flag(flag: str, value: Any, parse: Any) -> Any:
    try:
        return parse(value)
    except values.Invalid as exc:
        raise PtqUsageError(f"{flag}: {exc}") from None


def _optional(flag: str, value: Any, parse: Any, default: Any) -> Any:
    return default if value is None else _flag(flag, value, parse)


def _in_data_dir(value: Any) -> tuple[tuple[str | None, Path], ...]:
    """`name:dir,name2:dir2` (split at the last ':', like calibrate_path) or `dir,dir2`."""
    if not isinstance(value, str):
        value = [item if isinstance(item, tuple) else os.fspath(item) for item in value]
    return tuple((name, Path(d)) for name, d in values.name_dirs(value, positional=True))


def _in_data_file(value: Any) -> tuple[Path, ...]:
    """Comma-separated `.bin` files, one per model input in input order."""
    items = (values.items(value, what="file") if isinstance(value, str)
             else [os.fspath(v) for v in value])
    return tuple(Path(item) for item in items)


def _report_file(value: str | os.PathLike, inputs: Sequence[Path | None]) -> Path:
    """--reportFile, which must not name a file the benchmark reads."""
    files.refuse_inputs([("--reportFile", Path(value))],
                        [("an input of this benchmark", p) for p in inputs if p is not None])
    return files.output_file("--reportFile", value)
