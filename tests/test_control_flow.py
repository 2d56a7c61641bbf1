"""Quantization inside If / Loop / Scan bodies: calibration sees the body tensors, the bodies
get Q/DQ in the layout onnxruntime fuses there, and what stays float is said."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from cf_models import (
    loop_model,
    loop_with_if_model,
    reference_cell,
    scan_model,
    stream,
    streaming_model,
    weights,
)
from conftest import run_model
from hypothesis import given, settings
from hypothesis import strategies as st
from models import save, write_samples
from onnx import TensorProto, helper, numpy_helper

from ptqconv import convert, runtime
from ptqconv.calibrate.collector import collect
from ptqconv.calibrate.exposure import expose, per_execution
from ptqconv.calibrate.observers import HistogramObserver, MinMaxObserver
from ptqconv.calibrate.statistics import Folds, Statistic, StatisticPoint
from ptqconv.graph.subgraphs import all_nodes, bodies
from ptqconv.passes.gemm_sum import SplitGemmSumPass
from ptqconv.passes.unique_names import UniqueNamesPass

HIDDEN = 256


def _sequences(count: int, steps: int, hidden: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((steps, 1, hidden)).astype(np.float32) for _ in range(count)]


def _reference_steps(xs: np.ndarray, w: dict[str, np.ndarray], active=None) -> dict:
    """Per-step cell tensors of one sequence, numpy: x_t, h_in and pre_n of the steps run."""
    h = np.zeros((1, xs.shape[-1]), np.float32)
    found: dict[str, list[np.ndarray]] = {"x_t": [], "h_in": [], "pre_n": []}
    for t, x in enumerate(xs):
        if active is not None and not active[t]:
            continue
        r = 1 / (1 + np.exp(-(x @ w["Wxr"] + h @ w["Whr"])))
        found["x_t"].append(x)
        found["h_in"].append(h)
        found["pre_n"].append(x @ w["Wxn"] + r * (h @ w["Whn"]))
        h = reference_cell(x, h, w)
    return found


def _optimized_bodies(path) -> dict[str, Counter]:
    """Op counts of each body of the model onnxruntime runs (all optimizations)."""
    model = runtime.optimized(path)
    return {b.attribute if b.node.op_type != "If" or not b.path else f"inner {b.attribute}":
            Counter(n.op_type for n in b.graph) for b in bodies(model.graph)}


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.parametrize("build", [loop_model, scan_model])
def test_body_tensors_are_observed_as_numpy_computes_them(build):
    hidden = 32
    model = ir.from_proto(build(hidden))
    before = ir.to_proto(model).SerializeToString()
    sequences = _sequences(3, 7, hidden)
    names = ["x_t", "h_in", "pre_n"]
    points = [StatisticPoint(n, Statistic(kind)) for n in names
              for kind in (MinMaxObserver, HistogramObserver)]
    samples = [{"X": xs, "h0": np.zeros((1, hidden), np.float32)} for xs in sequences]
    stats = collect(model, points, samples)
    assert ir.to_proto(model).SerializeToString() == before  # the caller's model untouched
    w = weights(hidden, hidden)
    steps = [_reference_steps(xs, w) for xs in sequences]
    for name in names:
        values = np.concatenate([np.stack(s[name]).ravel() for s in steps])
        reference = HistogramObserver()
        for s in steps:
            reference.update(np.stack(s[name]))
        observed = stats.get(name, Statistic(MinMaxObserver))
        np.testing.assert_allclose([observed.min, observed.max], [values.min(), values.max()],
                                   rtol=1e-5, atol=1e-5)
        histogram = stats.get(name, Statistic(HistogramObserver))
        np.testing.assert_allclose(histogram.range_for("KL", 8), reference.range_for("KL", 8),
                                   rtol=1e-4, atol=1e-4)


def test_an_if_inside_a_loop_is_observed_as_min_max_per_execution():
    hidden = 32
    model = ir.from_proto(loop_with_if_model(hidden))
    assert "pre_n" in per_execution(model) and "x_t" not in per_execution(model)
    _, exposed = expose(model, ["pre_n", "x_t"])
    assert exposed["pre_n"].per_execution and not exposed["x_t"].per_execution
    sequences = _sequences(4, 9, hidden, seed=3)
    gates = [np.random.default_rng(i).random(9) < 0.5 for i in range(4)]
    gates[1][:] = False  # one sequence never takes the branch
    samples = [{"X": xs, "C": c, "h0": np.zeros((1, hidden), np.float32)}
               for xs, c in zip(sequences, gates, strict=True)]
    folds = Statistic(Folds, (Statistic(MinMaxObserver), 2))
    stats = collect(model, [StatisticPoint("pre_n", Statistic(MinMaxObserver)),
                            StatisticPoint("pre_n", folds)], samples)
    w = weights(hidden, hidden)
    steps = [_reference_steps(xs, w, c)["pre_n"] for xs, c in zip(sequences, gates, strict=True)]
    values = np.concatenate([np.stack(s).ravel() for s in steps if s])
    observed = stats.get("pre_n", Statistic(MinMaxObserver))
    np.testing.assert_allclose([observed.min, observed.max], [values.min(), values.max()],
                               rtol=1e-5, atol=1e-5)
    # Sample i stays in fold i % 2 even when its branch never ran.
    by_fold = stats.get("pre_n", folds).parts
    odd = np.concatenate([np.stack(steps[3]).ravel()])
    np.testing.assert_allclose([by_fold[1].min, by_fold[1].max], [odd.min(), odd.max()],
                               rtol=1e-5, atol=1e-5)


@settings(max_examples=15, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=5))
def test_loops_of_any_length_give_the_values_they_ran(lengths):
    hidden = 8
    model = ir.from_proto(loop_model(hidden))
    sequences = [_sequences(1, n, hidden, seed=n)[0] for n in lengths]
    stats = collect(model, [StatisticPoint("x_t", Statistic(MinMaxObserver))],
                    [{"X": xs, "h0": np.zeros((1, hidden), np.float32)} for xs in sequences])
    observed = stats.get("x_t", Statistic(MinMaxObserver))
    ran = [xs for xs in sequences if xs.size]
    if not ran:
        assert not observed.seen
    else:
        values = np.concatenate([xs.ravel() for xs in ran])
        assert (observed.min, observed.max) == (values.min(), values.max())


def _convert_loop(tmp_path, build, hidden: int, config: str = "") -> tuple:
    src = save(build(hidden), tmp_path / "float.onnx")
    data = _sequences(6, 12, hidden)
    x_dir = write_samples(tmp_path / "X", data)
    h_dir = write_samples(tmp_path / "h0", [np.zeros((1, hidden), np.float32)] * len(data))
    ini = tmp_path / "c.ini"
    ini.write_text(f"[data_preprocess_param]\ncalibrate_path=X:{x_dir},h0:{h_dir}\n"
                   f"input_shape=X:12,1,{hidden}\n{config}")
    out = tmp_path / "q.onnx"
    report = convert(src, out, "PostTraining", config_file=ini)
    return src, out, report


@pytest.mark.parametrize("build", [loop_model, scan_model])
def test_loop_and_scan_bodies_run_integer_kernels(tmp_path, build):
    src, out, report = _convert_loop(tmp_path, build, HIDDEN)
    (body,) = _optimized_bodies(out).values()
    # Five MatMuls into Adds run as QLinearMatMul; r * (h Whn) keeps a float output.
    assert body["QLinearMatMul"] == 5 and body["MatMulIntegerToFloat"] == 1
    assert not body["MatMul"] and not body["Gemm"] and not body["FusedGemm"]
    # Every weight DQ was fused: the DQs left dequantize activations for the float tail.
    assert out.stat().st_size < 0.3 * src.stat().st_size
    (summary,) = report.post_training.bodies
    assert summary.weight_ops == 6 and summary.kept_float == {}
    assert "body: 6 units, 6 weight ops quantized" in report.format()
    xs = _sequences(1, 40, HIDDEN, seed=9)[0]
    feeds = {"X": xs, "h0": np.zeros((1, HIDDEN), np.float32)}
    ref, got = (runtime.Session(p).run(feeds, ["Y"])["Y"] for p in (src, out))
    assert _cosine(ref, got) > 0.99


def test_small_bodies_stay_float_and_the_output_does_not_grow(tmp_path):
    src, out, report = _convert_loop(tmp_path, loop_model, 64)
    assert out.read_bytes() == src.read_bytes()
    (summary,) = report.post_training.bodies
    assert summary.units == 0 and len(summary.kept_float) == 6
    text = report.format()
    assert "Loop time_loop.body: stays float" in text
    assert "6 weight ops float" in text
    assert "4096 multiply-adds per execution, fewer than 65536" in text
    assert "written float: the quantized model took" in text


def test_a_streaming_if_model_runs_its_convs_and_matmuls_as_integer_kernels(tmp_path):
    src = save(streaming_model(), tmp_path / "float.onnx")
    samples = stream(src, 48)
    dirs = {name: write_samples(tmp_path / name, [s[name] for s in samples])
            for name in ("x", "h", "active")}
    ini = tmp_path / "c.ini"
    # The dynamic model scores more accurate here and is written when timed 5% faster (VNNI).
    ini.write_text("[data_preprocess_param]\ncalibrate_path="
                   + ",".join(f"{n}:{d}" for n, d in dirs.items()) + "\ncalibrate_size=48\n"
                   "[full_quant_param]\ndynamic_candidate=false\n")
    out = tmp_path / "q.onnx"
    report = convert(src, out, "PostTraining", config_file=ini)
    branches = _optimized_bodies(out)
    active = branches["then_branch"]
    assert active["QLinearConv"] == 1 and active["QLinearMatMul"] == 5
    assert active["MatMulIntegerToFloat"] == 1 and active["QLinearGlobalAveragePool"] == 1
    assert not (active["Conv"] or active["MatMul"] or active["FusedConv"] or active["FusedGemm"])
    # The weight DQs live in the branch (the int8 weights stay in the main graph).
    quantized = ir.load(out)
    then = next(b.graph for b in bodies(quantized.graph) if b.attribute == "then_branch")
    assert sum(n.op_type == "DequantizeLinear" for n in then) >= 7
    # The head's, in main, unless the latency plan (on x86 without VNNI) kept it float.
    head = {n.inputs[0].name for n in quantized.graph if n.op_type == "DequantizeLinear"
            and n.inputs[0].is_initializer()}
    plan = report.post_training.latency_plan
    kept = {c.op_type for c in plan.kept_float} if plan is not None else set()
    assert head == (set() if "MatMul" in kept else {"Wy_quantized"})
    text = report.format()
    assert "If step.then_branch: 8 units, 7 weight ops quantized" in text
    assert "If step.else_branch: stays float (no Conv, Gemm or MatMul)" in text
    # Run as a stream, each model from its own state: the outputs stay close to float.
    reference, got = runtime.Session(src), runtime.Session(out)
    h_ref = h_got = np.zeros((1, 256), np.float32)
    logits = ([], [])
    for t, feeds in enumerate(stream(src, 60, seed=5)):
        h_ref, ref = reference.run({**feeds, "h": h_ref}).values()
        h_got, new = got.run({**feeds, "h": h_got}).values()
        logits[0].append(ref)
        logits[1].append(new)
        assert _cosine(ref, new) > 0.99, t
    assert _cosine(np.stack(logits[0]), np.stack(logits[1])) > 0.995


def test_an_if_inside_a_loop_is_quantized_from_min_max_ranges(tmp_path):
    hidden = HIDDEN
    src = save(loop_with_if_model(hidden), tmp_path / "float.onnx")
    data = _sequences(6, 10, hidden)
    gates = [np.arange(10) % 3 != 0] * len(data)
    dirs = {"X": write_samples(tmp_path / "X", data),
            "C": write_samples(tmp_path / "C", gates),
            "h0": write_samples(tmp_path / "h0", [np.zeros((1, hidden), np.float32)] * 6)}
    ini = tmp_path / "c.ini"
    ini.write_text("[data_preprocess_param]\ncalibrate_path="
                   + ",".join(f"{n}:{d}" for n, d in dirs.items())
                   + f"\ninput_shape=X:10,1,{hidden};C:10\n"
                   "[full_quant_param]\nactivation_quant_method=KL\n")
    out = tmp_path / "q.onnx"
    report = convert(src, out, "PostTraining", config_file=ini)
    inner = _optimized_bodies(out)["inner then_branch"]
    assert inner["QLinearMatMul"] == 5 and not inner["MatMul"]
    text = report.format()
    assert "If gate.then_branch: " in text and "min/max (calibration sees one [min, max]" in text
    feeds = {"X": data[0], "C": gates[0], "h0": np.zeros((1, hidden), np.float32)}
    (ref,), (got,) = (runtime.Session(p).run(feeds).values() for p in (src, out))
    assert _cosine(ref, got) > 0.99


def test_a_body_weight_op_onnxruntime_does_not_fuse_is_kept_float(tmp_path):
    # A Gemm adding a computed tensor at beta 0.5 has no integer kernel: its weight DQ would
    # run on every iteration, so the op is rebuilt float and the summary says why.
    model = loop_model(HIDDEN)
    body = model.graph.node[2].attribute[0].g
    nodes = [n for n in body.node if n.output[0] != "mm_xn"]
    for i, node in enumerate(nodes):
        if node.output[0] == "pre_n":
            nodes[i] = helper.make_node("Gemm", ["x_t", "Wxn", "rh"], ["pre_n"], name="gemm_n",
                                        beta=0.5)
    del body.node[:]
    body.node.extend(nodes)
    _, out, report = _convert_loop(tmp_path, lambda _: model, HIDDEN)
    (summary,) = report.post_training.bodies
    assert summary.kept_float == {"Gemm gemm_n": (
        "onnxruntime did not fuse it into an integer kernel (its DequantizeLinear would run "
        "every execution)")}
    (body_ops,) = _optimized_bodies(out).values()
    assert body_ops["QLinearMatMul"] == 4 and body_ops["FusedGemm"] == 1
    assert "Wxn" in {v.name for v in ir.load(out).graph.initializers.values()}


def test_names_are_made_unique_across_branches():
    then = helper.make_graph([helper.make_node("Relu", ["x"], ["t"]),
                              helper.make_node("Neg", ["t"], ["out_a"])], "a", [],
                             [helper.make_tensor_value_info("out_a", TensorProto.FLOAT, [2])])
    other = helper.make_graph([helper.make_node("Neg", ["x"], ["t"]),
                               helper.make_node("Relu", ["t"], ["out_b"])], "b", [],
                              [helper.make_tensor_value_info("out_b", TensorProto.FLOAT, [2])])
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
         helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model = ir.from_proto(proto)
    assert UniqueNamesPass()(model).modified
    names = [v.name for n in all_nodes(model.graph) for v in n.outputs]
    assert len(names) == len(set(names))
    x = np.array([-1.0, 2.0], np.float32)
    for c in (True, False):
        feeds = {"x": x, "c": np.array(c)}
        assert np.array_equal(runtime.Session(proto.SerializeToString()).run(feeds)["y"],
                              runtime.Session(model).run(feeds)["y"])
    assert not UniqueNamesPass()(ir.from_proto(loop_model(8))).modified


def test_a_gemm_adding_a_computed_tensor_is_split():
    rng = np.random.default_rng(0)
    w, v = (rng.standard_normal((4, 3)).astype(np.float32) for _ in range(2))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "v"], ["c"]),
         helper.make_node("Gemm", ["x", "w", "c"], ["y"], name="g")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(v, "v")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model = ir.from_proto(proto)
    assert SplitGemmSumPass()(model).modified
    assert [n.op_type for n in model.graph] == ["MatMul", "MatMul", "Add"]
    assert model.graph.outputs[0].name == "y"
    x = rng.standard_normal((2, 4)).astype(np.float32)
    np.testing.assert_allclose(runtime.Session(model).run({"x": x})["y"],
                               runtime.Session(proto.SerializeToString()).run({"x": x})["y"],
                               rtol=1e-6, atol=1e-6)
    onnx.checker.check_model(ir.to_proto(model))


def _branches_with_one_weight_twice() -> onnx.ModelProto:
    """y = If(c, x @ W, (x @ W) * 2), each branch holding its own copy of W (as
    onnxruntime's constant folding leaves an outer weight both branches transform), and a
    small table both branches hold too."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    small = np.arange(4, dtype=np.float32)

    def branch(name: str, scale: float) -> onnx.GraphProto:
        nodes = [helper.make_node("MatMul", ["x", f"{name}_w"], [f"{name}_p"]),
                 helper.make_node("Mul", [f"{name}_p", f"{name}_k"], [f"{name}_y"])]
        inits = [numpy_helper.from_array(w, f"{name}_w"),
                 numpy_helper.from_array(np.array(scale, np.float32), f"{name}_k"),
                 numpy_helper.from_array(small, f"{name}_small")]
        return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(
            f"{name}_y", TensorProto.FLOAT, None)], inits)

    node = helper.make_node("If", ["c"], ["y"], then_branch=branch("then", 1.0),
                            else_branch=branch("else", 2.0))
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
                      helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_identical_body_weights_are_held_once_and_compute_the_same(tmp_path):
    from ptqconv.passes.shared_body_weights import ShareBodyWeightsPass

    proto = _branches_with_one_weight_twice()
    model = ir.serde.deserialize_model(proto)
    assert ShareBodyWeightsPass()(model).modified
    shared = [v for v in model.graph.initializers.values()]
    assert [tuple(v.const_value.shape) for v in shared] == [(64, 32)]  # small ones stay
    for body in bodies(model.graph):
        assert {v.name for v in body.graph.initializers.values()} == {
            f"{body.graph.name}_k", f"{body.graph.name}_small"}
        assert any(shared[0] in node.inputs for node in body.graph)
    x = np.random.default_rng(1).standard_normal((1, 64)).astype(np.float32)
    for c in (True, False):
        feeds = {"c": np.array(c), "x": x}
        before = runtime.Session(proto).run(feeds)["y"]
        after = runtime.Session(ir.to_proto(model)).run(feeds)["y"]
        np.testing.assert_array_equal(before, after)
    assert not ShareBodyWeightsPass()(model).modified  # nothing left to share


def test_a_weight_folded_into_both_branches_is_written_once(tmp_path):
    """onnxruntime's simplification folds Transpose(W) into each branch that reads it: a
    copy per branch, the simplified model twice the input. The output holds W's integers
    once, both branches still run integer kernels, and it is smaller than the input."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((512, 256)).astype(np.float32)

    def branch(name: str, scale: float) -> onnx.GraphProto:
        nodes = [helper.make_node("Transpose", ["w"], [f"{name}_wt"], perm=[1, 0]),
                 helper.make_node("MatMul", ["x", f"{name}_wt"], [f"{name}_p"]),
                 helper.make_node("Mul", [f"{name}_p", f"{name}_k"], [f"{name}_y"])]
        return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(
            f"{name}_y", TensorProto.FLOAT, None)],
            [numpy_helper.from_array(np.array(scale, np.float32), f"{name}_k")])

    graph = helper.make_graph(
        [helper.make_node("Greater", ["s", "zero"], ["c"]),
         helper.make_node("If", ["c"], ["y"], then_branch=branch("then", 1.0),
                          else_branch=branch("else", 2.0))], "g",
        [helper.make_tensor_value_info("s", TensorProto.FLOAT, [1]),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 512])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.zeros(1, np.float32),
                                                                  "zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    src = save(model, tmp_path / "float.onnx")
    x_dir = write_samples(tmp_path / "x", rng.standard_normal((12, 1, 256)).astype(np.float32))
    s_dir = write_samples(tmp_path / "s", [np.array([(-1.0) ** i], np.float32)
                                           for i in range(12)])
    ini = tmp_path / "c.ini"
    ini.write_text(f"[data_preprocess_param]\ncalibrate_path=x:{x_dir},s:{s_dir}\n"
                   "[full_quant_param]\nactivation_quant_method=MAX_MIN\nequalize=false\n"
                   "smooth_quant=false\nbias_correction=false\nlatency_aware=false\n"
                   "measure_latency=false\n")
    out = tmp_path / "q.onnx"
    report = convert(src, out, "PostTraining", config_file=ini)
    assert report.size_after < 0.3 * report.size_before
    saved = onnx.load(str(out))
    int8 = [t for t in saved.graph.initializer if t.data_type == TensorProto.INT8
            and len(t.dims) == 2]
    assert len(int8) == 1 and not any(t.data_type == TensorProto.INT8 for body in (
        a.g for n in saved.graph.node for a in n.attribute if a.g.ByteSize())
        for t in body.initializer)
    for body in _optimized_bodies(out).values():
        assert body["MatMulIntegerToFloat"] == 1 and not body["MatMul"]
    session = runtime.Session(out)
    for s in (1.0, -1.0):
        x = rng.standard_normal((1, 256)).astype(np.float32)
        got = session.run({"x": x, "s": np.array([s], np.float32)})["y"]
        expected = x @ w.T * (1.0 if s > 0 else 2.0)
        assert np.abs(got - expected).max() < 0.05 * np.abs(expected).max()


def _if_branches_setup(tmp_path) -> tuple:
    """An If whose two conv branches read the graph input x (nothing quantizable outside),
    its samples and a config: (float model, config)."""
    rng = np.random.default_rng(0)

    def branch(name: str, k: int) -> onnx.GraphProto:
        w = numpy_helper.from_array(
            (rng.standard_normal((32, 16, k, k)) / (4 * k)).astype(np.float32), f"{name}_w")
        w2 = numpy_helper.from_array(
            (rng.standard_normal((32, 32, 1, 1)) / 6).astype(np.float32), f"{name}_w2")
        nodes = [helper.make_node("Conv", ["x", f"{name}_w"], [f"{name}_c"], pads=[k // 2] * 4),
                 helper.make_node("Relu", [f"{name}_c"], [f"{name}_r"]),
                 helper.make_node("Conv", [f"{name}_r", f"{name}_w2"], [f"{name}_o"])]
        out = helper.make_tensor_value_info(f"{name}_o", TensorProto.FLOAT, [1, 32, 16, 16])
        return helper.make_graph(nodes, name, [], [out], [w, w2])

    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y0"], then_branch=branch("then", 3),
                          else_branch=branch("other", 1)),
         helper.make_node("Relu", ["y0"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 16, 16]),
         helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32, 16, 16])])
    src = save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
               tmp_path / "float.onnx")
    xs = write_samples(tmp_path / "x", [rng.standard_normal((1, 16, 16, 16)).astype(np.float32)
                                        for _ in range(8)])
    cs = write_samples(tmp_path / "c", [np.array(k % 2 == 0) for k in range(8)])
    ini = tmp_path / "c.ini"
    ini.write_text(f"[data_preprocess_param]\ncalibrate_path=x:{xs},c:{cs}\n"
                   "[full_quant_param]\nlatency_aware=false\n"
                   f"[evaluate_param]\neval_path=x:{xs},c:{cs}\n")
    return src, ini


def test_the_layer_report_of_an_input_read_only_inside_if_branches(tmp_path):
    """x is a graph input that only the If's branches read: it is quantized inside them, so
    its dequantized value is no main-graph tensor. --debugDir crashed (KeyError
    'x_dequantized'); the report now leaves such tensors out, as it does body tensors."""
    src, ini = _if_branches_setup(tmp_path)
    convert(src, tmp_path / "q.onnx", "PostTraining", config_file=ini,
            debug_dir=tmp_path / "debug")
    report = (tmp_path / "debug" / "layer_report.csv").read_text()
    assert "then_w" in report or "other_w" in report  # the branches' weights are reported


def test_a_target_only_body_units_could_meet_says_the_repair_cannot_rank_them(tmp_path):
    """It printed an empty "tried" list and "not met even with every unit float"."""
    src, ini = _if_branches_setup(tmp_path)
    report = convert(src, tmp_path / "q.onnx", "PostTraining", config_file=ini,
                     cosine_threshold="1")
    assert not report.passed and report.target is not None and not report.target.attempts
    assert ("not met: the repair keeps main-graph units float, and this model quantizes "
            "units only inside If / Loop / Scan bodies") in report.format()


def _gated_model() -> onnx.ModelProto:
    """openWakeWord's shape: an If whose else branch returns an outer value through Identity
    (onnxruntime refuses a body output that is an outer value itself), and a model output
    that is another one's Identity."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "w")
    then = helper.make_graph(
        [helper.make_node("Relu", ["y"], ["t"])], "then", [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [1, 64])])
    other = helper.make_graph(
        [helper.make_node("Identity", ["y"], ["e"])], "else", [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, [1, 64])])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"]),
         helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
         helper.make_node("Greater", ["s", "zero"], ["c"]),
         helper.make_node("If", ["c"], ["out"], then_branch=then, else_branch=other),
         helper.make_node("Identity", ["out"], ["copy"])],
        "gated", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 64]),
         helper.make_tensor_value_info("copy", TensorProto.FLOAT, [1, 64])],
        [w, numpy_helper.from_array(np.zeros((), np.float32), "zero")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize("quant_type", ["WeightQuant", "DynamicQuant"])
def test_identities_that_onnxruntime_or_the_outputs_need_stay(tmp_path, quant_type):
    # onnx-ir's Identity elimination would return the outer y from the else branch (a model
    # onnxruntime does not load) and rename out to copy, listing copy twice.
    src = save(_gated_model(), tmp_path / "m.onnx")
    out = tmp_path / "q.onnx"
    report = convert(src, out, quant_type, bit_num=8)
    assert report.quantized
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["out", "copy"]
    for sign in (1.0, -1.0):
        x = sign * np.abs(np.random.default_rng(1).standard_normal((1, 64))).astype(np.float32)
        expected = run_model(src, {"x": x})
        for got, want in zip(session.run(None, {"x": x}), expected, strict=True):
            np.testing.assert_allclose(got, want, atol=0.05 * np.abs(want).max())
