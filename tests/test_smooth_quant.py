"""SmoothQuant: exact in float, and it rescues MatMul inputs with outlier channels."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from conftest import run_model
from models import save, write_samples
from onnx import TensorProto, helper, numpy_helper

from ptqconv.calibrate.statistics import ChannelMoments, StatisticPoint, Statistics
from ptqconv.cli import main
from ptqconv.graph.naming import node_key
from ptqconv.passes import smooth_quant
from ptqconv.passes.body_plan import plan_model
from ptqconv.passes.qdq import QDQPass
from ptqconv.passes.unused_smoothing import UnusedSmoothingPass


def outlier_matmul(seed: int = 0):
    """x [1, 16, 64] -> LayerNormalization-like scale with 3 outlier channels -> MatMul [64, 32].

    A Mul by a per-channel constant gives channels 5, 17 and 40 a range 60x the others, as
    transformer LayerNorm outputs have, and the weight rows they meet are 60x smaller, so
    every channel contributes alike to the output (crushing the small ones then matters).
    """
    rng = np.random.default_rng(seed)
    gain = np.ones(64, np.float32)
    gain[[5, 17, 40]] = 60.0
    w = (rng.standard_normal((64, 32)) / 8).astype(np.float32)
    w[[5, 17, 40]] /= 60.0
    nodes = [
        helper.make_node("Mul", ["x", "gain"], ["h"], name="norm"),
        helper.make_node("MatMul", ["h", "w"], ["y"], name="proj"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 32])],
        [numpy_helper.from_array(gain, "gain"), numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_smoothing_leaves_the_float_model_unchanged(tmp_path):
    src = save(outlier_matmul(), tmp_path / "float.onnx")
    model = ir.load(src)
    groups = smooth_quant.find_groups(model.graph).groups
    assert [(g.activation, [m.name for m in g.matmuls]) for g in groups] == [("h", ["proj"])]
    moments = ChannelMoments(-1)
    moments.channel_min = np.full(64, -3.0, np.float32)
    moments.channel_max = np.full(64, 3.0, np.float32)
    moments.channel_min[[5, 17, 40]], moments.channel_max[[5, 17, 40]] = -180.0, 180.0
    moments.channel_sumsq, moments.rows = (moments.channel_max / 3) ** 2, 1
    smoother = smooth_quant.SmoothQuantPass(frozenset(), 255, 63)
    assert smoother.statistic_points(model) == [StatisticPoint("h", smooth_quant.CHANNELS)]
    statistics = Statistics({StatisticPoint("h", smooth_quant.CHANNELS): moments})
    result = smoother.calibrated(statistics)(model)
    assert result.migrated == ["h"] and result.left_alone == {}
    ((_, (rlo, rhi)),) = result.ranges.items()
    assert max(-rlo, rhi) / 180.0 < 0.5  # the outliers' range moved into the weights
    ir.save(model, tmp_path / "smoothed.onnx")
    x = np.random.default_rng(1).standard_normal((1, 16, 64)).astype(np.float32)
    (ref,), (got,) = run_model(src, {"x": x}), run_model(tmp_path / "smoothed.onnx", {"x": x})
    assert np.allclose(ref, got, rtol=1e-4, atol=1e-4)


def test_smoothing_lowers_the_w8a8_error_on_outlier_channels(tmp_path):
    src = save(outlier_matmul(), tmp_path / "float.onnx")
    rng = np.random.default_rng(2)
    samples = [rng.standard_normal((1, 16, 64)).astype(np.float32) for _ in range(16)]
    data = write_samples(tmp_path / "x", samples)
    errors = {}
    for smooth in ("true", "false"):
        config = tmp_path / f"{smooth}.ini"
        config.write_text(
            f"[data_preprocess_param]\ncalibrate_path=x:{data}\n"
            f"[full_quant_param]\nsmooth_quant={smooth}\nlatency_aware=false\n"
        )
        out = tmp_path / f"q_{smooth}.onnx"
        assert (
            main(
                [
                    f"--modelFile={src}",
                    f"--outputFile={out}",
                    "--quantType=PostTraining",
                    f"--configFile={config}",
                    "--quiet",
                ]
            )
            == 0
        )
        diffs = [run_model(src, {"x": s})[0] - run_model(out, {"x": s})[0] for s in samples]
        errors[smooth] = float(np.sqrt(np.mean(np.square(diffs))))
    assert errors["true"] < 0.5 * errors["false"], errors


def two_readers(seed: int = 0):
    """`outlier_matmul` with a second MatMul `proj2` reading the same activation."""
    model = outlier_matmul(seed)
    w2 = (np.random.default_rng(seed + 1).standard_normal((64, 8)) / 8).astype(np.float32)
    model.graph.initializer.append(numpy_helper.from_array(w2, "w2"))
    model.graph.node.append(helper.make_node("MatMul", ["h", "w2"], ["y2"], name="proj2"))
    model.graph.output.append(helper.make_tensor_value_info("y2", TensorProto.FLOAT, [1, 16, 8]))
    return model



def _outlier_moments() -> ChannelMoments:
    moments = ChannelMoments(-1)
    moments.channel_min = np.full(64, -3.0, np.float32)
    moments.channel_max = np.full(64, 3.0, np.float32)
    moments.channel_min[[5, 17, 40]], moments.channel_max[[5, 17, 40]] = -180.0, 180.0
    moments.channel_sumsq, moments.rows = (moments.channel_max / 3) ** 2, 1
    return moments


def _smoothed_then_quantized(kept: set[str]) -> tuple[ir.Model, ir.Model, list[str]]:
    """(float, two_readers smoothed on h and quantized with the nodes `kept` float, what
    UnusedSmoothingPass undid)."""
    source = ir.from_proto(two_readers())
    model = source.clone()
    statistics = Statistics({StatisticPoint("h", smooth_quant.CHANNELS): _outlier_moments()})
    assert smooth_quant.SmoothQuantPass(frozenset(), 255, 63).calibrated(statistics)(
        model).migrated == ["h"]
    skip = smooth_quant.smoothing_nodes(model.graph)
    plan = plan_model(model.graph, skip, float_units=frozenset(
        node_key(n) for n in model.graph if n.name in kept))
    ranges = {"x": (-4.0, 4.0), "h": (-3.0, 3.0), "h_smoothed": (-3.0, 3.0),
              "y": (-4.0, 4.0), "y2": (-4.0, 4.0)}
    QDQPass(plan, ranges, 8)(model)
    undone = UnusedSmoothingPass(source.graph.initializers)(model).undone
    return source, model, undone


def test_smoothing_is_undone_where_no_reader_is_quantized(tmp_path):
    source, model, undone = _smoothed_then_quantized({"norm", "proj", "proj2"})
    assert undone == ["h"]
    assert smooth_quant.smoothing_nodes(model.graph) == frozenset()
    assert not [n for n in model.graph.initializers if n.endswith(smooth_quant.INV_SCALE_SUFFIX)]
    for name in ("w", "w2"):  # the float model's own weights again
        assert (model.graph.initializers[name].const_value
                is source.graph.initializers[name].const_value)
    x = np.random.default_rng(3).standard_normal((1, 16, 64)).astype(np.float32)
    src, out = tmp_path / "float.onnx", tmp_path / "undone.onnx"
    ir.save(source, src)
    ir.save(model, out)
    for ref, got in zip(run_model(src, {"x": x}), run_model(out, {"x": x}), strict=True):
        assert np.array_equal(ref, got)  # bit for bit


def test_smoothing_stays_where_one_reader_is_quantized():
    _, model, undone = _smoothed_then_quantized({"norm", "proj"})
    assert undone == []
    (mul,) = [n for n in model.graph if n.name in smooth_quant.smoothing_nodes(model.graph)]
    # Quantized for proj2; proj, float, reads it dequantized.
    assert {user.op_type for user, _ in mul.outputs[0].uses()} == {"QuantizeLinear"}
