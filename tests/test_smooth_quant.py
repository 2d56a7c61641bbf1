"""SmoothQuant: exact in float, and it rescues MatMul inputs with outlier channels."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from conftest import run_model
from models import save, write_samples
from onnx import TensorProto, helper, numpy_helper

from ptqconv.calibrate.statistics import ChannelMoments, StatisticPoint, Statistics
from ptqconv.cli import main
from ptqconv.passes import smooth_quant


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
