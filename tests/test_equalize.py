"""Cross-layer equalization: exact in float, the clip respected, and it rescues quiet channels."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from conftest import run_model
from hypothesis import given, settings
from hypothesis import strategies as st
from models import _model, save, write_samples
from onnx import TensorProto, helper, numpy_helper

from ptqconv.calibrate.statistics import ChannelMoments, StatisticPoint, Statistics
from ptqconv.cli import main
from ptqconv.passes import equalize, scale_migration

CHANNELS = 8


def uneven_convs(act: str | None, group: int, seed: int = 0, channels: int = CHANNELS):
    """x [1, 3, 16, 16] -> Conv 3x3 (8 channels, ranges 300x apart) -> act -> Conv 3x3 (8 in)
    (`channels` other than 8 for both convs).

    Channel k of the first conv is scaled by gain[k] (as BN folding leaves mobilenet_v2's
    first conv), and the second conv's weights on channel k by 1 / gain[k], so every channel
    matters alike to the output: a per-tensor scale that rounds the quiet ones to a few
    levels then costs a lot. Channel 7's gain is 30: it passes 6, so a Clip(0, 6) acts on it.
    """
    rng = np.random.default_rng(seed)
    gain = np.logspace(-2.5, 0, channels).astype(np.float32)
    gain[7] = 30.0
    w1 = (rng.standard_normal((channels, 3, 3, 3)) / 3).astype(np.float32) * gain[:, None, None,
                                                                                  None]
    b1 = (0.3 * np.abs(rng.standard_normal(channels))).astype(np.float32) * gain
    w2 = (rng.standard_normal((channels, channels // group, 3, 3)) / 3).astype(np.float32)
    per_input = gain.reshape(group, channels // group)  # input channel of w2[n, j]
    w2 /= per_input[np.arange(channels) // (channels // group)][:, :, None, None]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1] * 4)]
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(b1, "b1"),
             numpy_helper.from_array(w2, "w2")]
    if act == "relu":
        nodes.append(helper.make_node("Relu", ["c1"], ["a"], name="relu"))
    elif act == "clip":
        inits += [numpy_helper.from_array(np.array(0, np.float32), "lo"),
                  numpy_helper.from_array(np.array(6, np.float32), "hi")]
        nodes.append(helper.make_node("Clip", ["c1", "lo", "hi"], ["a"], name="clip"))
    nodes.append(helper.make_node("Conv", ["a" if act else "c1", "w2"], ["y"], name="conv2",
                                  pads=[1] * 4, group=group))
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, 16, 16])],
        inits,
    )


def _samples(seed: int, count: int = 8) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((1, 3, 16, 16)).astype(np.float32) for _ in range(count)]


def _channel_stats(path, tensor: str, samples):
    """Per-channel statistics of `tensor` along axis 1, from running the float model."""
    import onnx

    model = onnx.load(str(path))
    model.graph.output.append(helper.make_value_info(tensor, onnx.TypeProto()))
    moments = ChannelMoments(axis=1)
    for x in samples:
        moments.update(run_model_proto(model, x)[-1])
    return Statistics({StatisticPoint(tensor, equalize.CHANNELS): moments})


def run_model_proto(model, x):
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


@pytest.mark.parametrize(("act", "group"), [("clip", CHANNELS), ("relu", 2), (None, 1)])
def test_equalizing_leaves_the_float_model_unchanged(tmp_path, act, group):
    src = save(uneven_convs(act, group), tmp_path / "float.onnx")
    calibration = _samples(1)
    x = "a" if act else "c1"
    stats = _channel_stats(src, x, calibration)
    model = ir.load(src)
    groups = equalize.find_groups(model.graph).groups
    assert [(g.activation, g.producer.name, [c.name for c in g.consumers], g.clip_max)
            for g in groups] == [(x, "conv1", ["conv2"], 6.0 if act == "clip" else None)]
    w1_before = model.graph.initializers["w1"].const_value.numpy().copy()
    equalizer = equalize.EqualizePass(frozenset(), 255, lambda conv: 63)
    assert equalizer.statistic_points(model) == [StatisticPoint(x, equalize.CHANNELS)]
    result = equalizer.calibrated(stats)(model)
    new_ranges = result.ranges
    assert list(new_ranges) == [x] and result.migrated == [x] and result.modified
    scales = w1_before[:, 0, 0, 0] / model.graph.initializers["w1"].const_value.numpy()[:, 0, 0, 0]
    assert scales.max() / scales.min() > 10  # the quiet channels were amplified
    if act == "clip":
        assert scales[7] == pytest.approx(1.0)  # the clip acts on channel 7: it keeps its scale
        assert new_ranges["a"][1] <= 6.0
    ir.save(model, tmp_path / "equalized.onnx")
    # Exact on the calibration data, and (the clip aside) on any data.
    for x in calibration + ([] if act == "clip" else _samples(2)):
        (ref,), (got,) = run_model(src, {"x": x}), run_model(tmp_path / "equalized.onnx", {"x": x})
        assert np.allclose(ref, got, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_graphs_that_cannot_absorb_the_scales_are_left_alone(tmp_path):
    model = uneven_convs("relu", 1)
    model.graph.output.append(helper.make_tensor_value_info("a", TensorProto.FLOAT, None))
    assert equalize.find_groups(ir.from_proto(model).graph).groups == []  # `a` is read outside
    model = uneven_convs("relu", 1)
    search = equalize.find_groups(ir.from_proto(model).graph, frozenset({"conv2"}))
    assert search.groups == [] and search.rejected == {"a": "a reader is in skip_quant_node"}
    model = uneven_convs("clip", 1)
    model.graph.initializer[3].CopyFrom(numpy_helper.from_array(np.array(-1, np.float32), "lo"))
    search = equalize.find_groups(ir.from_proto(model).graph)  # Clip(-1, 6) does not scale
    assert search.groups == [] and list(search.rejected.values()) == [
        "a Clip that is not Clip(0, c) follows"]


def test_equalization_lowers_the_w8a8_error_on_quiet_channels(tmp_path):
    # 16 channels: with 8 the Q/DQ nodes outweigh the int8 weights, and a quantized model
    # bigger than the float one is not written.
    src = save(uneven_convs("clip", 1, channels=16), tmp_path / "float.onnx")
    samples = _samples(3, 16)
    data = write_samples(tmp_path / "x", samples)
    errors = {}
    for flag in ("true", "false"):
        config = tmp_path / f"{flag}.ini"
        config.write_text(f"[data_preprocess_param]\ncalibrate_path=x:{data}\n"
                          f"[full_quant_param]\nequalize={flag}\nlatency_aware=false\n")
        out = tmp_path / f"q_{flag}.onnx"
        assert main([f"--modelFile={src}", f"--outputFile={out}", "--quantType=PostTraining",
                     f"--configFile={config}", "--quiet"]) == 0
        diffs = [run_model(src, {"x": s})[0] - run_model(out, {"x": s})[0] for s in samples]
        errors[flag] = float(np.sqrt(np.mean(np.square(diffs))))
    assert errors["true"] < 0.5 * errors["false"], errors


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(1, 3), st.integers(1, 3), st.sampled_from([1, 3]),
       st.integers(0, 2**31 - 1))
def test_conv_readers_predict_the_noise_of_the_dense_matmul_they_compute(
        groups, k_per_group, n_per_group, kernel, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((groups * n_per_group, k_per_group, kernel, kernel))
    reader = scale_migration.Reader.conv(w, groups, 127)
    # The same conv as a dense [K, N, taps] weight with zeros between groups, and the noise
    # the docstring's formula gives for it, summed term by term.
    channels = groups * k_per_group
    dense = np.zeros((channels, groups * n_per_group, kernel * kernel))
    for n in range(groups * n_per_group):
        g = n // n_per_group
        dense[g * k_per_group:(g + 1) * k_per_group, n] = w[n].reshape(k_per_group, -1)
    s = 10 ** rng.uniform(-1, 1, channels)
    hi = np.abs(rng.standard_normal(channels)) + 0.1
    lo = -hi * rng.uniform(0, 1, channels)
    mean_square = hi**2 / 3
    dx = (np.max(hi / s) - min(np.min(lo / s), 0.0)) / 255
    migrated = dense * s[:, None, None]
    expected = dx**2 / 12 * np.square(migrated).sum()
    for n in range(dense.shape[1]):
        reads = np.abs(dense[:, n]).sum(axis=1) > 0
        dw = np.abs(migrated[:, n]).max() / 127
        expected += dw**2 / 12 * kernel * kernel * (mean_square / s**2)[reads].sum()
    got = scale_migration.predicted_noise(s, lo, hi, mean_square, [reader], 255)
    assert got == pytest.approx(expected, rel=1e-5)  # float32 kernel sums
    assert reader.taps == kernel * kernel
    assert reader.channels == channels
    assert np.allclose(reader.channel_max, np.abs(dense).max(axis=(1, 2)), rtol=1e-6)


@settings(max_examples=100, deadline=None)
@given(st.integers(2, 12), st.floats(0.01, 100.0), st.integers(0, 2**31 - 1))
def test_predicted_noise_depends_only_on_relative_scales(channels, factor, seed):
    rng = np.random.default_rng(seed)
    hi = np.abs(rng.standard_normal(channels)) * 10 ** rng.uniform(-2, 2, channels) + 1e-3
    lo = -hi * rng.uniform(0, 1, channels)
    readers = [scale_migration.Reader.matmul(rng.standard_normal((channels, 5)), 63)]
    s = 10 ** rng.uniform(-1, 1, channels)
    a = scale_migration.predicted_noise(s, lo, hi, hi**2 / 3, readers, 255)
    b = scale_migration.predicted_noise(s * factor, lo, hi, hi**2 / 3, readers, 255)
    assert b == pytest.approx(a, rel=1e-9)


@settings(max_examples=100, deadline=None)
@given(st.integers(2, 12), st.floats(0.5, 10.0), st.integers(0, 2**31 - 1))
def test_scales_under_a_clip_keep_it_exact(channels, clip_max, seed):
    rng = np.random.default_rng(seed)
    hi = clip_max * rng.uniform(0, 1.2, channels)
    hi = np.minimum(hi, clip_max)  # channels at clip_max are the ones the clip reached
    readers = [scale_migration.Reader.matmul(rng.standard_normal((channels, 4)), 63)]
    _, s = scale_migration.choose_scales(np.zeros(channels), hi, hi**2 / 3, readers, 255,
                                         clip_max=clip_max)
    assert (s > 0).all()
    assert np.allclose(s[hi >= clip_max], 1.0)
    assert (hi / s <= clip_max * (1 + 1e-5)).all()
