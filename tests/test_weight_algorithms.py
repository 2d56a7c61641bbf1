"""WeightQuant's weight algorithms end to end: GPTQ, block-wise layouts and their fusion,
per-tensor weights, weight and bias correction, mixed bit and auto_tune, config errors."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import initializers, run_model
from harness import optimized_ops
from hypothesis import given, settings
from hypothesis import strategies as st
from models import DIGITS, REPO, _model, digits_eval, embedding, mlp, random_samples, save
from onnx import TensorProto, helper, numpy_helper

import ptqconv
from ptqconv import qparams
from ptqconv.passes import gptq
from ptqconv.weights import layout as layouts
from ptqconv.weights.correction import correction_factors
from ptqconv.weights.layout import IntegerWeight, WeightLayout
from ptqconv.weights.mixed_bit import relative_error
from ptqconv.weights.sum_rounding import sum_preserving

CALIB = DIGITS / "calib" / "input"


def config(path, bits=8, weight=None, mixed=None, data=None) -> str:
    lines = ["[common_quant_param]", "quant_type=WEIGHT_QUANT", f"bit_num={bits}"]
    if data is not None:
        lines += ["[data_preprocess_param]", f"calibrate_path={data}"]
    if weight:
        lines += ["[weight_quant_param]", *(f"{k}={v}" for k, v in weight.items())]
    if mixed:
        lines += ["[mixed_bit_weight_quant_param]", *(f"{k}={v}" for k, v in mixed.items())]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def convert(tmp_path, model, name, **settings):
    src = model if not isinstance(model, onnx.ModelProto) else save(model, tmp_path / "f.onnx")
    out = tmp_path / f"{name}.onnx"
    report = ptqconv.convert(str(src), str(out), "WeightQuant",
                             config_file=config(tmp_path / f"{name}.ini", **settings))
    return src, out, report


def sqnr_db(reference: np.ndarray, got: np.ndarray) -> float:
    reference = reference.astype(np.float64)
    return 10 * np.log10(np.sum(reference**2) / np.sum((got - reference) ** 2))


def dequantize_nodes(path) -> dict[str, onnx.NodeProto]:
    return {n.output[0]: n for n in onnx.load(str(path)).graph.node
            if n.op_type == "DequantizeLinear"}


# --- GPTQ ------------------------------------------------------------------------------


def test_gptq_lowers_the_output_error_on_a_grid_no_wider_than_nearests(tmp_path):
    data = f"input:{CALIB}"
    src, nearest, _ = convert(tmp_path, DIGITS / "model.onnx", "n", bits=3, data=data,
                              weight={"quant_strategy": "MAX_MIN"})
    _, rounded, report = convert(tmp_path, DIGITS / "model.onnx", "g", bits=3, data=data,
                                 weight={"quant_strategy": "GPTQ"})
    summary = report.weight_quant
    assert summary.gptq.layers == 5 and summary.gptq.error_ratio < 0.5
    assert {w.method for w in report.quantized} == {"GPTQ"}
    assert "GPTQ: 5 layers" in report.format()
    x = digits_eval()
    (ref,), (near,), (got,) = (run_model(p, {"input": x}) for p in (src, nearest, rounded))
    # Measured 18.9 dB with round to nearest, 31.5 dB with GPTQ, on held-out digits.
    assert sqnr_db(ref, got) > sqnr_db(ref, near) + 8
    a, b = initializers(nearest), initializers(rounded)
    # The same layout; each channel's range at most nearest's own, at least half of it
    # (weights.clipping), and some narrower.
    scales = [n for n in a if n.endswith("_scale")]
    assert len(scales) == 5 and set(a) == set(b)
    for name in scales:
        assert a[name].shape == b[name].shape
        assert np.all(b[name] <= a[name] * (1 + 1e-6)) and np.all(b[name] >= 0.49 * a[name])
    assert any(np.any(b[n] < 0.99 * a[n]) for n in scales)
    assert any(not np.array_equal(a[n], b[n]) for n in a if n.endswith("_quantized"))


def test_shipped_weight_config(tmp_path):
    out = tmp_path / "w4.onnx"
    report = ptqconv.convert(str(DIGITS / "model.onnx"), str(out), "WeightQuant",
                             config_file=str(REPO / "configs" / "digits_weights.ini"))
    assert report.bit_num == 4 and report.weight_quant.gptq.layers == 5
    assert len([c for c in report.weight_quant.bias_corrections if c.applied]) == 5
    x = digits_eval()
    (ref,), (got,) = run_model(DIGITS / "model.onnx", {"input": x}), run_model(out, {"input": x})
    assert (ref.argmax(1) == got.argmax(1)).mean() >= 0.99


def test_gptq_in_several_passes_gives_the_same_model(tmp_path, monkeypatch):
    settings = {"bits": 4, "data": f"input:{CALIB}", "weight": {"quant_strategy": "GPTQ"}}
    _, one, report = convert(tmp_path, DIGITS / "model.onnx", "one", **settings)
    assert report.weight_quant.gptq.passes == 1
    monkeypatch.setattr(gptq, "MEMORY_BUDGET", 1)  # each layer its own pass
    _, many, report = convert(tmp_path, DIGITS / "model.onnx", "many", **settings)
    assert report.weight_quant.gptq.passes == 5
    assert hashlib.sha256(one.read_bytes()).digest() == hashlib.sha256(many.read_bytes()).digest()


def test_memory_rounds_hold_at_most_the_budget():
    def layer(name, points, nbytes):
        return gptq.Layer(name, False, 1, False, tuple(points), nbytes)

    shared = ["qkv_in"]
    found = [layer("q", shared, 100), layer("k", shared, 100), layer("v", shared, 100),
             layer("o", ["o_in"], 100), layer("ffn", ["ffn_in"], 400)]
    passes = gptq.rounds(found, budget=250)
    # q, k and v read one input: one matrix between them.
    assert [[lay.weight for lay in part] for part in passes] == [["q", "k", "v", "o"], ["ffn"]]


# --- layouts -----------------------------------------------------------------------------


def chain(gemm: bool) -> onnx.ModelProto:
    """MatMul + Add (or Gemm with transB=1) layers joined by Softsign, which nothing
    rewrites (behind a Relu: test_blocks_behind_relu_or_clip_are_fused_into_matmulnbits)."""
    model = mlp(gemm=gemm)
    for node in model.graph.node:
        if node.op_type == "Relu":
            node.op_type = "Softsign"
    return model


def rounded(w: np.ndarray, layout: WeightLayout) -> IntegerWeight:
    """How WeightQuant rounds a Conv weight without GPTQ (other weights: to nearest)."""
    return sum_preserving(w, layouts.nearest(w, layout))


@pytest.mark.parametrize("gemm", [False, True])
def test_blocks_are_fused_into_matmulnbits(tmp_path, gemm):
    src, out, report = convert(tmp_path, chain(gemm), "b", bits=4,
                               weight={"block_size": 32})
    assert {w.layout for w in report.quantized} == {"blocks of 32"}
    nodes = dequantize_nodes(out)
    model = onnx.load(str(out))
    assert model.opset_import[0].version == 21
    for name in ("w0", "w1", "w2"):
        attrs = {a.name: a.i for a in nodes[name].attribute}
        assert attrs == {"axis": 0, "block_size": 32}
    if gemm:  # stored [K, N], transB cleared: MatMulNBits fuses only that layout
        assert all(a.i == 0 for n in model.graph.node if n.op_type == "Gemm"
                   for a in n.attribute if a.name == "transB")
        assert initializers(out)["w0_quantized"].shape == (256, 512)
    assert optimized_ops(out, tmp_path)["MatMulNBits"] == 3
    x = np.random.default_rng(0).standard_normal((8, 256)).astype(np.float32)
    (got,) = run_model(out, {"x": x})
    floats, h = initializers(src), x.astype(np.float64)
    for i in range(3):  # numpy with the blocks' own dequantized weights
        w = floats[f"w{i}"].T if gemm else floats[f"w{i}"]
        h = h @ layouts.nearest(w, WeightLayout(qparams.weight_only_grid(4), 0, 32)
                                ).dequantized() + floats[f"b{i}"]
        h = h / (1 + np.abs(h)) if i < 2 else h
    # MatMulNBits quantizes activations to int8 by default (accuracy level 4).
    assert sqnr_db(h, got) > 35


def clipped(model: onnx.ModelProto, low: float | None, high: float | None) -> onnx.ModelProto:
    """`model` with each Relu a Clip to [low, high] (a bound of None left out)."""
    for i, node in enumerate(model.graph.node):
        if node.op_type == "Relu":
            bounds = []
            for name, bound in ((f"lo{i}", low), (f"hi{i}", high)):
                if bound is not None:
                    model.graph.initializer.append(
                        numpy_helper.from_array(np.array(bound, np.float32), name))
                bounds.append(name if bound is not None else "")
            node.op_type = "Clip"
            node.input.extend(bounds[:2] if high is not None else bounds[:1])
    return model


@pytest.mark.parametrize("gemm", [False, True])
@pytest.mark.parametrize("bounds", [None, (0.0, 6.0), (0.0, None), (None, 0.5)])
def test_blocks_behind_relu_or_clip_are_fused_into_matmulnbits(tmp_path, gemm, bounds):
    """onnxruntime 1.32 leaves a blocked weight's DequantizeLinear unfused (run on every
    inference) where a Relu or Clip reads the Gemm; as Max / Min they fuse, and the model
    computes the same: equal to the float graph with the weights dequantized, at load."""
    model = mlp(gemm=gemm) if bounds is None else clipped(mlp(gemm=gemm), *bounds)
    src, out, report = convert(tmp_path, model, "b", bits=4, weight={"block_size": 32})
    assert report.weight_quant.activations_unfused == 2
    assert "Gemm weights written as Max/Min: 2" in report.format()
    ops = optimized_ops(out, tmp_path)
    assert ops["MatMulNBits"] == 3 and ops["DequantizeLinear"] == 0
    assert ops["Relu"] + ops["Clip"] + ops["FusedGemm"] == 0
    x = np.random.default_rng(0).standard_normal((8, 256)).astype(np.float32)
    floats, h = initializers(src), x.astype(np.float64)
    low, high = bounds if bounds is not None else (0.0, None)
    for i in range(3):
        w = floats[f"w{i}"].T if gemm else floats[f"w{i}"]
        h = h @ layouts.nearest(w, WeightLayout(qparams.weight_only_grid(4), 0, 32)
                                ).dequantized() + floats[f"b{i}"]
        if i < 2:
            h = np.clip(h, low, high)
    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    session = ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
    (at_load,) = session.run(None, {"x": x})
    assert np.abs(at_load - h).max() < 1e-4 * np.abs(h).max()
    (got,) = run_model(out, {"x": x})  # MatMulNBits: int8 activations (accuracy level 4)
    assert sqnr_db(h, got) > 35


@pytest.mark.parametrize(("bits", "fused"), [(8, True), (12, False)])
def test_per_channel_gemm_weights_are_stored_for_matmulnbits(tmp_path, bits, fused):
    """A transB=1 Gemm's per-channel weight is stored [K, N] with scales per column, which
    MatMulNBits takes at 2-8 bits (int16 it does not: left as it was)."""
    _, out, report = convert(tmp_path, mlp(gemm=True), "c", bits=bits)
    assert report.weight_quant.activations_unfused == (2 if fused else 0)
    model = onnx.load(str(out))
    assert sum(n.op_type == "Relu" for n in model.graph.node) == (0 if fused else 2)
    assert initializers(out)["w0_quantized"].shape == ((256, 512) if fused else (512, 256))
    ops = optimized_ops(out, tmp_path)
    assert ops["MatMulNBits"] == (3 if fused else 0)
    assert ops["DequantizeLinear"] == (0 if fused else 3)


def test_block_dequantization_matches_each_blocks_own_grid(tmp_path):
    src, out, _ = convert(tmp_path, embedding(dim=48), "e", bits=4,
                          weight={"block_size": 16})
    table = initializers(src)["table"]
    inits = initializers(out)
    attrs = {a.name: a.i for a in dequantize_nodes(out)["table"].attribute}
    assert attrs == {"axis": 1, "block_size": 16}  # along the rows of the table
    layout = WeightLayout(qparams.weight_only_grid(4), 1, 16)
    want = layouts.nearest(table, layout)
    np.testing.assert_array_equal(inits["table_scale"], want.scale)
    ids = np.arange(8, dtype=np.int64).reshape(1, 8) * 97
    (got,) = run_model(out, {"ids": ids})
    expected = want.dequantized()[ids[0]] @ layouts.nearest(
        initializers(src)["proj"], WeightLayout(qparams.weight_only_grid(4), 0, 16)
    ).dequantized()
    np.testing.assert_allclose(got[0], expected, atol=0.05 * np.abs(expected).max())


def test_per_tensor_weights_have_one_scale(tmp_path):
    _, out, report = convert(tmp_path, mlp(), "t", bits=8, weight={"per_channel": "false"})
    assert {w.layout for w in report.quantized} == {"per tensor"}
    inits = initializers(out)
    assert all(inits[f"w{i}_scale"].shape == () for i in range(3))
    assert all(not any(a.name == "axis" for a in n.attribute)
               for n in dequantize_nodes(out).values())


# --- weight and bias correction ------------------------------------------------------------


def single_conv(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((24, 4, 3, 3)) * 0.3 + 0.05).astype(np.float32)
    return _model([helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1] * 4,
                                    strides=[2, 2])],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 9, 9])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 24, 5, 5])],
                  [numpy_helper.from_array(w, "w")])


def test_weight_correction_is_folded_into_the_scales(tmp_path):
    src, out, report = convert(tmp_path, single_conv(), "c", bits=3,
                               weight={"bias_correction": "true"})
    _, plain, _ = convert(tmp_path, single_conv(), "p", bits=3)
    assert report.weight_quant.weight_corrections == 1
    assert report.weight_quant.bias_corrections is None  # no calibration data
    w = initializers(src)["w"]
    a, b = initializers(plain), initializers(out)
    np.testing.assert_array_equal(a["w_quantized"], b["w_quantized"])
    integers = rounded(w, WeightLayout(qparams.weight_only_grid(3), 0))
    var, _ = correction_factors(w, integers.dequantized(), 0)
    np.testing.assert_allclose(b["w_scale"], a["w_scale"] * var.reshape(-1), rtol=1e-6)
    # Nothing added beside the weight's dequantization and the Conv.
    assert len(onnx.load(str(out)).graph.node) == len(onnx.load(str(plain)).graph.node)


def test_keep_kernel_sums_false_writes_plain_nearest_integers(tmp_path):
    """`[weight_quant_param] keep_kernel_sums=false` turns sum-preserving rounding off: the
    integers written are nearest rounding's, which differ from the default's here."""
    src, default, _ = convert(tmp_path, single_conv(), "d", bits=3)
    _, plain, _ = convert(tmp_path, single_conv(), "p", bits=3,
                               weight={"keep_kernel_sums": "false"})
    w = initializers(src)["w"]
    layout = WeightLayout(qparams.weight_only_grid(3), 0)
    np.testing.assert_array_equal(initializers(plain)["w_quantized"],
                                  layouts.nearest(w, layout).q)
    np.testing.assert_array_equal(initializers(default)["w_quantized"], rounded(w, layout).q)
    assert not np.array_equal(rounded(w, layout).q, layouts.nearest(w, layout).q)


def test_bias_correction_with_data_removes_the_mean_output_error(tmp_path):
    """For a linear layer the shift op(E[x], W - Ŵ) is exact on the calibration samples: the
    quantized conv's mean output per channel equals the float one's, padding included."""
    data = random_samples(tmp_path / "calib", 16, seed=3, shape=(1, 4, 9, 9))
    src, out, report = convert(tmp_path, single_conv(), "c", bits=3,
                               weight={"bias_correction": "true"}, data=f"x:{data}")
    _, plain, _ = convert(tmp_path, single_conv(), "p", bits=3)
    corrections = report.weight_quant.bias_corrections
    assert [c.applied for c in corrections] == [True]
    assert "bias correction (expected output shift): 1 of 1" in report.format()
    x = np.concatenate([np.fromfile(p, np.float32).reshape(1, 4, 9, 9)
                        for p in sorted(data.glob("*.bin"))])
    ref = np.concatenate([run_model(src, {"x": x[i:i + 1]})[0] for i in range(16)])

    def mean_error(path):
        got = np.concatenate([run_model(path, {"x": x[i:i + 1]})[0] for i in range(16)])
        return np.abs((got - ref).mean(axis=(0, 2, 3))).max()

    assert mean_error(plain) > 1e-3
    assert mean_error(out) < 2e-5


# --- mixed bit -------------------------------------------------------------------------------


def layered_mlp() -> onnx.ModelProto:
    """Layers whose weights need different widths for the same relative error: uniform
    values (4 bits at init_scale 0.1), normal ones (5) and normal ones with one large value
    per output channel (6)."""
    model = mlp((256, 128, 128, 64))
    rng = np.random.default_rng(5)
    for init in model.graph.initializer:
        w = numpy_helper.to_array(init).copy()
        if init.name == "w0":
            w = rng.uniform(-1, 1, w.shape).astype(np.float32)
        elif init.name == "w2":
            w[0] *= 60
        init.CopyFrom(numpy_helper.from_array(w, init.name))
    return model


def test_mixed_bit_gives_each_layer_the_fewest_bits_for_init_scale(tmp_path):
    src, out, report = convert(tmp_path, layered_mlp(), "m", bits=0,
                               mixed={"init_scale": "0.1"})
    bits = {w.name: w.bits for w in report.quantized}
    assert bits == {"w0": 4, "w1": 5, "w2": 6}
    for record in report.quantized:
        assert record.storage == qparams.container_for(record.bits).name.lower()
    floats = initializers(src)
    inits = initializers(out)
    for name, b in bits.items():
        w = floats[name]
        axis = 1
        deq = ((inits[f"{name}_quantized"].astype(np.int64) - inits[f"{name}_zero_point"])
               * inits[f"{name}_scale"])
        assert relative_error(w, deq, axis) <= 0.1
        fewer = layouts.nearest(w, WeightLayout(qparams.weight_only_grid(b - 1), axis))
        assert relative_error(w, fewer.dequantized(), axis) > 0.1
    text = report.format()
    assert "mixed bit: init_scale 0.1;" in text and "bits per layer" in text
    assert all(f"{name} [MatMul" in text for name in bits)


def test_auto_tune_finds_the_largest_init_scale_that_keeps_the_output(tmp_path):
    src, out, report = convert(tmp_path, DIGITS / "model.onnx", "a", bits=0,
                               mixed={"auto_tune": "true"}, data=f"input:{CALIB}")
    summary = report.weight_quant
    tried = dict(summary.auto_tune)
    assert tried[summary.init_scale] >= 0.995
    larger = [s for s, cos in tried.items() if s > summary.init_scale]
    assert larger and all(tried[s] < 0.995 for s in larger)
    assert min(larger) <= summary.init_scale * 1.01 + 1e-12
    x = np.stack([np.fromfile(p, np.float32).reshape(1, 8, 8)
                  for p in sorted(CALIB.glob("*.bin"))])
    (ref,), (got,) = run_model(src, {"input": x}), run_model(out, {"input": x})
    ref, got = ref.astype(np.float64).ravel(), got.astype(np.float64).ravel()
    assert ref @ got / np.linalg.norm(ref) / np.linalg.norm(got) >= 0.995


# --- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("settings", "message"), [
    ({"weight": {"quant_strategy": "GPTQ"}},
     r"quant_strategy: needs calibration data: set calibrate_path"),
    ({"mixed": {"auto_tune": "true"}, "bits": 0}, r"auto_tune: needs calibration data"),
    ({"mixed": {"init_scale": "0.05"}}, r"init_scale: applies only to mixed bit \(bit_num=0\)"),
    ({"weight": {"block_size": "48"}},
     r"block_size: 48 is not allowed; allowed: 0 \(per channel\) or a power of two >= 16"),
    ({"weight": {"block_size": "32", "per_channel": "false"}},
     r"block_size: blocks need per_channel=true"),
    ({"weight": {"quant_strategy": "HQQ"}}, r"'HQQ' is not supported; allowed: MAX_MIN, GPTQ"),
    ({"mixed": {"init_scale": "1"}, "bits": 0},
     r"init_scale: 1 is out of range; allowed: \(0, 1\)"),
    ({"mixed": {"max_iterations": "39"}, "bits": 0},
     r"max_iterations: 39 is out of range; allowed: \[40, 65535\]"),
    ({"weight": {"shallow_convs_8bit": "maybe"}}, r"shallow_convs_8bit: 'maybe' is not"),
])
def test_config_errors_are_one_line_usage_errors(tmp_path, settings, message):
    with pytest.raises(ptqconv.PtqUsageError, match=message) as caught:
        convert(tmp_path, mlp((16, 16)), "x", **settings)
    assert "\n" not in str(caught.value)


# --- PostTraining ---------------------------------------------------------------------------


def post_training(tmp_path, strategy: str, bits: int = 3):
    path = tmp_path / f"pt_{strategy}.ini"
    path.write_text(
        f"[common_quant_param]\nquant_type=FULL_QUANT\nbit_num={bits}\n"
        f"[data_preprocess_param]\ncalibrate_path=input:{CALIB}\n"
        "[full_quant_param]\nactivation_bit_num=8\nactivation_quant_method=MAX_MIN\n"
        f"bias_correction=false\nequalize=false\nsmooth_quant=false\nquant_strategy={strategy}\n")
    out = tmp_path / f"pt_{strategy}.onnx"
    report = ptqconv.convert(str(DIGITS / "model.onnx"), str(out), "PostTraining",
                             config_file=str(path))
    return out, report


def test_post_training_gptq_keeps_the_integer_kernels_and_lowers_the_error(tmp_path):
    """W3A8 on the shipped example: measured 18.3 dB with nearest weights, 27.8 dB with GPTQ
    on the held-out digits."""
    nearest, _ = post_training(tmp_path, "MAX_MIN")
    rounded, report = post_training(tmp_path, "GPTQ")
    assert report.post_training.gptq.layers == 5
    assert "GPTQ: 5 layers" in report.format()
    x = digits_eval()
    (ref,) = run_model(DIGITS / "model.onnx", {"input": x})
    (near,), (got,) = run_model(nearest, {"input": x}), run_model(rounded, {"input": x})
    assert sqnr_db(ref, got) > sqnr_db(ref, near) + 6
    a, b = initializers(nearest), initializers(rounded)
    # Weight ranges at most nearest's (weights.clipping), biases on input x weight scales;
    # the activations' grids untouched.
    for name in a:
        if name.endswith("_zero_point"):
            np.testing.assert_array_equal(a[name], b[name])
        elif name.endswith("_scale") and (".weight" in name or ".bias" in name):
            assert np.all(b[name] <= a[name] * (1 + 1e-6)), name
        elif name.endswith("_scale"):
            np.testing.assert_array_equal(a[name], b[name])
    weights = [n for n in b if n.endswith(".weight_quantized")]
    # The W3 grid, but for the first conv (9 weights per output channel: passes.qdq.is_shallow)
    shallow = [n for n in weights if np.prod(b[n].shape[1:]) <= 32 and b[n].ndim == 4]
    assert shallow == ["conv1.weight_quantized"]
    assert all(np.abs(b[n]).max() <= (127 if n in shallow else 3) for n in weights)
    ops = optimized_ops(rounded, tmp_path)
    assert ops["QLinearConv"] == 3 and "DequantizeLinear" not in ops


# --- equalization ----------------------------------------------------------------------------


def relu_chain(group: int = 1, seed: int = 0) -> onnx.ModelProto:
    """Conv(16) -> Relu -> Conv with `group` groups: channel c of the first conv is scaled
    by k_c, from 0.1 to 10, and the second conv's input channel c by 1 / k_c, so every
    channel matters alike but their ranges lie a hundredfold apart in both weights (what
    folding a BatchNormalization can leave)."""
    rng = np.random.default_rng(seed)
    k = np.logspace(-1, 1, 16, dtype=np.float32)
    w1 = rng.standard_normal((16, 3, 3, 3)).astype(np.float32) * k.reshape(16, 1, 1, 1)
    b1 = rng.standard_normal(16).astype(np.float32) * k
    w2 = rng.standard_normal((32, 16 // group, 3, 3)).astype(np.float32) * 0.1
    w2 = (w2.reshape(group, 32 // group, 16 // group, 9)
          / k.reshape(group, 1, 16 // group, 1)).reshape(w2.shape)
    return _model(
        [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="c1", pads=[1] * 4),
         helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
         helper.make_node("Conv", ["r1", "w2"], ["y"], name="c2", pads=[1] * 4, group=group)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32, 12, 12])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(b1, "b1"),
         numpy_helper.from_array(w2, "w2")])


@pytest.mark.parametrize("group", [1, 4, 16])
def test_equalization_keeps_the_float_model_and_evens_the_ranges(group):
    from ptqconv import modelio
    from ptqconv.passes.weight_equalize import WeightEqualizePass

    model = ir_model(relu_chain(group))
    assert WeightEqualizePass()(model).chains == 1
    w1 = model.graph.initializers["w1"].const_value.numpy()
    w2 = model.graph.initializers["w2"].const_value.numpy()
    r1 = np.abs(w1).reshape(16, -1).max(1)
    r2 = np.abs(w2).reshape(group, 32 // group, 16 // group, -1).max(axis=(1, 3)).reshape(16)
    np.testing.assert_allclose(r1, r2, rtol=1e-5)
    x = np.random.default_rng(1).standard_normal((1, 3, 12, 12)).astype(np.float32)
    (want,) = run_model_proto(relu_chain(group), x)
    (got,) = run_model_proto(modelio.ir.to_proto(model), x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def ir_model(proto: onnx.ModelProto):
    import onnx_ir as ir

    return ir.serde.deserialize_model(proto)


def run_model_proto(proto: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def test_equalization_is_kept_only_where_the_calibration_samples_measure_a_gain(tmp_path):
    data = random_samples(tmp_path / "calib", 8, seed=4, shape=(1, 3, 12, 12))
    src, out, report = convert(tmp_path, relu_chain(), "eq", bits=6, data=f"x:{data}",
                               weight={"per_channel": "false"})
    summary = report.weight_quant
    without, with_ = summary.equalize_errors
    assert with_ < without and summary.equalized == 1
    assert "equalization of 1 Conv -> Relu -> Conv chains: kept" in report.format()
    _, plain, report = convert(tmp_path, relu_chain(), "plain", bits=6,
                               weight={"per_channel": "false"})
    assert report.weight_quant.equalize_errors is None and report.weight_quant.equalized == 0
    assert "equalization left alone: 1 Conv -> Relu -> Conv chains (no calibration" in \
        report.format()
    x = np.random.default_rng(2).standard_normal((1, 3, 12, 12)).astype(np.float32)
    (ref,), (got,), (unequalized,) = (run_model(p, {"x": x}) for p in (src, out, plain))
    assert sqnr_db(ref, got) > sqnr_db(ref, unequalized) + 6
    _, _, report = convert(tmp_path, relu_chain(), "pc", bits=6, data=f"x:{data}")
    summary = report.weight_quant  # per channel: not a candidate, nothing measured
    assert summary.equalize_chains == 0 and summary.equalize_errors is None
    assert "Conv -> Relu -> Conv" not in report.format()


def test_equalization_is_left_out_where_it_measures_worse(tmp_path, monkeypatch):
    from ptqconv import weight_only

    monkeypatch.setattr(weight_only, "_equalize_errors", lambda *args: (0.01, 0.02))
    data = random_samples(tmp_path / "calib", 2, seed=4, shape=(1, 3, 12, 12))
    _, out, report = convert(tmp_path, relu_chain(), "worse", bits=6, data=f"x:{data}",
                             weight={"per_channel": "false", "quant_strategy": "MAX_MIN"})
    _, plain, _ = convert(tmp_path, relu_chain(), "plain", bits=6,
                          weight={"per_channel": "false"})
    assert report.weight_quant.equalized == 0
    assert "equalization of 1 Conv -> Relu -> Conv chains: left out" in report.format()
    a, b = initializers(out), initializers(plain)
    assert a.keys() == b.keys() and all(np.array_equal(a[n], b[n]) for n in a)


# --- GPTQ's starting grid --------------------------------------------------------------


def _weighted_error(w, scale, zero, importance, grid):
    s, z = scale[..., None], zero[..., None]
    rounded = qparams.dequantize(qparams.quantize(w, s, z, grid), s, z)
    return np.einsum("grc,grc->gr", np.square(w - rounded, dtype=np.float64),
                     np.broadcast_to(importance, w.shape))


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([2, 4, 8]), st.booleans())
def test_shrunk_ranges_never_round_worse_and_come_from_the_one_range_module(seed, bits,
                                                                            symmetric):
    from ptqconv.weights.clipping import SHRINK_FACTORS, shrunk_rows

    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((2, 6, 40)) * rng.uniform(0.01, 3, (2, 6, 1))).astype(np.float32)
    w[:, :, 0] *= rng.uniform(1, 8, (2, 6))  # an outlier per row, as BN-folded weights have
    importance = rng.uniform(0, 5, (2, 1, 40))
    grid = qparams.fused_weight_grid(bits, False) if symmetric else qparams.weight_only_grid(bits)
    scale, zero = shrunk_rows(w, importance, grid)
    own = qparams.scale_zero_point(w.min(-1), w.max(-1), grid)
    # Never worse than the weight's own range, row by row.
    assert np.all(_weighted_error(w, scale, zero, importance, grid)
                  <= _weighted_error(w, *own, importance, grid) * (1 + 1e-12))
    # Every row's parameters are qparams' for its range times one of the factors.
    candidates = [qparams.scale_zero_point(w.min(-1) * f, w.max(-1) * f, grid)
                  for f in SHRINK_FACTORS]
    assert all(any(s[i] == scale[i] and z[i] == zero[i] for s, z in candidates)
               for i in np.ndindex(scale.shape))


def test_at_4_bits_heavy_tailed_rows_get_narrower_ranges_and_less_weighted_error():
    from ptqconv.weights.clipping import shrunk_rows

    rng = np.random.default_rng(0)
    # Laplace rows: the few largest weights stretch the range over mostly empty levels.
    w = rng.laplace(size=(1, 8, 256)).astype(np.float32)
    importance = np.ones((1, 1, 256))
    grid = qparams.weight_only_grid(4)
    scale, zero = shrunk_rows(w, importance, grid)
    own_scale, own_zero = qparams.scale_zero_point(w.min(-1), w.max(-1), grid)
    # Measured: ranges 0.86-0.94 of their own, 11% less rounding error in all.
    assert np.all(scale < 0.95 * own_scale)
    assert (_weighted_error(w, scale, zero, importance, grid).sum()
            < 0.92 * _weighted_error(w, own_scale, own_zero, importance, grid).sum())


# --- blocked convs, block ranges ---------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([2, 4]), st.sampled_from([0, 1]),
       st.sampled_from([8, 16, 32]))
def test_shrunk_blocks_never_round_worse_than_their_own_ranges(seed, bits, axis, block):
    from ptqconv.weights.clipping import shrunk_blocks

    rng = np.random.default_rng(seed)
    w = rng.laplace(size=(12, 40, 3)).astype(np.float32)
    importance = rng.uniform(0, 5, w.shape)
    layout = WeightLayout(qparams.weight_only_grid(bits), axis, block)
    scale, zero = shrunk_blocks(w, importance, layout)
    own = layouts.parameters(w, layout)
    assert scale.shape == own[0].shape and zero.shape == own[1].shape

    def weighted(s, z):
        rounded = layouts.IntegerWeight(layouts.quantize(w, layout, s, z), s, z,
                                        layout).dequantized()
        per_value = np.square(w - rounded, dtype=np.float64) * importance
        return layouts.blocked(per_value, axis, block).sum(axis=axis + 1)

    # Block by block, never worse than the block's own range (factor 1 is a candidate).
    assert np.all(weighted(scale, zero) <= weighted(*own) * (1 + 1e-9))


def test_gptq_shrinks_conv_blocks_and_keeps_matmul_blocks_ranges(tmp_path):
    # At 4 bits convs are blocked along their inputs; GPTQ's range search shrinks conv blocks
    # (measured to gain) and leaves MatMul blocks their own ranges (measured to lose).
    from test_weight_quant import separable_net

    data = f"x:{random_samples(tmp_path / 'x', 4, seed=0)}"
    scales = {}
    for name, strategy in (("n", "MAX_MIN"), ("g", "GPTQ")):
        _, out, _ = convert(tmp_path, separable_net(), name, bits=4, data=data,
                            weight={"quant_strategy": strategy})
        scales[name] = initializers(out)
    blocked = [k for k in ("pw_w_scale", "conv_w_scale") if k in scales["n"]]
    assert len(blocked) == 2 and all(scales["n"][k].ndim == 4 for k in blocked)
    for k in blocked:
        assert np.all(scales["g"][k] <= scales["n"][k] * (1 + 1e-6))
        assert np.any(scales["g"][k] < 0.99 * scales["n"][k])
    samples = random_samples(tmp_path / "m", 4, seed=0, shape=(1, 256))
    found = {}
    for name, strategy in (("mn", "MAX_MIN"), ("mg", "GPTQ")):
        _, out, _ = convert(tmp_path, mlp(), name, bits=4, data=f"x:{samples}",
                            weight={"quant_strategy": strategy})
        found[name] = {k: v for k, v in initializers(out).items() if k.endswith("_scale")}
    assert found["mn"] and all(np.array_equal(found["mn"][k], found["mg"][k])
                               for k in found["mn"])


def test_below_8_bits_calibration_data_rounds_weights_by_gptq_unless_told_otherwise(tmp_path):
    data = f"input:{CALIB}"
    _, _, report = convert(tmp_path, DIGITS / "model.onnx", "d", bits=4, data=data)
    assert report.weight_quant.gptq.layers == 5 and report.weight_quant.gptq.by_default
    assert "(ptqconv's default with calibration data at this width; quant_strategy=MAX_MIN " \
        "rounds to nearest)" in report.format()
    # At 8 bits too (weights are a weight-only model's whole error); not above, nor without
    # data, nor where the config says MAX_MIN.
    _, _, report = convert(tmp_path, DIGITS / "model.onnx", "e", bits=8, data=data)
    assert report.weight_quant.gptq.by_default
    for name, bits, keys, with_data in (("n", 4, {"quant_strategy": "MAX_MIN"}, True),
                                        ("s", 9, {}, True), ("f", 4, {}, False)):
        _, _, report = convert(tmp_path, DIGITS / "model.onnx", name, bits=bits,
                               data=data if with_data else None, weight=keys)
        assert report.weight_quant.gptq is None and "GPTQ" not in report.format()
    _, _, report = convert(tmp_path, DIGITS / "model.onnx", "g", bits=4, data=data,
                           weight={"quant_strategy": "GPTQ"})
    assert not report.weight_quant.gptq.by_default and "default below" not in report.format()


# --- Shallow convs in 8 bits ------------------------------------------------------------


def storage(path, name: str) -> int:
    return next(i.data_type for i in onnx.load(str(path)).graph.initializer
                if i.name == f"{name}_quantized")


def test_shallow_convs_take_8_bits_where_the_calibration_samples_measure_a_win(tmp_path):
    """The digits stem (1x3x3: 9 weights per output channel) at 4 bits: the model written with
    it on the 8-bit grid and the one without are scored on the calibration samples; 8 bits
    win there, and the written model is the forced one's, integer for integer."""
    data = f"input:{CALIB}"
    src, out, report = convert(tmp_path, DIGITS / "model.onnx", "d", bits=4, data=data)
    summary = report.weight_quant
    asked, eight = summary.shallow_errors
    assert eight < asked and summary.shallow_8bit == 1
    assert storage(out, "conv1.weight") == TensorProto.INT8
    assert storage(out, "conv2.weight") == TensorProto.INT4  # 288 weights a channel: deep
    assert "shallow convs (at most 32 weights per output channel" in report.format()
    _, forced, report = convert(tmp_path, DIGITS / "model.onnx", "t", bits=4, data=data,
                                weight={"shallow_convs_8bit": "true"})
    assert report.weight_quant.shallow_errors is None
    a, b = initializers(out), initializers(forced)
    assert a.keys() == b.keys() and all(np.array_equal(a[n], b[n]) for n in a)
    _, off, report = convert(tmp_path, DIGITS / "model.onnx", "f", bits=4, data=data,
                             weight={"shallow_convs_8bit": "false"})
    assert report.weight_quant.shallow_8bit == 0 and storage(off, "conv1.weight") == \
        TensorProto.INT4
    # What was measured holds on held-out digits too.
    x = digits_eval()
    (ref,), (got,), (low,) = (run_model(p, {"input": x}) for p in (src, out, off))
    assert sqnr_db(ref, got) > sqnr_db(ref, low)


def test_shallow_convs_keep_the_bits_asked_when_one_sample_carries_the_win(tmp_path,
                                                                             monkeypatch):
    from ptqconv import weight_only
    from ptqconv.evaluate.held_out import SampleErrors

    def errors(noise):
        return SampleErrors({"y": np.asarray(noise)}, {"y": np.ones(len(noise))})

    # 8 bits lower pooled, but only through the last sample.
    monkeypatch.setattr(weight_only, "_candidate_errors", lambda *args: [
        errors([0.01, 0.01, 0.01, 0.5]), errors([0.011, 0.011, 0.011, 0.01])])
    _, out, report = convert(tmp_path, DIGITS / "model.onnx", "d", bits=4,
                             data=f"input:{CALIB}")
    asked, eight = report.weight_quant.shallow_errors
    assert eight < asked and report.weight_quant.shallow_8bit == 0
    assert storage(out, "conv1.weight") == TensorProto.INT4
    assert "in 8 bits: none" in report.format()


def test_without_data_shallow_convs_keep_the_bits_asked_unless_told(tmp_path):
    _, out, report = convert(tmp_path, DIGITS / "model.onnx", "d", bits=4)
    assert report.weight_quant.shallow_errors is None and report.weight_quant.shallow_8bit == 0
    assert storage(out, "conv1.weight") == TensorProto.INT4
    assert "shallow convs" not in report.format()
    _, out, report = convert(tmp_path, DIGITS / "model.onnx", "t", bits=4,
                             weight={"shallow_convs_8bit": "true"})
    assert report.weight_quant.shallow_8bit == 1
    assert "in 8 bits: 1 (shallow_convs_8bit=true in [weight_quant_param])" in report.format()
    assert storage(out, "conv1.weight") == TensorProto.INT8
    # Nothing to do at 8 bits.
    _, _, report = convert(tmp_path, DIGITS / "model.onnx", "e", bits=8,
                           data=f"input:{CALIB}")
    assert report.weight_quant.shallow_errors is None


def test_gptq_alternatives_are_solved_as_their_own_targets_would_be(tmp_path):
    import onnx_ir as ir

    model = ir.load(str(DIGITS / "model.onnx"))
    samples = [{"input": np.fromfile(p, np.float32).reshape(1, 1, 8, 8)}
               for p in sorted(CALIB.iterdir())[:16]]
    four = WeightLayout(qparams.weight_only_grid(4), 0)
    eight = WeightLayout(qparams.weight_only_grid(8), 0)
    both = gptq.run(model, {"conv1.weight": four}, samples, alternatives={"conv1.weight": eight})
    alone = gptq.run(model, {"conv1.weight": eight}, samples)
    got, want = both.alternatives["conv1.weight"], alone.integers["conv1.weight"]
    assert got.layout == eight and np.array_equal(got.q, want.q)
    assert np.array_equal(got.scale, want.scale)
    assert both.integers["conv1.weight"].layout == four


def test_shallow_convs_keep_the_bits_asked_where_three_models_do_not_fit(tmp_path,
                                                                          monkeypatch):
    from ptqconv import runtime

    monkeypatch.setattr(runtime, "available_memory", lambda: 100_000)  # 100 kB
    _, out, report = convert(tmp_path, DIGITS / "model.onnx", "d", bits=4,
                             data=f"input:{CALIB}")
    summary = report.weight_quant
    assert summary.shallow_errors is None and summary.shallow_8bit == 0
    assert summary.shallow_unmeasured.startswith("the float model and both candidates need")
    assert storage(out, "conv1.weight") == TensorProto.INT4
    assert "in 8 bits: none; not measured: the float model and both" in report.format()
