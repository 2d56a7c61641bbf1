"""Streaming collection: samples flow through one onnxruntime session into accumulators.

The float model gets the tensors to observe as extra graph outputs (tensors inside If / Loop /
Scan bodies are threaded out first, `calibrate.exposure`); each sample is run, every
accumulator of a tensor is updated with it, and the outputs are dropped, so memory does not
depend on the number of samples. Inference of the next samples overlaps with accumulating
sample k; a small model runs in two sessions side by side (`runtime.replicas`), and the
accumulators still see the samples in order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import numpy as np
import onnx_ir as ir

from ptqconv import runtime
from ptqconv.calibrate.exposure import expose
from ptqconv.calibrate.statistics import Accumulator, StatisticPoint, Statistics, unique_points


def collect(
    model: ir.Model,
    points: Iterable[StatisticPoint],
    samples: Iterable[Mapping[str, np.ndarray]],
    threads: int = 1,
    progress: Callable[[int], None] | None = None,
) -> Statistics:
    """One accumulator per distinct point, fed every sample run through `model`.

    Tensors whose values no accumulator takes (range statistics take float32 only; planning
    cannot always know the types of intermediate values) get none; `Statistics.not_float`
    lists them. A body tensor that did not run for a sample (an If took the other branch, a
    Loop ran no iteration) gives that sample nothing.
    """
    accumulators: dict[StatisticPoint, Accumulator] = {
        point: point.statistic.create() for point in unique_points(points)}
    by_tensor: dict[str, list[Accumulator]] = {}
    for point, accumulator in accumulators.items():
        by_tensor.setdefault(point.tensor, []).append(accumulator)
    for found in by_tensor.values():
        found.sort(key=lambda a: a.order)  # stable: otherwise in the order asked
    inputs = {v.name for v in model.graph.inputs}
    fetched = [name for name in by_tensor if name not in inputs]
    fed = [name for name in by_tensor if name in inputs]
    skipped: set[str] = set()

    refused: set[int] = set()  # ids of accumulators given values they do not take
    arrivals: dict[str, tuple[str, bool]] = {}  # output -> (tensor, per-execution pairs)

    def update(name: str, array: np.ndarray) -> None:
        if not isinstance(array, np.ndarray):  # a sequence or map output: no tensor values
            refused.update(id(a) for a in by_tensor[name])
            skipped.add(name)
            return
        for accumulator in by_tensor[name]:
            if id(accumulator) in refused or not (array.size or accumulator.per_sample):
                continue
            if accumulator.accepts(array.dtype):
                accumulator.update(array)
            else:
                refused.add(id(accumulator))
                skipped.add(name)

    def consume(outputs: dict[str, np.ndarray]) -> None:
        for output, array in outputs.items():
            name, pairs = arrivals[output]
            if pairs and isinstance(array, np.ndarray) and array.dtype == np.float32:
                array = _executed(array)
            update(name, array)

    def with_inputs(stream_in: Iterable[Mapping[str, np.ndarray]]):
        for sample in stream_in:
            for name in fed:
                update(name, sample[name])
            yield sample

    if not fetched:  # only model inputs to observe (a run fetching nothing fetches everything)
        for _ in with_inputs(samples):
            if progress:
                progress(1)
    else:
        probed, exposed = expose(model, fetched)
        arrivals.update((e.output, (name, e.per_execution)) for name, e in exposed.items())
        outputs = list(arrivals)
        split = runtime.replicas(threads, runtime.initializer_bytes(probed))
        with runtime.probes(probed, outputs, split, label="calibration") as sessions:
            runtime.stream(sessions, with_inputs(samples), outputs, consume, progress)
        del sessions, probed  # what release_memory is to give back
        runtime.release_memory()
    kept = {point: acc for point, acc in accumulators.items() if id(acc) not in refused}
    return Statistics(kept, frozenset(skipped))


def _executed(pairs: np.ndarray) -> np.ndarray:
    """The [min, max] over the executions of per-execution pairs (`calibrate.exposure`);
    empty when none ran."""
    low, high = pairs[..., 0].min(initial=np.inf), pairs[..., 1].max(initial=-np.inf)
    return np.array([low, high], np.float32) if low <= high else np.zeros((0,), np.float32)
