"""Streaming collection: samples flow through one onnxruntime session into accumulators.

The float model gets the tensors to observe as extra graph outputs; each sample is run, every
accumulator of a tensor is updated with it, and the outputs are dropped, so memory does not
depend on the number of samples. Inference of sample k+1 overlaps with accumulating sample k.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import numpy as np
import onnx_ir as ir

from ptqconv import runtime
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
    lists them.
    """
    accumulators: dict[StatisticPoint, Accumulator] = {
        point: point.statistic.create() for point in unique_points(points)}
    by_tensor: dict[str, list[Accumulator]] = {}
    for point, accumulator in accumulators.items():
        by_tensor.setdefault(point.tensor, []).append(accumulator)
    inputs = {v.name for v in model.graph.inputs}
    fetched = [name for name in by_tensor if name not in inputs]
    fed = [name for name in by_tensor if name in inputs]
    skipped: set[str] = set()

    refused: set[int] = set()  # ids of accumulators given values they do not take

    def update(name: str, array: np.ndarray) -> None:
        for accumulator in by_tensor[name]:
            if id(accumulator) in refused:
                continue
            if accumulator.accepts(array.dtype):
                accumulator.update(array)
            else:
                refused.add(id(accumulator))
                skipped.add(name)

    def consume(outputs: dict[str, np.ndarray]) -> None:
        for name, array in outputs.items():
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
        with runtime.probe(model, fetched, threads, label="calibration") as session:
            runtime.stream(session, with_inputs(samples), fetched, consume, progress)
    kept = {point: acc for point, acc in accumulators.items() if id(acc) not in refused}
    return Statistics(kept, frozenset(skipped))
