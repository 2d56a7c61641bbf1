"""The timed cases, each run by `bench.child` in a fresh process. Tool imports stay inside
the functions: each case pays its own imports, as a user's process would."""

from __future__ import annotations

from typing import Any


def float_inference(model: str, data: str, count: int, name: str, shape: list[int],
                    threads: int) -> None:
    """Plain inference of the first `count` samples: the floor every calibration pays."""
    from pathlib import Path

    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    for path in sorted(Path(data).iterdir())[:count]:
        session.run(None, {name: np.fromfile(path, np.float32).reshape(shape)})


def ptqconv(args: list[str]) -> None:
    """The ptqconv command line, as a user runs it."""
    from ptqconv.cli import main

    status = main(args)
    assert status == 0, f"ptqconv exit status {status}"


def ort_static(model: str, out: str, inputs: list[dict[str, Any]], count: int,
               method: str = "MinMax", bins: int = 0) -> None:
    """onnxruntime `quantize_static` as it is usually run: QDQ, per-channel int8 weights,
    uint8 activations. `inputs` are {name, dir (a directory of .bin files), dtype, shape}.

    quantize_static (onnxruntime 1.31) does not pass a bin count to its calibrator
    (CalibNumBins is not among the options it forwards), so Entropy always runs with 128
    bins, which with 128 quantized bins leaves one candidate, the MinMax range: `bins` wraps
    create_calibrator to give it more.
    """
    import importlib
    from pathlib import Path

    import numpy as np
    import onnxruntime as ort
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    ort.set_default_logger_severity(3)
    if bins:
        module = importlib.import_module("onnxruntime.quantization.quantize")
        create = module.create_calibrator

        def with_bins(*args: Any, extra_options: dict | None = None, **kwargs: Any) -> Any:
            return create(*args, extra_options=dict(extra_options or {}, num_bins=bins),
                          **kwargs)

        module.create_calibrator = with_bins
    files = {x["name"]: sorted(Path(x["dir"]).iterdir())[:count] for x in inputs}

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.i = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self.i == count:
                return None
            feed = {x["name"]: np.fromfile(files[x["name"]][self.i], x["dtype"])
                    .reshape(x["shape"]) for x in inputs}
            self.i += 1
            return feed

    quantize_static(model, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=getattr(CalibrationMethod, method))


def ort_dynamic(src: str, out: str, external: bool) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(src, out, per_channel=True, weight_type=QuantType.QInt8,
                     use_external_data_format=external)


def ort_nbits(src: str, out: str, external: bool) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(onnx.load(src), bits=4)
    quantizer.process()
    onnx.save(quantizer.model.model, out, save_as_external_data=external)


def latency(model: str, optimized: str, sample: str, name: str, shape: list[int],
            threads: int, warmup: int, runs: int) -> dict[str, Any]:
    """Median latency of `runs` runs on one sample, and the optimized graph's op counts."""
    import collections
    import statistics
    import time

    import numpy as np
    import onnx
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = optimized
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    feed = {name: np.fromfile(sample, np.float32).reshape(shape)}
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    ops = collections.Counter(
        n.op_type for n in onnx.load(optimized, load_external_data=False).graph.node)
    return {"ms": statistics.median(times) * 1000, "ops": dict(ops)}


MAX_ROUNDS = 20000


def latency_vs_float(models: dict[str, str], sample: dict[str, dict[str, Any]],
                     threads: list[int], runs: int, warmup: int = 3) -> dict[str, Any]:
    """Latency of every model against the first ("float"), interleaved: each of `runs`
    rounds runs every model once, in a shuffled order, so load from other processes hits all
    alike; default session options (all graph optimizations) but for idle intra-op threads
    spinning at most ptqconv's SPIN_US (`runtime.bound_spinning`: unbounded, the idle
    sessions' threads took the cores from the one running), at each thread count of
    `threads`, for at least `runs` rounds and half a second of the float model. Also the
    share of each model's Conv/MatMul/Gemm work in integer kernels."""
    import random
    import statistics
    import time

    import numpy as np
    import onnxruntime as ort

    from ptqconv.evaluate.kernels import kernel_share
    from ptqconv.runtime import MIN_SECONDS, bound_spinning

    ort.set_default_logger_severity(3)
    feed = {name: np.fromfile(x["path"], x["dtype"]).reshape(x["shape"])
            for name, x in sample.items()}
    result: dict[str, Any] = {label: {"ms": {}} for label in models}
    for count in threads:
        sessions = {}
        for label, path in models.items():
            options = ort.SessionOptions()
            options.intra_op_num_threads = count
            bound_spinning(options)
            sessions[label] = ort.InferenceSession(path, options,
                                                   providers=["CPUExecutionProvider"])
            for _ in range(warmup):
                sessions[label].run(None, feed)
        times: dict[str, list[float]] = {label: [] for label in sessions}
        order = list(sessions)
        shuffle = random.Random(0).shuffle
        # At least `runs` rounds, and as many as take the first model MIN_SECONDS, as the
        # converter's own timing: 30 runs of a 0.3 ms model are 10 ms, all noise.
        floor = times[next(iter(models))]
        while len(floor) < runs or (sum(floor) < MIN_SECONDS and len(floor) < MAX_ROUNDS):
            shuffle(order)
            for label in order:
                start = time.perf_counter()
                sessions[label].run(None, feed)
                times[label].append(time.perf_counter() - start)
        for label in models:
            result[label]["ms"][str(count)] = statistics.median(times[label]) * 1000
    for label, path in models.items():
        share = kernel_share(path, feed, threads[0])
        result[label].update(integer_share=share.integer_share, nodes=share.nodes)
    return result


def nncf_quantize(model: str, out: str, inputs: list[dict[str, Any]], count: int,
                  transformer: bool) -> dict[str, Any]:
    """NNCF's ONNX backend as its docs run it: `nncf.quantize` with the default preset on
    `count` calibration samples (`subset_size=count`), `model_type=TRANSFORMER` when
    `transformer`. A model below opset 13 is raised to 13 first (onnx.version_converter):
    NNCF's ONNX backend needs per-axis QuantizeLinear. `inputs` as for `ort_static`."""
    from pathlib import Path

    import nncf
    import numpy as np
    import onnx
    from onnx import version_converter

    proto = onnx.load(model)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:
        proto = version_converter.convert_version(proto, 13)
    files = {x["name"]: sorted(Path(x["dir"]).iterdir())[:count] for x in inputs}
    samples = [{x["name"]: np.fromfile(files[x["name"]][i], x["dtype"]).reshape(x["shape"])
                for x in inputs} for i in range(count)]
    kwargs = {"model_type": nncf.ModelType.TRANSFORMER} if transformer else {}
    quantized = nncf.quantize(proto, nncf.Dataset(samples), subset_size=count, **kwargs)
    onnx.save(quantized, out)
    return {"nncf": nncf.__version__, "opset": max(opset, 13),
            "model_type": "TRANSFORMER" if transformer else "default"}
