"""Streaming calibration: samples flow through one onnxruntime session into observers.

The float model gets the tensors to observe as extra graph outputs; each sample is run, every
observer is updated with its tensor, and the outputs are dropped, so memory does not depend
on the number of samples. Inference of sample k+1 overlaps with observing sample k (onnxruntime
releases the GIL), which hides most of the observers' cost.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from ptqconv import modelio
from ptqconv.calibrate.observers import Observer
from ptqconv.passes.naming import values_by_name

# The graphs ptqconv runs were already simplified by onnxruntime (modelio). Applying
# MatMulAddFusion a second time, to a graph holding its own Reshape -> Gemm -> Reshape output,
# fails in onnxruntime 1.31 with "Attempt to replace the existing tensor" (attention blocks).
REAPPLIED_FUSIONS = ["MatMulAddFusion"]


def session_options(threads: int, level: str = "all") -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    # Observers run on the Python thread while the next sample is inferred; spinning
    # onnxruntime threads would take the cores they need.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    return options


@contextlib.contextmanager
def probe_session(model: ir.Model, outputs: Sequence[str], threads: int):
    """An onnxruntime session over `model` that also returns the values named in `outputs`.

    The model is not modified: the extra outputs are added to a shallow copy of its graph's
    output list and removed again after serialization.
    """
    graph = model.graph
    values = values_by_name(graph)
    original = list(graph.outputs)
    present = {v.name for v in original}
    graph.outputs.extend(values[name] for name in outputs if name not in present)
    try:
        with tempfile.TemporaryDirectory(prefix="ptqconv-") as tmp:
            if modelio.tensor_bytes(model) > modelio.EXTERNAL_DATA_THRESHOLD:
                path = Path(tmp) / "probe.onnx"
                ir.save(model, path, external_data="probe.onnx.data")
                source: str | bytes = str(path)
            else:
                source = ir.to_proto(model).SerializeToString()
            graph.outputs.clear()
            graph.outputs.extend(original)
            session = ort.InferenceSession(source, session_options(threads),
                                           providers=["CPUExecutionProvider"],
                                           disabled_optimizers=REAPPLIED_FUSIONS)
            del source
            yield session
    finally:
        graph.outputs.clear()
        graph.outputs.extend(original)


def stream(
    session: ort.InferenceSession,
    samples: Iterable[Mapping[str, np.ndarray]],
    names: Sequence[str],
    consume: Callable[[dict[str, np.ndarray]], None],
    progress: Callable[[int], None] | None = None,
) -> int:
    """Run every sample, hand `consume` the named outputs; inference runs one sample ahead."""
    count = 0
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for sample in samples:
            future = pool.submit(session.run, list(names), dict(sample))
            if pending is not None:
                consume(dict(zip(names, pending.result(), strict=True)))
                count += 1
                if progress:
                    progress(1)
            pending = future
        if pending is not None:
            consume(dict(zip(names, pending.result(), strict=True)))
            count += 1
            if progress:
                progress(1)
    return count


def observe(
    model: ir.Model,
    tensors: Sequence[str],
    samples: Iterable[Mapping[str, np.ndarray]],
    make_observer: Callable[[str], Observer],
    threads: int = 1,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Observer]:
    """Observers for the float32 tensors among `tensors`, fed every sample run through `model`.

    Tensors that turn out not to be float32 (planning cannot always know the types of
    intermediate values) are left out of the result.
    """
    inputs = {v.name for v in model.graph.inputs}
    fetched = [name for name in tensors if name not in inputs]
    fed = [name for name in tensors if name in inputs]
    observers = {name: make_observer(name) for name in tensors}
    skipped: set[str] = set()

    def update(name: str, array: np.ndarray) -> None:
        if array.dtype != np.float32:
            skipped.add(name)
        elif name not in skipped:
            observers[name].update(array)

    def consume(outputs: dict[str, np.ndarray]) -> None:
        for name, array in outputs.items():
            update(name, array)

    def with_inputs(stream_in: Iterable[Mapping[str, np.ndarray]]):
        for sample in stream_in:
            for name in fed:
                update(name, sample[name])
            yield sample

    if not fetched:  # only model inputs to observe (session.run([]) would fetch everything)
        for _ in with_inputs(samples):
            if progress:
                progress(1)
    else:
        with probe_session(model, fetched, threads) as session:
            stream(session, with_inputs(samples), fetched, consume, progress)
    return {name: obs for name, obs in observers.items() if name not in skipped}
