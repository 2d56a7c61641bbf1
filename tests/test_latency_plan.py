"""Latency-aware planning: the minimum cut, the decisions of the cost model on graphs whose
answer is known, and the plan onnxruntime then runs."""

from __future__ import annotations

import collections
import re

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from harness import optimized_ops
from hypothesis import given, settings
from hypothesis import strategies as st
from models import random_samples, save, write_samples
from onnx import TensorProto, helper, numpy_helper

from ptqconv.cli import main
from ptqconv.graph.min_cut import source_side
from ptqconv.passes.latency_plan import plan_latency
from ptqconv.passes.qdq_plan import plan_quantization


def test_min_cut_finds_the_cheapest_two_labelling():
    # a and b prefer the source side (cutting them off costs 5 and 4), c the sink (1 vs 6);
    # keeping b with a is cheaper than paying the 3 between them.
    edges = [("s", "a", 5), ("a", "t", 1), ("s", "b", 4), ("b", "t", 2), ("s", "c", 1),
             ("c", "t", 6), ("a", "b", 3), ("b", "c", 1)]
    assert source_side(edges, "s", "t") == {"s", "a", "b"}
    # Only ever the cheapest: with a dearer b -> t, b goes too.
    edges[3] = ("b", "t", 9)
    assert source_side(edges, "s", "t") == {"s", "a"}


# (output channels, kernel, groups) after the input's 3 channels: an image stem, a
# depthwise conv, a narrowing 1x1 conv, then 1x1 convs over 64 channels (MobileNet-like).
MOBILE = [(16, 3, 1), (16, 3, 16), (8, 1, 1), (64, 1, 1), (64, 1, 1), (64, 1, 1), (64, 1, 1)]


def _conv_net(layers: list[tuple[int, int, int]], size: int) -> onnx.ModelProto:
    """x [1, 3, size, size] -> (Conv -> Relu) per layer -> y; conv i is named conv{i}."""
    rng = np.random.default_rng(0)
    inits, nodes, cin, prev = [], [], 3, "x"
    for i, (cout, k, group) in enumerate(layers):
        fan_in = cin // group * k * k
        inits.append(numpy_helper.from_array(
            (rng.standard_normal((cout, cin // group, k, k)) / np.sqrt(fan_in)).astype(
                np.float32), f"w{i}"))
        nodes += [helper.make_node("Conv", [prev, f"w{i}"], [f"c{i}"], name=f"conv{i}",
                                   pads=[k // 2] * 4, group=group),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}")]
        cin, prev = cout, f"r{i}"
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [1, cin, size, size])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _shapes(model: ir.Model, size: int) -> dict[str, tuple[int, ...]]:
    """What calibration would have seen."""
    shapes = {"x": (1, 3, size, size)}
    for node in model.graph:
        channels = node.inputs[1].const_value.shape[0] if node.op_type == "Conv" else None
        shapes[node.outputs[0].name] = (1, channels or shapes[node.inputs[0].name][1], size,
                                        size)
    return shapes


def test_a_mobile_net_keeps_its_stem_float_and_the_rest_integer():
    # An image stem (3x3 over 3 channels) and a depthwise conv over 16 channels run slower as
    # integer kernels than in float on AVX2; 1x1 convs over 64 channels about twice as fast.
    # The boundary goes where the tensor is narrowest, after the 8-channel conv.
    model = ir.from_proto(_conv_net(MOBILE, 112))
    plan = plan_quantization(model.graph)
    latency = plan_latency(plan, _shapes(model, 112))
    assert [c.name for c in latency.kept_float] == ["conv0", "conv1", "conv2"]
    assert latency.planned_us < latency.quantized_us < latency.float_us
    # The same answer every time: the plan is a function of the graph and its shapes.
    assert plan_latency(plan, _shapes(model, 112)).keys == latency.keys


def test_a_conv_transpose_costs_its_float_kernel_plus_dequantize_and_quantize_as_integer():
    """onnxruntime's CPU provider has no integer ConvTranspose: quantized, it runs the float
    kernel between DequantizeLinear and QuantizeLinear (seen in the optimized graph of
    ppocrv4_det), so the plan keeps it float."""
    rng = np.random.default_rng(0)
    c, size = 64, 56
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.1, name)
             for name, shape in (("w0", (c, c, 1, 1)), ("wt", (c, c, 2, 2)),
                                 ("w1", (c, c, 1, 1)))]
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], name="conv0"),
             helper.make_node("ConvTranspose", ["c0", "wt"], ["t"], name="up", strides=[2, 2]),
             helper.make_node("Conv", ["t", "w1"], ["y"], name="conv1")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 2 * size, 2 * size])],
        inits)
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    shapes = {"x": (1, c, size, size), "c0": (1, c, size, size),
              "t": (1, c, 2 * size, 2 * size), "y": (1, c, 2 * size, 2 * size)}
    latency = plan_latency(plan_quantization(model.graph), shapes)
    kept = {u.name: u for u in latency.kept_float}
    assert "up" in kept and kept["up"].int_us > kept["up"].float_us


def test_a_tiny_net_stays_float():
    tiny = ir.from_proto(_conv_net(MOBILE, 4))
    latency = plan_latency(plan_quantization(tiny.graph), _shapes(tiny, 4))
    assert len(latency.kept_float) == len(MOBILE)
    assert latency.planned_us == latency.float_us < latency.quantized_us


def _convert_for_avx2(src, tmp_path, samples: int = 0, shape: tuple[int, ...] = (),
                      *flags: str, calibrate_path: str = "", bits: int = 8):
    """PostTraining of `src` for the cost model's CPU (whatever this one is) on `samples`
    random samples of `shape` for input x (or the given `calibrate_path`), without timing
    the result; the output path."""
    if not calibrate_path:
        calibrate_path = f"x:{random_samples(tmp_path / 'x', samples, seed=0, shape=shape)}"
    config = tmp_path / "c.ini"
    config.write_text(f"[common_quant_param]\ntarget_device=x86_avx2\nbit_num={bits}\n"
                      f"[data_preprocess_param]\ncalibrate_path={calibrate_path}\n"
                      "[full_quant_param]\nmeasure_latency=false\n")
    out = tmp_path / "q.onnx"
    assert main([f"--modelFile={src}", f"--outputFile={out}", "--quantType=PostTraining",
                 f"--configFile={config}", *flags]) == 0
    return out


def test_units_kept_float_read_dequantized_tensors_so_their_neighbours_still_fuse(tmp_path):
    src = save(_conv_net(MOBILE, 112), tmp_path / "float.onnx")
    out = _convert_for_avx2(src, tmp_path, 2, (1, 3, 112, 112), "--quiet")
    ops = optimized_ops(out, tmp_path)
    # Three float convs; their output is quantized once for the four QLinearConvs.
    assert ops["QLinearConv"] == 4 and ops["QuantizeLinear"] == 1
    assert ops["Conv"] + ops["FusedConv"] == 3


def test_the_summary_names_what_stayed_float_and_the_measured_latency(tmp_path, capsys):
    src = save(_conv_net(MOBILE, 112), tmp_path / "float.onnx")
    data = random_samples(tmp_path / "x", 2, seed=0, shape=(1, 3, 112, 112))
    config = tmp_path / "c.ini"
    # The cost model's CPU, whatever this one is (elsewhere latency_aware defaults to false);
    # set, latency_aware is obeyed without timing the plan against all-integer.
    config.write_text("[common_quant_param]\ntarget_device=x86_avx2\n"
                      f"[data_preprocess_param]\ncalibrate_path=x:{data}\n"
                      "[full_quant_param]\nlatency_aware=true\n")
    assert main([f"--modelFile={src}", f"--outputFile={tmp_path / 'q.onnx'}",
                 "--quantType=PostTraining", f"--configFile={config}"]) == 0
    out = capsys.readouterr().out
    assert "kept float for speed: 3 units, conv0 (Conv), conv1 (Conv), conv2 (Conv) (" in out
    line = next(x for x in out.splitlines() if x.startswith("  latency: "))
    assert "float" in line and "interleaved runs" in line and "(AVX2" in line
    # Without latency_aware every unit is quantized; without measure_latency nothing is timed.
    config.write_text(f"[data_preprocess_param]\ncalibrate_path=x:{data}\n"
                      "[full_quant_param]\nlatency_aware=false\nmeasure_latency=false\n")
    assert main([f"--modelFile={src}", f"--outputFile={tmp_path / 'q.onnx'}",
                 "--quantType=PostTraining", f"--configFile={config}"]) == 0
    out = capsys.readouterr().out
    assert "kept float" not in out and "latency:" not in out
    assert f"node units quantized: {len(MOBILE)}" in out


def test_a_model_fastest_in_float_says_how_to_quantize_it_anyway(tmp_path, capsys):
    src = save(_conv_net(MOBILE, 4), tmp_path / "float.onnx")  # tiny: every unit float
    _convert_for_avx2(src, tmp_path, 8, (1, 3, 4, 4))
    out = capsys.readouterr().out
    assert "node units quantized: 0" in out
    # Calibration ran for the tensor shapes the plan costs; no method's range was used.
    assert "  calibration: 8 samples (tensor shapes for the latency plan; no range used)" in out
    assert "nothing quantized: onnxruntime runs the units above fastest in float" in out
    assert "latency_aware=false quantizes them anyway" in out
    assert "chosen" not in out  # nothing left for AUTO to measure
    # Equalization prepared units that were then kept float: not in the model written.
    assert "equalized:" not in out
    # Nothing quantized: the user's own float model, so it can be neither bigger nor slower.
    assert "the float model was written unchanged" in out
    assert (tmp_path / "q.onnx").read_bytes() == src.read_bytes()


def test_a_float_plan_at_4_bits_reports_no_gptq(tmp_path, capsys):
    """GPTQ is the default below 8 bits, but a plan that keeps every unit float rounds no
    weight: the summary has no GPTQ line (it said "GPTQ: 0 layers")."""
    src = save(_conv_net(MOBILE, 4), tmp_path / "float.onnx")
    _convert_for_avx2(src, tmp_path, 8, (1, 3, 4, 4), bits=4)
    out = capsys.readouterr().out
    assert "node units quantized: 0" in out
    assert "GPTQ" not in out


def test_a_latency_onnxruntime_cannot_measure_is_said_not_fatal(tmp_path, capsys):
    # A static 0 dimension: the samples are read as [1, 16] (the file's size), which the float
    # model file itself refuses to run, so its latency cannot be taken.
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="r")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [0, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [0, 16])])
    src = save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
               tmp_path / "m.onnx")
    (tmp_path / "calib").mkdir()
    np.zeros(16, np.float32).tofile(tmp_path / "calib" / "0.bin")
    config = tmp_path / "c.ini"
    config.write_text(f"[data_preprocess_param]\ncalibrate_path=x:{tmp_path / 'calib'}\n")
    assert main([f"--modelFile={src}", f"--outputFile={tmp_path / 'q.onnx'}",
                 "--quantType=PostTraining", f"--configFile={config}"]) == 0
    out = capsys.readouterr().out
    assert "latency: not measured (float: onnxruntime cannot run it on the sample" in out


def test_a_float_rewrite_that_runs_faster_is_written_lean_not_dropped(tmp_path, capsys):
    # x * Clip(x + 3, 0, 6) / 6 after a Conv: kept float, but written as HardSigmoid * x,
    # which onnxruntime fuses into the Conv; the rewrite's own names and shapes would make
    # the file a few hundred bytes bigger than the input, so they are left out.
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((64, 3, 3, 3)).astype(np.float32), "w"),
             *(numpy_helper.from_array(np.float32(v), n) for n, v in (("c3", 3), ("c0", 0),
                                                                       ("c6", 6)))]
    # Named nodes, as exporters write them.
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1] * 4),
         helper.make_node("Add", ["c", "c3"], ["a"], name="hardswish/add"),
         helper.make_node("Clip", ["a", "c0", "c6"], ["r"], name="hardswish/clip"),
         helper.make_node("Mul", ["c", "r"], ["m"], name="hardswish/mul"),
         helper.make_node("Div", ["m", "c6"], ["y"], name="hardswish/div")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64, 4, 4])], inits)
    src = save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
               tmp_path / "float.onnx")
    out = _convert_for_avx2(src, tmp_path, 4, (1, 3, 4, 4))
    assert "node units quantized: 0" in capsys.readouterr().out
    written = onnx.load(str(out))
    assert out.stat().st_size <= src.stat().st_size
    assert collections.Counter(n.op_type for n in written.graph.node) == {
        "Conv": 1, "HardSigmoid": 1, "Mul": 1}
    feeds = {"x": rng.standard_normal((1, 3, 4, 4)).astype(np.float32)}
    want = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, feeds)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feeds)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)


def _masked_attention(hidden: int = 384, heads: int = 12) -> onnx.ModelProto:
    """One attention block as exporters write BERT's, with dynamic batch and sequence axes
    (so the projections stay MatMul + Add, not Gemm): x [b, s, hidden] and an int64 padding
    mask [b, s] -> Q, K, V projections, Q.K^T, scale, + the mask's -1e4 bias (a Where, so a
    float op between the scores and Softmax), Softmax, .V, output projection -> y."""
    rng = np.random.default_rng(0)
    head = hidden // heads
    inits = [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in (
        ("heads_shape", [0, 0, heads, head]), ("flat_shape", [0, 0, hidden]), ("one", [1]),
        ("zero_i", 0))]
    inits += [numpy_helper.from_array(np.float32(v), n) for n, v in (
        ("scale", head ** -0.5), ("neg", -1e4), ("zero", 0.0))]
    nodes = [helper.make_node("Unsqueeze", ["mask", "one"], ["mask4"]),
             helper.make_node("Equal", ["mask4", "zero_i"], ["padded"]),
             helper.make_node("Where", ["padded", "neg", "zero"], ["bias"])]
    for name in "qkvo":
        inits += [numpy_helper.from_array(
            (rng.standard_normal((hidden, hidden)) * 0.05).astype(np.float32), f"w{name}"),
            numpy_helper.from_array((rng.standard_normal(hidden) * 0.05).astype(np.float32),
                                    f"b{name}")]
    for name, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
        nodes += [helper.make_node("MatMul", ["x", f"w{name}"], [f"{name}_mm"], name=f"{name}_mm"),
                  helper.make_node("Add", [f"{name}_mm", f"b{name}"], [f"{name}_b"]),
                  helper.make_node("Reshape", [f"{name}_b", "heads_shape"], [f"{name}_r"]),
                  helper.make_node("Transpose", [f"{name}_r"], [f"{name}_t"], perm=perm)]
    nodes += [helper.make_node("MatMul", ["q_t", "k_t"], ["qk"], name="qk"),
              helper.make_node("Mul", ["qk", "scale"], ["scaled"]),
              helper.make_node("Add", ["scaled", "bias"], ["masked"]),
              helper.make_node("Softmax", ["masked"], ["probs"], axis=-1),
              helper.make_node("MatMul", ["probs", "v_t"], ["ctx"], name="pv"),
              helper.make_node("Transpose", ["ctx"], ["ctx_t"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["ctx_t", "flat_shape"], ["ctx_flat"]),
              helper.make_node("MatMul", ["ctx_flat", "wo"], ["o_mm"], name="o_mm"),
              helper.make_node("Add", ["o_mm", "bo"], ["y"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", hidden]),
                     helper.make_tensor_value_info("mask", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", hidden])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_attention_matmuls_behind_a_float_mask_stay_float_and_the_projections_integer(
        tmp_path, capsys):
    # Q.K^T and probs.V multiply two activations: QLinearMatMul has no packed weights to gain
    # from and runs about as fast as float MatMul (kernel profile in docs/decisions.md), while
    # quantizing Softmax's input and output behind the float mask Add costs a Q each. The
    # projections read weights and run integer; nothing is dequantized between them and the
    # float attention: MatMulIntegerToFloat writes float.
    seq = 64
    src = save(_masked_attention(), tmp_path / "float.onnx")
    rng = np.random.default_rng(1)
    x = write_samples(tmp_path / "x", (rng.standard_normal((1, seq, 384)).astype(np.float32)
                                       for _ in range(2)))
    mask = write_samples(tmp_path / "mask", (np.ones((1, seq), np.int64) for _ in range(2)))
    config = tmp_path / "c.ini"
    config.write_text("[common_quant_param]\ntarget_device=x86_avx2\n"
                      f"[data_preprocess_param]\ncalibrate_path=x:{x},mask:{mask}\n"
                      f"input_shape=x:1,{seq},384;mask:1,{seq}\n"
                      "[full_quant_param]\nactivation_quant_method=MAX_MIN\n"
                      "measure_latency=false\n")
    out = tmp_path / "q.onnx"
    assert main([f"--modelFile={src}", f"--outputFile={out}", "--quantType=PostTraining",
                 f"--configFile={config}"]) == 0
    assert "kept float for speed: 5 units" in capsys.readouterr().out  # with the bias Adds
    ops = optimized_ops(out, tmp_path)
    assert ops["MatMul"] + ops["FusedMatMul"] == 2 and ops["QLinearMatMul"] == 0, ops
    assert ops["MatMulIntegerToFloat"] == 4, ops
    # The only DequantizeLinear left read constant biases, none an activation.
    optimized = onnx.load(str(tmp_path / "optimized.onnx"))
    constants = {t.name for t in optimized.graph.initializer}
    assert all(n.input[0] in constants for n in optimized.graph.node
               if n.op_type == "DequantizeLinear")


def _fake_output_errors(monkeypatch, per_quantizer: float) -> None:
    """AUTO's held-out output errors faked: 0.01 for every model and sample, plus
    `per_quantizer` for each QuantizeLinear (more quantized, less accurate)."""
    from ptqconv import post_training
    from ptqconv.evaluate.held_out import SampleErrors

    def output_error(model, samples, indices, references, threads):
        quantizers = sum(n.op_type == "QuantizeLinear" for n in model.graph.all_nodes())
        noise = np.full(len(indices), 0.01 + per_quantizer * quantizers)
        return SampleErrors({n: noise for n in references},
                            {n: np.ones(len(indices)) for n in references})

    monkeypatch.setattr(post_training, "_output_error", output_error)


def _convert_with_timings(tmp_path, monkeypatch, detected: str, timings,
                          method: str = "MAX_MIN", samples: int = 2, size: int = 112,
                          model: onnx.ModelProto | None = None,
                          shape: tuple[int, ...] | None = None, flags: tuple = ()) -> tuple:
    """MOBILE at `size` (or `model`, fed `shape`) converted (`method`) on a host taken for
    `detected`, every timing faked by `timings(labels, n)` -> {label: ms} for the n-th timing
    (never time in a test); the float model, the config, the output and the labels of each
    timing, in order."""
    import ptqconv.runtime as runtime
    import ptqconv.target as target
    from ptqconv.runtime import Latency

    monkeypatch.setattr(target, "detect", lambda: target.resolve(detected))
    calls = []

    def compare(models, feeds, threads=0, budget_s=0.0, session_config=None, outputs=None):
        ms = timings(sorted(models), len(calls))
        calls.append(sorted(models))
        # Cuts of the plan (conversion._fastest_cut) time as "cut" says, else as the plan.
        return Latency({label: ms[label] if label in ms else ms.get("cut", ms.get("planned"))
                        for label in models}, 10, 2, f"a {detected} CPU")

    monkeypatch.setattr(runtime, "compare_latency", compare)
    src = save(model or _conv_net(MOBILE, size), tmp_path / "float.onnx")
    data = random_samples(tmp_path / "x", samples, seed=0, shape=shape or (1, 3, size, size))
    config = tmp_path / "c.ini"
    config.write_text(f"[data_preprocess_param]\ncalibrate_path=x:{data}\n"
                      f"[full_quant_param]\nactivation_quant_method={method}\n")
    out = tmp_path / "q.onnx"
    assert main([f"--modelFile={src}", f"--outputFile={out}", "--quantType=PostTraining",
                 f"--configFile={config}", *flags]) == 0
    return src, config, out, calls


@pytest.mark.parametrize("timings, kept_plan", [
    # A switch needs two timings that agree; the second disagreeing keeps all-integer.
    ([{"quantized": 2.0, "planned": 0.9}, {"quantized": 2.0, "planned": 0.9}], True),
    ([{"quantized": 2.0, "planned": 0.9}, {"quantized": 2.0, "planned": 2.0}], False),
    # A tie, neither slower than float: the plan, more accurate on AUTO's held-out samples
    # (its units float).
    ([{"quantized": 0.8, "planned": 0.8}], True),
    ([{"quantized": 2.0, "planned": 1.95}], False),
    # All-integer faster than float, the plan faster still (ppocr_mobile_v2_cls on VNNI).
    ([{"quantized": 0.97, "planned": 0.6}, {"quantized": 0.97, "planned": 0.6}], True),
])
def test_on_an_unmeasured_target_the_cost_models_plan_is_timed_against_all_integer(
        tmp_path, monkeypatch, capsys, timings, kept_plan):
    # A VNNI host, for which the cost model was not fitted: every unit is quantized, then
    # timed against float and the plan on a calibration sample.
    src, config, out, calls = _convert_with_timings(
        tmp_path, monkeypatch, "x86_vnni",
        # The plan's cuts (timed where it did not win) time as it did last.
        lambda labels, n: {"float": 1.0, **(timings[n] if n < len(timings)
                                            else timings[-1] if "planned" in labels
                                            else {"quantized": 0.5})})
    summary = capsys.readouterr().out
    check = next(line for line in summary.splitlines() if "latency check" in line)
    first, last = timings[0], timings[-1]
    assert check.startswith(
        "  latency check (the cost model is for x86_avx2, the target is x86_vnni): "
        f"all-integer {first['quantized']:.2f}x float; the cost model's plan (3 units float) "
        f"{last['planned']:.2f}x, all-integer {last['quantized']:.2f}x (10 interleaved runs, ")
    assert re.search(r"kept the plan( \((as accurate|no slower beyond the noise, more "
                     r"accurate): held-out error \S+ against all-integer's \S+\))?$",
                     check) if kept_plan else check.endswith(
        "kept all-integer (the plan: not faster by 5% on the medians)"
        if last["planned"] < last["quantized"] else "kept all-integer")
    # Timed again only when the plan was faster than all-integer.
    assert calls[:len(timings)] == [["float", "planned", "quantized"]] * len(timings)
    ops = optimized_ops(out, tmp_path)
    assert ops["QLinearConv"] == (4 if kept_plan else len(MOBILE))
    assert ("kept float for speed: 3 units" in summary) == kept_plan
    # Set by the config, latency_aware is obeyed and nothing is timed against a plan.
    config.write_text(config.read_text() + "latency_aware=false\n")
    calls.clear()
    assert main([f"--modelFile={src}", f"--outputFile={out}", "--quantType=PostTraining",
                 f"--configFile={config}"]) == 0
    assert "latency check" not in capsys.readouterr().out and len(calls) == 1


@pytest.mark.parametrize("integer_ms, kept_plan", [(0.97, False), (2.0, True)])
def test_on_an_unmeasured_target_a_faster_plan_must_be_as_accurate_unless_float_is_faster(
        tmp_path, monkeypatch, capsys, integer_ms, kept_plan):
    # AUTO scored its candidates; every QuantizeLinear lowers the output error, so the plan,
    # every unit float at this size, is less accurate than all-integer on every held-out
    # sample. Faster by the margin twice, it is written only where all-integer runs slower
    # than float.
    from ptqconv import post_training
    from ptqconv.evaluate.held_out import SampleErrors

    def output_error(model, samples, indices, references, threads):
        quantizers = sum(n.op_type == "QuantizeLinear" for n in model.graph.all_nodes())
        noise = np.full(len(indices), 1.0 / (1 + quantizers))
        return SampleErrors({n: noise for n in references},
                            {n: np.ones(len(indices)) for n in references})

    monkeypatch.setattr(post_training, "_output_error", output_error)
    _, _, out, _ = _convert_with_timings(
        tmp_path, monkeypatch, "x86_vnni",
        lambda labels, n: {"float": 1.0, "quantized": integer_ms, "planned": 0.6},
        method="AUTO", samples=8, size=4)
    check = next(line for line in capsys.readouterr().out.splitlines()
                 if "latency check" in line)
    if kept_plan:
        assert check.endswith("kept the plan")
    else:
        assert re.search(r"kept all-integer \(the plan faster, less accurate: held-out error "
                         r"\S+ against all-integer's \S+\)$", check), check
    assert optimized_ops(out, tmp_path)["QLinearConv"] == (0 if kept_plan else len(MOBILE))


@pytest.mark.parametrize("timing, kept_plan", [
    ({"quantized": 0.8, "planned": 0.8}, True),  # a tie: the more accurate plan
    ({"quantized": 0.8, "planned": 0.82}, True),  # within the noise
    ({"quantized": 0.6, "planned": 0.8}, False),  # all-integer plainly faster
    ({"quantized": 1.3, "planned": 1.3}, False),  # both slower than float
])
def test_on_an_unmeasured_target_a_plan_no_slower_and_more_accurate_is_written(
        tmp_path, monkeypatch, capsys, timing, kept_plan):
    # AUTO scored its candidates; every QuantizeLinear adds output error, so the plan (every
    # unit float at this size) is the more accurate on every held-out sample.
    _fake_output_errors(monkeypatch, per_quantizer=0.01)
    _, _, out, _ = _convert_with_timings(
        tmp_path, monkeypatch, "x86_vnni", lambda labels, n: {"float": 1.0, **timing},
        method="AUTO", samples=8, size=4)
    check = next(line for line in capsys.readouterr().out.splitlines()
                 if "latency check" in line)
    if kept_plan:
        assert re.search(r"kept the plan \(no slower beyond the noise, more accurate: "
                         r"held-out error \S+ against all-integer's \S+\)$", check), check
    else:
        assert check.endswith("kept all-integer (the plan: not faster by 5% on the medians)"
                              if timing["planned"] < timing["quantized"] else
                              "kept all-integer"), check
    assert optimized_ops(out, tmp_path)["QLinearConv"] == (0 if kept_plan else len(MOBILE))


@pytest.mark.parametrize("smallest_ms, units", [(0.6, 2), (0.5, 1)])
def test_where_the_plan_does_not_win_its_cuts_are_timed_and_the_fastest_can_be_written(
        tmp_path, monkeypatch, capsys, smallest_ms, units):
    # On VNNI the AVX2 plan (3 units float here) can tie all-integer while its first units
    # alone run faster (mobilenet_v2's stem and first depthwise conv): the cut is written,
    # the larger one unless the smaller is faster by the margin. Every model here is as
    # accurate as the others on AUTO's held-out samples (a less accurate cut: below).
    _fake_output_errors(monkeypatch, per_quantizer=0.0)
    timings = [{"quantized": 0.8, "planned": 0.8},  # the plan: no faster than all-integer
               {"quantized": 0.8, "planned": 0.8, "cut 0": smallest_ms, "cut 1": 0.6},
               {"quantized": 0.8, "planned": 0.6}]  # the chosen cut, timed again
    _, _, out, calls = _convert_with_timings(
        tmp_path, monkeypatch, "x86_vnni",
        lambda labels, n: {"float": 1.0, **timings[min(n, 2)]})
    check = next(line for line in capsys.readouterr().out.splitlines()
                 if "latency check" in line)
    assert calls[:3] == [["float", "planned", "quantized"],
                         ["cut 0", "cut 1", "float", "planned", "quantized"],
                         ["float", "planned", "quantized"]]
    assert (f"the cost model's plan (cut to its first {units} unit{'s' if units > 1 else ''} "
            "of 3 float, the fastest of 3 plans timed) 0.60x, all-integer 0.80x") in check, check
    assert "kept the plan" in check, check
    # The first units in graph order stay float: the stem conv, then the depthwise one.
    assert optimized_ops(out, tmp_path)["QLinearConv"] == len(MOBILE) - units


@pytest.mark.parametrize("integer_ms, cut_written", [(0.8, False), (0.6, True)])
def test_a_faster_cut_less_accurate_than_a_whole_plan_that_ties_is_not_written(
        tmp_path, monkeypatch, capsys, integer_ms, cut_written):
    # AUTO scored its candidates and every QuantizeLinear adds output error: a cut (fewer
    # units float) is less accurate than the whole plan. Where the whole plan ties
    # all-integer, it is written on accuracy however fast the cut; where all-integer beats
    # it, the faster cut (2 units float of 3) stays in the running, and wins.
    _fake_output_errors(monkeypatch, per_quantizer=0.01)
    timings = [{"quantized": integer_ms, "planned": 0.8},
               {"quantized": integer_ms, "planned": 0.8, "cut 0": 0.5, "cut 1": 0.5},
               {"quantized": integer_ms, "planned": 0.5}]  # the cut, timed again
    _, _, out, calls = _convert_with_timings(
        tmp_path, monkeypatch, "x86_vnni", lambda labels, n: {"float": 1.0, **timings[min(n, 2)]},
        method="AUTO", samples=8)
    check = next(line for line in capsys.readouterr().out.splitlines()
                 if "latency check" in line)
    assert ["cut 0", "cut 1", "float", "planned", "quantized"] in calls
    if cut_written:
        assert "the cost model's plan (cut to its first 2 units of 3 float" in check, check
        assert optimized_ops(out, tmp_path)["QLinearConv"] == len(MOBILE) - 2
    else:
        assert "the cost model's plan (3 units float)" in check and "cut to" not in check, check
        assert "kept the plan (no slower beyond the noise, more accurate" in check, check
        assert optimized_ops(out, tmp_path)["QLinearConv"] == len(MOBILE) - 3


def test_cuts_are_the_first_units_of_a_plan_in_graph_order():
    from ptqconv.passes.latency_plan import LatencyPlan, cuts

    keys = tuple(f"conv{i}" for i in range(77))
    assert [len(c) for c in cuts(LatencyPlan(ordered=keys))] == [10, 19, 38, 58]
    assert cuts(LatencyPlan(ordered=keys))[0] == frozenset(keys[:10])
    assert [len(c) for c in cuts(LatencyPlan(ordered=keys[:6]))] == [1, 2, 3, 4]
    assert [len(c) for c in cuts(LatencyPlan(ordered=keys[:3]))] == [1, 2]
    assert cuts(LatencyPlan(ordered=keys[:1])) == []


def test_a_plan_given_its_units_predicts_as_the_min_cut_does_for_the_same_units():
    model = ir.from_proto(_conv_net(MOBILE, 112))
    plan = plan_quantization(model.graph)
    shapes = _shapes(model, 112)
    best = plan_latency(plan, shapes)
    again = plan_latency(plan, shapes, best.keys)
    assert (again.keys, again.ordered, again.planned_us) == (best.keys, best.ordered,
                                                             best.planned_us)
    first = plan_latency(plan, shapes, frozenset(best.ordered[:1]))
    assert first.keys == frozenset(best.ordered[:1])
    assert first.planned_us > best.planned_us  # the min cut is the cheapest labelling


@pytest.mark.parametrize(("integer_ms", "kept_integer"), [(0.5, True), (0.97, False),
                                                          (1.2, False)])
def test_on_the_cost_models_cpu_its_plan_is_timed_against_all_integer(
        tmp_path, monkeypatch, capsys, integer_ms, kept_integer):
    # This machine taken for an AVX2 one: the plan keeps 3 units float, then the plan and the
    # all-integer model are timed together (scored as accurate: timings decide).
    from conftest import scored_alike

    scored_alike(monkeypatch, 0.001)
    _, _, out, calls = _convert_with_timings(
        tmp_path, monkeypatch, "x86_avx2",
        lambda labels, n: {"float": 2.0, "planned": 1.0, "integer": integer_ms})
    summary = capsys.readouterr().out
    check = next(line for line in summary.splitlines() if "latency check" in line)
    assert check.startswith("  latency check (the cost model's plan keeps 3 units float): "
                            f"planned 0.50x float, all-integer {integer_ms / 2:.2f}x")
    assert check.endswith("kept all-integer (as accurate: held-out error 0.001 against the "
                          "plan's 0.001)" if kept_integer else
                          "kept the plan (all-integer: not faster by 5% on the medians)"
                          if integer_ms < 1.0 else "kept the plan")
    # A switch is timed twice (fresh sessions); the last timing serves as the summary's
    # latency of the model written.
    assert calls == [["float", "integer", "planned"]] * (2 if kept_integer else 1)
    latency = next(line for line in summary.splitlines() if line.startswith("  latency: "))
    assert latency.startswith(f"  latency: {integer_ms if kept_integer else 1.0:.3f} ms, "
                              "float 2.000 ms")
    ops = optimized_ops(out, tmp_path)
    assert ops["QLinearConv"] == (len(MOBILE) if kept_integer else 4)
    assert ("kept float for speed: 3 units" in summary) == (not kept_integer)


@pytest.mark.parametrize("integer_errors", ["as the plan's", "doubled", "one sample worse"])
def test_auto_writes_a_faster_all_integer_model_only_when_it_is_as_accurate(
        tmp_path, monkeypatch, capsys, integer_errors):
    # All-integer runs twice as fast as the plan; AUTO scored its candidates on held-out
    # samples, and the model that quantizes more is written only when it loses no accuracy
    # by AUTO's rule: a lower error of the plan that one held-out sample carries is a tie.
    from conftest import scored_alike

    from ptqconv.evaluate.held_out import SampleErrors
    from ptqconv.post_training import PostTraining

    scored_alike(monkeypatch, 0.001)
    scored, models = PostTraining.held_out_errors, []

    def held_out_errors(self, model):
        found = scored(self, model)
        if model not in models:
            models.append(model)
        if models.index(model) == 0 or integer_errors == "as the plan's":
            return found
        worse = []
        for fold, e in enumerate(found):
            noise = {k: v * 2 for k, v in e.noise.items()}
            if integer_errors == "one sample worse":
                noise = {k: np.where(np.arange(len(v)) == 0, 0.1 if fold == 0 else v, v)
                         for k, v in e.noise.items()}
            worse.append(SampleErrors(noise, e.signal))
        return worse

    monkeypatch.setattr(PostTraining, "held_out_errors", held_out_errors)
    _, _, out, calls = _convert_with_timings(
        tmp_path, monkeypatch, "x86_avx2",
        lambda labels, n: {"float": 2.0, "planned": 1.0, "integer": 0.5},
        method="AUTO", samples=8)
    summary = capsys.readouterr().out
    check = next(line for line in summary.splitlines() if "latency check" in line)
    # Scored after the two timings: the plan first, then all-integer, which quantizes more.
    assert calls == [["float", "integer", "planned"]] * 2
    quantized = [sum(n.op_type == "QuantizeLinear" for n in m.graph) for m in models]
    assert len(models) == 2 and quantized[1] > quantized[0], quantized
    written = integer_errors != "doubled"
    assert re.search({
        "as the plan's": r"kept all-integer \(as accurate: held-out error 0\.001 against the "
                         r"plan's 0\.001\)$",
        "doubled": r"kept the plan \(all-integer faster, less accurate: held-out error 0\.002 "
                   r"against the plan's 0\.001\)$",
        "one sample worse": r"kept all-integer \(as accurate: held-out error 0\.\d+ against "
                            r"the plan's 0\.001; the plan's lower error rests on one held-out "
                            r"sample\)$"}[integer_errors], check), check
    ops = optimized_ops(out, tmp_path)
    assert ops["QLinearConv"] == (len(MOBILE) if written else 4)
    assert ("kept float for speed: 3 units" in summary) == (not written)


def test_a_timing_decides_only_beyond_the_margin_and_the_noise():
    from ptqconv.runtime import Latency

    def timed(a, b):
        return Latency({"a": float(np.median(a)), "b": float(np.median(b))}, len(a), 2, "cpu",
                       {"a": tuple(a), "b": tuple(b)})

    rng = np.random.default_rng(0)
    noise = rng.normal(1.0, 0.1, (2, 50))
    # 30% faster in every round: decided; 3% faster: within the margin.
    assert timed(0.7 * noise[0], noise[0]).faster("a", "b")
    assert not timed(0.97 * noise[0], noise[0]).faster("a", "b")
    # 8% faster by the medians, but rounds as noisy as that: not decided.
    noisy = timed(0.92 * noise[0], noise[1])
    assert not noisy.faster("a", "b")
    # The summary says why a faster-looking model was not written.
    assert timed(0.97 * noise[0], noise[0]).not_faster("a", "b") == (
        "not faster by 5% on the medians")
    assert re.fullmatch(r"faster by 5% in \d+ of 50 rounds only, within the noise",
                        noisy.not_faster("a", "b"))
    assert timed(0.7 * noise[0], noise[0]).not_faster("a", "b") == ""
    assert not timed(noise[0], 0.7 * noise[0]).faster("a", "b")
    # Without rounds, the medians and the margin decide.
    assert Latency({"a": 1.0, "b": 1.06}, 10, 2, "cpu").faster("a", "b")
    assert not Latency({"a": 1.0, "b": 1.04}, 10, 2, "cpu").faster("a", "b")


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 60), st.data())
def test_the_sign_tests_tail_is_the_binomial_tail(n, data):
    import math

    from ptqconv.runtime import _binomial_tail

    k = data.draw(st.integers(0, n))
    exact = sum(math.comb(n, i) for i in range(k, n + 1)) / 2 ** n
    assert math.isclose(_binomial_tail(n, k), exact, rel_tol=1e-9, abs_tol=1e-15)


def test_an_encodings_file_replays_what_the_timing_chose(tmp_path, monkeypatch, capsys):
    # All-integer timed faster than the plan is what the encodings file records; imported, the
    # file decides alone (no plan, no timing) and the model comes out the same.
    from conftest import scored_alike

    faster = {"integer": 0.5}  # then the plan, should anything time them again
    scored_alike(monkeypatch, 0.001)
    src, config, out, calls = _convert_with_timings(
        tmp_path, monkeypatch, "x86_avx2",
        lambda labels, n: {"float": 2.0, "planned": 1.0, "quantized": 0.5,
                           "integer": faster.get("integer", 1.5)})
    assert "kept all-integer" in capsys.readouterr().out
    faster.clear()
    first = tmp_path / "first.onnx"
    faster["integer"] = 0.5
    assert main([f"--modelFile={src}", f"--outputFile={first}", "--quantType=PostTraining",
                 f"--configFile={config}", f"--encodingsFile={tmp_path / 'e.json'}",
                 "--quiet"]) == 0
    faster.clear()
    replay = tmp_path / "replay.ini"
    replay.write_text(config.read_text() + f"encodings_path={tmp_path / 'e.json'}\n")
    calls.clear()
    second = tmp_path / "second.onnx"
    assert main([f"--modelFile={src}", f"--outputFile={second}", "--quantType=PostTraining",
                 f"--configFile={replay}", "--quiet"]) == 0
    assert first.read_bytes() == second.read_bytes() and out.read_bytes() == first.read_bytes()
    assert calls == [["float", "quantized"]]  # only the summary's latency


def _dfl_head(opset: int) -> tuple[ir.Model, dict[str, tuple[int, ...]]]:
    """YOLOv8's distribution-focal-loss head: box logits [1, 64, 2100] viewed as [1, 4, 16,
    2100], transposed to [1, 16, 4, 2100], Softmax over the 16 bins (axis 1), then the 1x1
    Conv that takes the expectation."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((64, 64, 1, 1)).astype(np.float32), "w0"),
             numpy_helper.from_array(np.arange(16, dtype=np.float32).reshape(1, 16, 1, 1), "w1"),
             numpy_helper.from_array(np.array([1, 4, 16, 2100], np.int64), "shape")]
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], name="box"),
             helper.make_node("Reshape", ["c0", "shape"], ["v"], name="view"),
             helper.make_node("Transpose", ["v"], ["t"], name="transpose", perm=[0, 2, 1, 3]),
             helper.make_node("Softmax", ["t"], ["p"], name="softmax", axis=1),
             helper.make_node("Conv", ["p", "w1"], ["y"], name="dfl")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 1, 2100])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 4, 2100])], inits)
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))
    shapes = {"x": (1, 64, 1, 2100), "c0": (1, 64, 1, 2100), "v": (1, 4, 16, 2100),
              "t": (1, 16, 4, 2100), "p": (1, 16, 4, 2100), "y": (1, 1, 4, 2100)}
    return model, shapes


def test_a_softmax_over_a_leading_axis_is_costed_with_its_transposes():
    # From opset 13 onnxruntime's float Softmax moves axis 1 last and back with its generic
    # transpose (1.8 ms on this head against 0.36 ms for QLinearSoftmax before a QLinearConv,
    # whose NHWC layout change absorbs the transposes): the plan keeps the head integer.
    model, shapes = _dfl_head(17)
    kept = [c.name for c in plan_latency(plan_quantization(model.graph), shapes).kept_float]
    assert "softmax" not in kept and "dfl" not in kept
    # Softmax-11 flattens the trailing axes instead: an elementwise cost either way, and the
    # head stays float, where it is a little cheaper.
    model, shapes = _dfl_head(12)
    kept = [c.name for c in plan_latency(plan_quantization(model.graph), shapes).kept_float]
    assert "softmax" in kept


def test_a_model_with_only_its_table_quantized_does_not_say_nothing_was(tmp_path, capsys):
    from models import embedding

    # The 8-token projection is too small for an integer kernel to pay; the table is still
    # stored int8 per row, so "nothing quantized" would be wrong.
    src = save(embedding(), tmp_path / "float.onnx")
    ids = tmp_path / "ids"
    write_samples(ids, [np.arange(8, dtype=np.int64).reshape(1, 8) + k for k in range(4)])
    _convert_for_avx2(src, tmp_path, calibrate_path=f"ids:{ids}")
    out = capsys.readouterr().out
    assert "node units quantized: 0" in out and "embedding tables: 1 in int8" in out
    assert "no node unit quantized (embedding tables only): onnxruntime runs the units" in out
    assert "nothing quantized" not in out


@pytest.mark.parametrize("detected, timings, warned", [
    ("x86_avx2", {"planned": 1.2, "integer": 1.3}, "1.20x"),
    ("x86_avx2", {"planned": 0.8, "integer": 0.9}, ""),
    ("x86_avx2", {"planned": 1.03, "integer": 1.3}, ""),  # within the margin
    ("x86_vnni", {"quantized": 2.0, "planned": 1.95}, "2.00x"),
])
def test_a_written_model_slower_than_float_is_said_to_be(tmp_path, monkeypatch, capsys,
                                                          detected, timings, warned):
    _convert_with_timings(tmp_path, monkeypatch, detected,
                          lambda labels, n: {"float": 1.0, **timings})
    summary = capsys.readouterr().out
    line = next((line for line in summary.splitlines() if "slower than float" in line), "")
    if warned:
        assert line.startswith("  warning: the written model runs slower than float on this "
                               f"CPU ({warned}, beyond the noise)"), summary
        assert "the float model is faster" in line
    else:
        assert not line, summary


def test_the_written_models_latency_keeps_the_rounds_of_its_check():
    """The summary's latency of a checked model is that check's timing of float and the model
    written, rounds included, so that 'slower than float' is a sign test, not medians."""
    from ptqconv.conversion import _written
    from ptqconv.runtime import Latency

    rounds = {"float": (1.0, 1.0, 1.0), "planned": (1.2, 0.9, 1.2), "integer": (2.0,) * 3}
    timed = Latency({"float": 1.0, "planned": 1.2, "integer": 2.0}, 3, 2, "cpu", rounds)
    written = _written(timed, "planned")
    assert written.ms == {"float": 1.0, "quantized": 1.2}
    assert written.rounds == {"float": rounds["float"], "quantized": rounds["planned"]}
    # Faster on the medians, but in 2 of 3 rounds only: not beyond the noise.
    assert not written.faster("float", "quantized")


@pytest.mark.parametrize("integer_ms, written", [(0.98, "integer"), (1.2, "plan")])
def test_a_plan_keeping_every_unit_float_yields_to_a_quantized_model_not_slower(
        tmp_path, monkeypatch, capsys, integer_ms, written):
    # Tiny: the cost model keeps every unit float. AUTO still chooses among all-integer
    # candidates, and that model, the one asked for, is written unless a float one runs
    # faster (twice, fresh sessions).
    _, _, out, calls = _convert_with_timings(
        tmp_path, monkeypatch, "x86_avx2",
        lambda labels, n: {"float": 1.0, "planned": 1.0, "integer": integer_ms},
        method="AUTO", samples=8, size=4)
    summary = capsys.readouterr().out
    check = next(line for line in summary.splitlines() if "latency check" in line)
    # Every timing: AUTO's first candidate before the others are scored (the probe; a
    # second timing when it ran slower), then the candidate chosen, where there is one.
    assert calls == [["float", "integer", "planned"]] * 2
    ops = optimized_ops(out, tmp_path)
    if written == "integer":
        assert "chosen by measurement: " in summary
        assert check.endswith("kept all-integer (the model asked for: not slower than the "
                              "float plan)"), check
        assert ops["QLinearConv"] == len(MOBILE)
        assert f"node units quantized: {len(MOBILE)}" in summary
        assert "written float" not in summary and "nothing quantized" not in summary
    else:
        # Slower twice before any scoring: no candidate is scored, the plan is written.
        assert "chosen by measurement" not in summary
        assert check.endswith("kept the plan (all-integer slower than the float model; timed "
                              "with AUTO's first candidate, so no other was scored)"), check
        assert ops["QLinearConv"] == 0 and "nothing quantized" in summary
        assert "calibration: 8 samples (tensor shapes for the latency plan; no range used)" in (
            summary)


@pytest.mark.parametrize("dynamic_ms, written", [(0.9, True), (1.3, False)])
def test_dynamic_quantization_is_tried_against_a_float_plan(tmp_path, monkeypatch, capsys,
                                                            dynamic_ms, written):
    # A small MLP the cost model keeps float and whose all-integer model runs slower: the
    # dynamic candidate is weighed against the float plan, written unless slower.
    from models import mlp

    _, _, out, _ = _convert_with_timings(
        tmp_path, monkeypatch, "x86_avx2",
        lambda labels, n: {"float": 1.0, "planned": 1.0, "written": 1.0, "integer": 1.5,
                           "dynamic": dynamic_ms},
        method="AUTO", samples=8, model=mlp((16, 32, 8)), shape=(1, 16))
    summary = capsys.readouterr().out
    line = next(x for x in summary.splitlines() if "dynamic quantization" in x)
    assert "against the float plan's" in line
    ops = optimized_ops(out, tmp_path)
    if written:
        assert "written instead of the float plan, not slower" in line, line
        assert ops["MatMulInteger"] + ops["DynamicQuantizeMatMul"] > 0
    else:
        assert line.endswith("kept the float plan (slower than the float model)"), line
        assert ops["MatMulInteger"] + ops["DynamicQuantizeMatMul"] == 0


@pytest.mark.parametrize("quantized_rounds, noise", [
    ((1.2, 0.9) * 20, True),  # a slower median, half the rounds faster: noise
    ((1.2,) * 40, False),  # slower in every round: the warning's business, not noise
    ((0.9,) * 40, False),  # faster
])
def test_the_latency_line_says_when_a_slower_median_is_noise(quantized_rounds, noise):
    from ptqconv.report import latency_line
    from ptqconv.runtime import Latency

    rounds = {"float": (1.0,) * 40, "quantized": quantized_rounds}
    timed = Latency({k: float(np.median(v)) for k, v in rounds.items()}, 40, 2, "cpu", rounds)
    line = latency_line(timed)
    assert line.endswith("slower on the medians only: within the noise)") == noise, line
    assert line.startswith(f"  latency: {timed.ms['quantized']:.3f} ms, float 1.000 ms")


def test_the_layer_report_and_ranking_describe_the_model_the_latency_check_wrote(
        tmp_path, monkeypatch, capsys):
    # Every unit planned float, all-integer written by the check: the per-layer report and
    # the sensitivity ranking are of all-integer, not of the float plan first built.
    debug = tmp_path / "debug"
    _convert_with_timings(
        tmp_path, monkeypatch, "x86_avx2",
        lambda labels, n: {"float": 1.0, "planned": 1.0, "integer": 0.9},
        method="AUTO", samples=8, size=4, flags=(f"--debugDir={debug}", "--sensitivity"))
    summary = capsys.readouterr().out
    assert "kept all-integer" in summary
    assert f"sensitivity ({len(MOBILE)} units" in summary
    rows = (debug / "layer_report.csv").read_text().splitlines()[1:]
    assert len(rows) >= 2 * len(MOBILE)  # each conv's input activation and weight
