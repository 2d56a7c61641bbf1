"""Streaming samples through onnxruntime sessions: in sample order, whichever session ran
them, and calibration alike with one session or two side by side."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from models import conv_net
from onnx import TensorProto, helper

from ptqconv import runtime
from ptqconv.calibrate.collector import collect
from ptqconv.calibrate.observers import MinMaxObserver
from ptqconv.calibrate.statistics import Statistic, StatisticPoint
from ptqconv.errors import PtqError


def doubling() -> bytes:
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]
                             ).SerializeToString()


class Counted(runtime.Session):
    def __init__(self, source: bytes) -> None:
        super().__init__(source)
        self.ran: list[str] = []

    def run(self, feeds, names=None, sample="a sample"):
        self.ran.append(sample)
        return super().run(feeds, names, sample)


@pytest.mark.parametrize("count", [1, 2, 7])
def test_sessions_side_by_side_hand_the_samples_over_in_order(count):
    sessions = [Counted(doubling()), Counted(doubling())]
    samples = [{"x": np.full((1, 4), k, np.float32)} for k in range(count)]
    seen = []
    assert runtime.stream(sessions, samples, ["y"], lambda out: seen.append(out["y"])) == count
    assert [float(y[0, 0]) for y in seen] == [2.0 * k for k in range(count)]
    assert sessions[0].ran == [f"sample {k}" for k in range(0, count, 2)]
    assert sessions[1].ran == [f"sample {k}" for k in range(1, count, 2)]


def test_a_sample_that_fails_stops_the_stream_with_its_error():
    sessions = [runtime.Session(doubling(), label="calibration") for _ in range(2)]
    samples = [{"x": np.zeros((1, 4), np.float32)}] * 3 + [{"x": np.zeros((1, 5), np.float32)}]
    seen = []
    with pytest.raises(PtqError, match=r"^calibration: inference failed on sample 3"):
        runtime.stream(sessions, samples, ["y"], seen.append)
    assert len(seen) == 3


@pytest.mark.parametrize(("threads", "weights", "split"), [
    (1, 0, [1]), (2, 1000, [1, 1]), (3, 1000, [2, 1]), (8, 1000, [4, 4]),
    (2, runtime.REPLICA_MAX_BYTES + 1, [2])])
def test_small_models_run_in_two_sessions_of_half_the_threads(threads, weights, split):
    assert runtime.replicas(threads, weights) == split
    assert sum(split) == threads


def test_calibration_statistics_are_the_same_with_two_sessions(tmp_path, monkeypatch):
    model = ir.from_proto(conv_net())
    tensors = [v.name for node in model.graph for v in node.outputs]
    points = [StatisticPoint(name, Statistic(MinMaxObserver)) for name in tensors]
    rng = np.random.default_rng(0)
    shape = [d.dim_value for d in conv_net().graph.input[0].type.tensor_type.shape.dim]
    name = model.graph.inputs[0].name
    samples = [{name: rng.standard_normal(shape).astype(np.float32)} for _ in range(5)]
    splits = []
    real = runtime.replicas
    monkeypatch.setattr(runtime, "replicas", lambda *a: splits.append(real(*a)) or real(*a))
    one = collect(model, points, samples, threads=1)
    two = collect(model, points, samples, threads=2)
    assert splits == [[1], [1, 1]]
    for point in points:
        a, b = one.get(point.tensor, point.statistic), two.get(point.tensor, point.statistic)
        assert (a.min, a.max) == (b.min, b.max), point.tensor
