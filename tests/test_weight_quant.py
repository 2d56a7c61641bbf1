"""WeightQuant end to end: valid models at every width, error bounds, sizes, eligibility."""

from __future__ import annotations

import hashlib
import os
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import initializers, run_model
from models import DIGITS, conv_net, digits_eval, embedding, lstm, mlp, save, tied_embedding
from onnx import numpy_helper

import ptqconv
from ptqconv import modelio


def quantize(tmp_path, model, bits, name="q.onnx", **kwargs):
    src = model if isinstance(model, os.PathLike) else save(model, tmp_path / "float.onnx")
    out = tmp_path / name
    report = ptqconv.convert(str(src), str(out), "WeightQuant", bit_num=bits, **kwargs)
    return src, out, report


def run_optimized(path, feeds: dict, tmp_path, config: dict) -> tuple[np.ndarray, set[str]]:
    """The first output of `path` in onnxruntime with session `config` entries, and the op
    types of the graph it optimized."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / f"optimized{len(config)}.onnx")
    for key, value in config.items():
        options.add_session_config_entry(key, value)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    got = session.run(None, feeds)[0]
    return got, {n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node}


def _folded(model: onnx.ModelProto, name: str, integers: np.ndarray) -> np.ndarray:
    """The weight `name` computed by the nodes that make it from its initializers, with
    `integers` in place of `{name}_quantized`."""
    from onnx.reference import ReferenceEvaluator

    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name: t for t in model.graph.initializer}
    nodes, pending, used = [], [name], set()
    while pending:
        value = pending.pop()
        if value in producers and producers[value] not in nodes:
            nodes.insert(0, producers[value])
            pending += list(producers[value].input)
        elif value in inits:
            used.add(value)
    q = inits[f"{name}_quantized"]
    replaced = onnx.helper.make_tensor(q.name, q.data_type, q.dims,
                                       integers.astype(np.int64).ravel().tolist())
    graph = onnx.helper.make_graph(
        sorted(nodes, key=list(model.graph.node).index), "w", [],
        [onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)],
        [replaced if n == q.name else inits[n] for n in sorted(used)])
    sub = onnx.helper.make_model(graph, opset_imports=model.opset_import)
    return ReferenceEvaluator(sub).run(None, {})[0].astype(np.float64)


def dequantized_weights(path) -> dict[str, tuple[np.ndarray, np.ndarray, bool]]:
    """name -> (dequantized weight, per-channel step, binary) for every weight's
    DequantizeLinear (or the Cast -> Mul onnxruntime folds at load)."""
    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    result = {}
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        if node.input[0] not in inits:  # rows a Gather picked: the table is read below
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), None)
        q = inits[node.input[0]].astype(np.int64)
        scale = inits[node.input[1]]
        zp = (
            inits[node.input[2]].astype(np.int64)
            if len(node.input) > 2
            else np.zeros_like(scale, np.int64)
        )
        block = next((a.i for a in node.attribute if a.name == "block_size"), 0)
        if block:  # one scale per `block` values along `axis`
            whole = tuple(slice(0, d) for d in q.shape)
            scale = np.repeat(scale, block, axis=axis)[whole]
            zp = np.repeat(zp, block, axis=axis)[whole]
            shape = list(q.shape)
        else:
            shape = [1] * q.ndim
            if axis is not None:
                shape[axis] = -1
        deq = (q - zp.reshape(shape)) * scale.reshape(shape)
        binary = len(node.input) == 2 and set(np.unique(q)) <= {-1, 1}
        result[node.output[0]] = (deq, scale.reshape(shape), binary)
    # Weights dequantized at load (graph.folded_dequantize): Cast [-> Sub] -> Mul (and Pad,
    # Reshape, Slice), named as the weight; evaluated by onnx's reference runtime, the step as
    # what one more integer adds.
    for node in model.graph.node:
        name = node.output[0]
        if node.op_type in ("Mul", "Reshape", "Slice", "Cast") and f"{name}_quantized" in inits:
            q = inits[f"{name}_quantized"]
            deq = _folded(model, name, q)
            step = np.abs(_folded(model, name, np.ones_like(q))
                          - _folded(model, name, np.zeros_like(q)))
            binary = f"{name}_zero_point" not in inits and set(np.unique(q)) <= {-1, 1}
            result[name] = (deq, step, binary)
    # Tables a Gather reads as integers, each gathered row dequantized after it with the
    # row scales (and zero points) gathered alongside.
    for node in model.graph.node:
        table = node.input[0]
        if node.op_type == "Gather" and table.endswith("_quantized") and table in inits:
            name = table.removesuffix("_quantized")
            q = inits[table].astype(np.int64)
            per_row = f"{name}_row_scale" in inits
            scale = inits[f"{name}_row_scale" if per_row else f"{name}_scale"]
            zp = inits.get(f"{name}_row_zero_point" if per_row else f"{name}_zero_point",
                           np.zeros_like(scale)).astype(np.float64)
            result[name] = ((q - zp) * scale, scale, False)
    return result


@pytest.mark.parametrize("bits", range(1, 17))
@pytest.mark.parametrize("builder", [mlp, conv_net, embedding])
def test_every_width_gives_a_valid_model_within_a_step(tmp_path, bits, builder):
    src, out, report = quantize(tmp_path, builder(), bits, quant_weight_channel=0)
    assert report.quantized and not report.skipped
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    float_weights = initializers(src)
    deq = dequantized_weights(out)
    assert set(deq) == {w.name for w in report.quantized}
    for name, (values, scale, binary) in deq.items():
        w = float_weights[name]
        if binary:
            # sign(w) * mean|w| per slice (qparams.binary_scale): least squares, so closer
            # than all-zero weights, with every sign kept.
            assert np.all(values * w >= 0) and np.sum((values - w) ** 2) < np.sum(w**2), name
            continue
        # Nearest, but for the roundings that keep a conv kernel's sum
        # (weights.sum_rounding): within a step there, within half of one elsewhere.
        err = np.abs(values - w)
        step = scale if w.ndim == 4 else scale / 2
        assert np.all(err <= step * (1 + 1e-5) + 1e-7), name
    feeds = (
        {"ids": np.arange(8, dtype=np.int64).reshape(1, 8) * 37}
        if builder is embedding
        else {
            "x": np.random.default_rng(1)
            .standard_normal(
                onnx.load(str(src)).graph.input[0].type.tensor_type.shape.dim[1].dim_value
                and (1, 256)
                if builder is mlp
                else (1, 3, 16, 16)
            )
            .astype(np.float32)
        }
    )
    (expected,), (got,) = run_model(src, feeds), run_model(out, feeds)
    assert got.shape == expected.shape and np.all(np.isfinite(got))


@pytest.mark.parametrize("bits", range(1, 17))
def test_shipped_example_runs_at_every_width(tmp_path, bits):
    _, out, _ = quantize(tmp_path, DIGITS / "model.onnx", bits)
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    x = digits_eval(50)
    (got,) = run_model(out, {"input": x})
    assert got.shape == (50, 10) and np.all(np.isfinite(got))


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_8_bit_example_outputs_match_float_on_real_inputs(tmp_path):
    src, out, report = quantize(tmp_path, DIGITS / "model.onnx", 8)
    x = digits_eval()
    (ref,), (got,) = run_model(src, {"input": x}), run_model(out, {"input": x})
    assert cosine(ref, got).min() >= 0.999
    assert (ref.argmax(1) == got.argmax(1)).mean() >= 0.995
    # The first conv has 32 output channels > 16, so every weight of the example qualifies.
    assert len(report.quantized) == 5


def per_channel_config(tmp_path) -> str:
    """A WeightQuant config asking every weight per channel at the bits given (no blocks)."""
    config = tmp_path / "per_channel.ini"
    config.write_text("[weight_quant_param]\nblock_size=0\n")
    return str(config)


@pytest.mark.parametrize(("bits", "limit"), [(16, 0.52), (8, 0.27), (4, 0.15), (2, 0.09)])
def test_size_ratio_of_weight_dominated_model(tmp_path, bits, limit):
    src, out, report = quantize(tmp_path, mlp(), bits, config_file=per_channel_config(tmp_path))
    ratio = out.stat().st_size / src.stat().st_size
    assert ratio <= limit, ratio
    assert report.size_after == out.stat().st_size
    assert report.size_before == src.stat().st_size


def test_int2_matmul_with_n_not_multiple_of_4_uses_int4_container_and_stays_correct(tmp_path):
    # onnxruntime's MatMulNBits is wrong for int2 weights when N % 4 != 0 (see weight_quant).
    src, out, report = quantize(tmp_path, mlp((64, 30, 6)), 2)
    assert [w.storage for w in report.quantized] == ["int4", "int4"]
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    deq = dequantized_weights(out)
    w0, w1 = deq["w0"][0], deq["w1"][0]
    b = initializers(src)
    expected = np.maximum(x @ w0 + b["b0"], 0) @ w1 + b["b1"]
    (got,) = run_model(out, {"x": x})
    # onnxruntime's fused kernel quantizes activations to int8 by default (accuracy_level 4).
    assert np.abs(got - expected).max() <= 0.02 * np.abs(expected).max()


def test_int2_weight_read_through_a_transpose_loads_with_default_options(tmp_path):
    """x @ W.T at 2 bits: onnxruntime's optimizer moves the Transpose onto the int2
    initializer and its constant folding then refused the model ("Element type mismatch");
    such weights keep the int2 grid in an int4 container."""
    w = (np.random.default_rng(0).standard_normal((64, 64)) / 8).astype(np.float32)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
         onnx.helper.make_node("MatMul", ["x", "wt"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 64])],
        [numpy_helper.from_array(w, "w")])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])
    _, out, report = quantize(tmp_path, model, 2)
    assert [r.storage for r in report.quantized] == ["int4"]
    assert report.latency is not None  # timed, so loaded with the default options
    x = {"x": np.random.default_rng(1).standard_normal((1, 64)).astype(np.float32)}
    (got,) = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, x)
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    (ref,) = ort.InferenceSession(str(out), plain, providers=["CPUExecutionProvider"]).run(
        None, x)
    # The fused 4-bit kernel quantizes activations to int8 (accuracy_level 4).
    assert np.abs(got - ref).max() <= 0.02 * np.abs(ref).max()
    cosine = float((ref * (x["x"] @ w.T)).sum() / np.linalg.norm(ref)
                   / np.linalg.norm(x["x"] @ w.T))
    assert cosine > 0.85, cosine


def test_a_written_model_onnxruntime_refuses_with_default_options_is_an_error(
        tmp_path, monkeypatch):
    """WeightQuant output is first loaded without graph optimizations (fusing a big model
    costs more than it checks); the latency timing loads it as users do, and a refusal
    there fails the conversion with nothing written."""
    from ptqconv import runtime

    def refuse(models, *args, **kwargs):
        raise runtime.ModelRefused("quantized", "Element type mismatch")

    monkeypatch.setattr(runtime, "compare_latency", refuse)
    with pytest.raises(ptqconv.PtqError, match="onnxruntime cannot load it with its default "
                       "options: Element type mismatch; nothing was written"):
        quantize(tmp_path, mlp(), 8)
    assert not (tmp_path / "q.onnx").exists()


def test_float_constants_no_weight_slot_reads_are_listed_as_skipped(tmp_path):
    """A MatMul's constant first input and a weight behind a Reshape stay float; the summary
    counted neither ("weights skipped: 0" with two float matrices left)."""
    rng = np.random.default_rng(0)
    h = onnx.helper
    graph = h.make_graph(
        [h.make_node("MatMul", ["wl", "x"], ["a"]),
         h.make_node("Transpose", ["a"], ["t"], perm=[1, 0]),
         h.make_node("Reshape", ["wr", "shape"], ["w2"]),
         h.make_node("MatMul", ["t", "w2"], ["b"]),
         h.make_node("MatMul", ["b", "wn"], ["y"])], "g",
        [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [64, 8])],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [8, 64])],
        [numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "wl"),
         numpy_helper.from_array(rng.standard_normal(4096).astype(np.float32), "wr"),
         numpy_helper.from_array(np.array([64, 64], np.int64), "shape"),
         numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "wn")])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 13)])
    _, out, report = quantize(tmp_path, model, 8, quant_weight_size=0)
    assert [w.name for w in report.quantized] == ["wn"]
    assert {w.name: w.reason for w in report.skipped} == {
        "wl": "the MatMul's first input (A): only B is a weight",
        "wr": "read through a Reshape: weights are quantized where an op reads them directly"}
    ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])


def test_eligibility_rules_and_skip_list(tmp_path):
    model = conv_net(channels=16)
    _, _, report = quantize(tmp_path, model, 8)
    reasons = {w.name: w.reason for w in report.skipped}
    # conv0 has 16 output channels (not > 16), deconv 16, conv1 3: all skipped by the rule.
    assert reasons == {
        "conv0_w": "16 output channels <= quantWeightChannel 16",
        "deconv_w": "16 output channels <= quantWeightChannel 16",
        "conv1_w": "3 output channels <= quantWeightChannel 16",
    }
    _, _, report = quantize(
        tmp_path, mlp(), 8, name="b.onnx", quant_weight_size=256 * 512, skip_quant_node="fc2"
    )
    assert {w.name for w in report.quantized} == {"w1"}
    reasons = {w.name: w.reason for w in report.skipped}
    assert reasons == {
        "w0": "131072 elements <= quantWeightSize 131072",
        "w2": "skip_quant_node (fc2)",
    }
    _, _, report = quantize(tmp_path, mlp(), 8, name="c.onnx", skip_quant_node=["MatMul"])
    assert not report.quantized and len(report.skipped) == 3


def test_constant_node_weights_at_opset_11_are_quantized_and_opset_raised(tmp_path):
    src, out, report = quantize(
        tmp_path, conv_net(opset=11, constant_nodes=True), 8, quant_weight_channel=0
    )
    assert len(report.quantized) == 3
    model = onnx.load(str(out))
    assert model.opset_import[0].version == 13  # per-axis DequantizeLinear
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    (ref,), (got,) = run_model(src, {"x": x}), run_model(out, {"x": x})
    assert cosine(ref.ravel(), got.ravel()) >= 0.999


def test_weight_shared_with_a_non_weight_use_stays_float(tmp_path):
    model = mlp((64, 64, 8))
    model.graph.node.append(onnx.helper.make_node("Shape", ["w0"], ["w0_shape"], name="shape"))
    model.graph.output.append(onnx.helper.make_tensor_value_info("w0_shape", 7, [2]))
    _, out, report = quantize(tmp_path, model, 8)
    assert {w.name: w.reason for w in report.skipped} == {
        "w0": "also a non-weight input of Shape shape"
    }
    (shape_out,) = run_model(out, {"x": np.zeros((1, 64), np.float32)})[1:]
    assert shape_out.tolist() == [64, 64]


def test_external_data_in_and_out(tmp_path, monkeypatch):
    src = tmp_path / "ext.onnx"
    onnx.save(
        mlp(), str(src), save_as_external_data=True, location="ext.weights", size_threshold=1024
    )
    monkeypatch.setattr(modelio, "EXTERNAL_DATA_THRESHOLD", 100_000)
    out = tmp_path / "out.onnx"
    ptqconv.convert(str(src), str(out), "WeightQuant", bit_num=8)
    assert (tmp_path / "out.onnx.data").stat().st_size > 100_000
    assert out.stat().st_size < 10_000
    x = np.ones((2, 256), np.float32)
    (ref,), (got,) = run_model(src, {"x": x}), run_model(out, {"x": x})
    assert cosine(ref, got).min() >= 0.999
    assert not list(tmp_path.glob(".*tmp"))


def test_output_is_byte_identical_across_runs(tmp_path):
    digests = []
    for name in ("a.onnx", "b.onnx"):
        _, out, _ = quantize(tmp_path, DIGITS / "model.onnx", 4, name=name)
        digests.append(hashlib.sha256(out.read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_model_above_onnxruntime_opset_is_refused(tmp_path):
    model = mlp((8, 8))
    model.opset_import[0].version = 27
    src = tmp_path / "new.onnx"
    onnx.save(model, str(src))
    with pytest.raises(ptqconv.PtqError, match="opset 27 is newer than onnxruntime can run"):
        ptqconv.convert(str(src), str(tmp_path / "o.onnx"), "WeightQuant")
    assert not (tmp_path / "o.onnx").exists()


def float16_mlp(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((64, 128)) * 0.1).astype(np.float16)
    w2 = (rng.standard_normal((128, 32)) * 0.1).astype(np.float16)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w1"], ["h"]),
         onnx.helper.make_node("Relu", ["h"], ["r"]),
         onnx.helper.make_node("MatMul", ["r", "w2"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT16, [4, 64])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT16, [4, 32])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)],
                                  ir_version=9)


@pytest.mark.parametrize("bits, opset, min_sqnr_db", [(8, 19, 38), (4, 21, 16)])
def test_float16_weights_are_quantized_with_float16_scales(tmp_path, bits, opset, min_sqnr_db):
    src, out, report = quantize(tmp_path, float16_mlp(), bits, quant_weight_size=0)
    assert {w.name for w in report.quantized} == {"w1", "w2"}
    model = onnx.load(str(out))
    assert model.opset_import[0].version == opset  # float16 scales need 19; int4 21
    scales = [t for t in model.graph.initializer if t.name.endswith("_scale")]
    assert scales and all(t.data_type == onnx.TensorProto.FLOAT16 for t in scales)
    x = {"x": np.random.default_rng(1).standard_normal((4, 64)).astype(np.float16)}
    ref = run_model(src, x)[0].astype(np.float64)
    got = run_model(out, x)[0]
    assert got.dtype == np.float16
    sqnr = 10 * np.log10(np.sum(ref**2) / np.sum((got.astype(np.float64) - ref) ** 2))
    assert sqnr > min_sqnr_db


# --- MindSpore's [weight_quant_param] and friends -------------------------------------------------

def test_config_per_channel_false_gives_one_scale_per_weight_within_a_step(tmp_path):
    config = tmp_path / "w.cfg"
    config.write_text("[common_quant_param]\nquant_type=WEIGHT_QUANT\nbit_num=6\n"
                      "min_quant_weight_size=0\nmin_quant_weight_channel=0\nenable_encode=true\n"
                      "[weight_quant_param]\nper_channel=False\nbias_correction=False\n"
                      "quant_strategy=MAX_MIN\n")
    src = save(conv_net(), tmp_path / "float.onnx")
    out = tmp_path / "q.onnx"
    report = ptqconv.convert(src, out, "WeightQuant", config_file=config)
    assert report.bit_num == 6 and len(report.quantized) == 3
    model = onnx.load(str(out))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    float_weights = initializers(src)
    for node in (n for n in model.graph.node if n.op_type == "DequantizeLinear"):
        scale, zp = inits[node.input[1]], inits[node.input[2]].astype(np.int64)
        assert scale.shape == () and not any(a.name == "axis" for a in node.attribute)
        deq = (inits[node.input[0]].astype(np.int64) - zp) * scale
        assert np.abs(deq - float_weights[node.output[0]]).max() <= scale * (1 + 1e-5)
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    assert np.allclose(run_model(out, {"x": x})[0], run_model(src, {"x": x})[0], atol=0.1)


@pytest.mark.parametrize(("keys", "message"), [
    ("[weight_quant_param]\nquant_strategy=GPTQ\n",
     "quant_strategy: needs calibration data: set calibrate_path"),
    ("[common_quant_param]\nbit_num=0\n[mixed_bit_weight_quant_param]\nauto_tune=true\n",
     "auto_tune: needs calibration data: set calibrate_path"),
    ("[common_quant_param]\nbit_num=4\nenable_encode=false\n",
     "enable_encode: false needs bit_num 8 or 16"),
])
def test_weight_settings_that_cannot_apply_fail_in_one_line(tmp_path, capsys, keys, message):
    from ptqconv.cli import main

    config = tmp_path / "w.cfg"
    config.write_text(keys)
    out = tmp_path / "q.onnx"
    status = main([f"--modelFile={DIGITS / 'model.onnx'}", f"--outputFile={out}",
                   "--quantType=WeightQuant", f"--configFile={config}"])
    err = capsys.readouterr().err
    assert status == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and os.listdir(tmp_path) == ["w.cfg"]


def test_weight_settings_resolve_mindspore_defaults(tmp_path):
    from ptqconv.settings import ConvertSettings, MixedBitSettings

    config = tmp_path / "w.cfg"
    config.write_text("[common_quant_param]\nquant_type=WEIGHT_QUANT\nbit_num=0\n"
                      "[data_preprocess_param]\n"
                      f"calibrate_path=input:{DIGITS / 'calib' / 'input'}\n"
                      "[mixed_bit_weight_quant_param]\nauto_tune=true\n")
    settings = ConvertSettings.create(DIGITS / "model.onnx", tmp_path / "o.onnx",
                                      config_file=config)
    mode = settings.mode
    # MindSpore's bias_correction defaults to true; here it is off unless asked.
    assert (mode.bit_num, mode.per_channel, mode.bias_correction, mode.quant_strategy) == (
        0, True, False, "MAX_MIN")
    assert mode.mixed_bit == MixedBitSettings(0.02, True, 40)


def test_weight_quant_output_is_timed_against_float_and_dequantized_at_load(tmp_path):
    from ptqconv.runtime import AT_LOAD

    _, _, report = quantize(tmp_path, conv_net(channels=64), 8)
    assert report.latency is not None and not report.latency_skipped
    assert set(report.latency.ms) == {"float", "quantized", AT_LOAD}
    assert all(ms > 0 for ms in report.latency.ms.values())
    assert report.latency.runs >= 10
    assert "latency: " in report.format() and "float" in report.format()


def test_dequantize_at_load_option_folds_every_weight_dequantize(tmp_path):
    # What the summary's advice rests on: with the option, onnxruntime's optimized graph has
    # no DequantizeLinear left (the weights are float at load), and the outputs are the same.

    from ptqconv.runtime import DEQUANTIZE_AT_LOAD

    # 12-bit MatMul weights (int16, which MatMulNBits does not take) keep DequantizeLinear,
    # which onnxruntime runs on every inference unless told (conv weights per channel are
    # written to fold at load anyway, graph.folded_dequantize).
    _, out, _ = quantize(tmp_path, mlp(), 12)
    assert any(n.op_type == "DequantizeLinear" for n in onnx.load(out).graph.node)
    x = {"x": np.random.default_rng(0).standard_normal((1, 256)).astype(np.float32)}
    (default, ops), (at_load, ops_at_load) = (run_optimized(out, x, tmp_path, config)
                                              for config in ({}, DEQUANTIZE_AT_LOAD))
    assert "DequantizeLinear" in ops and "DequantizeLinear" not in ops_at_load
    np.testing.assert_allclose(at_load, default, rtol=1e-5, atol=1e-5)


def test_at_load_advice_only_where_weight_only_is_slower_and_at_load_faster():
    from ptqconv.report import at_load_lines
    from ptqconv.runtime import AT_LOAD, Latency

    def lines(quantized, at_load):
        return at_load_lines(Latency({"float": 10.0, "quantized": quantized, AT_LOAD: at_load},
                                     20, 2, "a CPU"))

    advice = lines(14.0, 10.1)
    assert len(advice) == 1 and "session.disable_quant_qdq=1" in advice[0]
    assert "10.100 ms (1.01x float)" in advice[0]
    assert lines(10.4, 9.0) == []  # within the margin of float: nothing to fix
    assert lines(14.0, 13.9) == []  # dequantizing at load would not help
    assert at_load_lines(Latency({"float": 10.0, "quantized": 14.0}, 20, 2, "a CPU")) == []


def test_weight_quant_latency_can_be_switched_off_and_says_why_it_has_no_sample(tmp_path):
    config = tmp_path / "w.cfg"
    config.write_text("[common_quant_param]\nquant_type=WEIGHT_QUANT\nbit_num=8\n"
                      "[weight_quant_param]\nmeasure_latency=false\n")
    _, _, report = quantize(tmp_path, mlp(), 8, config_file=str(config))
    assert report.latency is None and not report.latency_skipped
    assert "  latency:" not in report.format()
    # A dynamic dimension other than the batch: no random sample to time it on.
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "w")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, "seq", 64])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, "seq", 64])], [w])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    _, _, report = quantize(tmp_path, model, 8, name="seq.onnx")
    assert report.latency is None
    assert report.latency_skipped.startswith("no sample to time it on: input 'x' has dynamic "
                                             "dimensions")
    assert "--inputShape (or input_shape in [data_preprocess_param]) gives one" in \
        report.format()
    # A shape given, the random sample has one.
    _, _, report = quantize(tmp_path, model, 8, name="seq.onnx", input_shape="x:1,16,64")
    assert report.latency is not None and not report.latency_skipped


def test_latency_is_not_measured_where_the_models_side_by_side_would_crowd_memory(
        tmp_path, monkeypatch):
    import ptqconv.runtime as runtime

    monkeypatch.setattr(runtime, "available_memory", lambda: 1_000_000)
    _, out, report = quantize(tmp_path, mlp(), 8)
    assert out.exists() and report.latency is None
    # Twice the float model (1.7 MB: float, and the output dequantized at load) + the output.
    assert re.fullmatch(r"the models side by side need about 3\.\d MB, more than half of "
                        r"the 1\.0 MB available", report.latency_skipped)


def test_a_weight_read_again_through_identity_is_quantized_once_for_both_nodes(tmp_path):
    # PyTorch's exporter writes a weight two modules share once and reads it again through
    # Identity (tied weights, or deep-copied layers before training).
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.standard_normal((64, 64)) / 8).astype(np.float32), "w")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["h"], name="first"),
         onnx.helper.make_node("Identity", ["w"], ["w_again"], name="alias"),
         onnx.helper.make_node("Relu", ["h"], ["r"]),
         onnx.helper.make_node("MatMul", ["r", "w_again"], ["y"], name="second")], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 64])], [w])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    src, out, report = quantize(tmp_path, model, 8)
    assert [(r.name, r.nodes) for r in report.quantized] == [("w", ("first", "second"))]
    assert not report.skipped
    written = onnx.load(out).graph
    assert [t.name for t in written.initializer if t.data_type == onnx.TensorProto.FLOAT
            and len(t.dims) == 2] == []
    assert sum(n.op_type == "DequantizeLinear" for n in written.node) == 1
    x = rng.standard_normal((1, 64)).astype(np.float32)
    got, want = run_model(out, {"x": x})[0], run_model(src, {"x": x})[0]
    assert cosine(got, want).min() > 0.9999


def test_an_input_shape_for_timing_is_checked_like_one_for_data(tmp_path):
    # Without data, --inputShape serves only the latency timing: a misspelt input still fails.
    from ptqconv.errors import PtqUsageError

    src = save(mlp(), tmp_path / "float.onnx")
    out = tmp_path / "q.onnx"
    for kind in ("WeightQuant", "DynamicQuant"):
        with pytest.raises(PtqUsageError, match=re.escape(
                "input_shape: an input shape is given for 'nope', which is "
                "not an input of the model; model inputs: 'x'")):
            ptqconv.convert(src, out, kind, input_shape="nope:1,64")
        assert not out.exists()


def _consumers(path) -> dict[str, list[str]]:
    """tensor name -> op types of the nodes that read it."""
    users: dict[str, list[str]] = {}
    for node in onnx.load(str(path)).graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node.op_type)
    return users


@pytest.mark.parametrize("bits, keys, gathered", [
    (8, "", True), (6, "", True), (12, "", True), (8, "per_channel=false", True),
    (4, "block_size=0", False), (4, "", True)])
def test_table_rows_are_dequantized_after_the_gather_where_gather_reads_the_integers(
        tmp_path, bits, keys, gathered):
    # 4 bits with block_size left out: the table takes 8 bits (the low-bit recipe).
    cfg = tmp_path / "w.ini"
    cfg.write_text(f"[weight_quant_param]\n{keys}\n")
    _, out, report = quantize(tmp_path, embedding(), bits, config_file=str(cfg))
    assert {w.name for w in report.quantized} == {"table", "proj"}
    inits = initializers(out)
    users = _consumers(out)
    table = next(n for n, a in inits.items() if a.shape == (1000, 64))
    # int8 / int16 tables feed the Gather itself; int4 ones (which Gather cannot read) a
    # DequantizeLinear of the whole table.
    assert users[table] == (["Gather"] if gathered else ["DequantizeLinear"])
    assert inits[table].dtype == (np.int16 if bits > 8 else np.int8 if gathered else
                                  onnx.helper.tensor_dtype_to_np_dtype(onnx.TensorProto.INT4))
    deq = dequantized_weights(out)
    ids = np.array([[0, 5, 999, 5, 17, 400, 3, 1]], np.int64)
    expected = deq["table"][0][ids[0]] @ deq["proj"][0]
    # Unoptimized: onnxruntime fuses DequantizeLinear -> MatMul into MatMulNBits, which may
    # quantize its activations (accuracy level 4) and so departs from the exact product.
    (got,) = run_model(out, {"ids": ids}, level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    np.testing.assert_allclose(got[0], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [8, 4])
def test_a_tied_table_read_through_transpose_is_quantized_once_for_both(tmp_path, bits):
    src, out, report = quantize(tmp_path, tied_embedding(), bits,
                                config_file=per_channel_config(tmp_path))
    assert [w.name for w in report.quantized] == ["table"] and not report.skipped
    inits = initializers(out)
    # One integer table (int4 values come back from onnx as int8), no float copy left.
    assert [a.dtype for a in inits.values() if a.size == 500 * 32] == [
        np.int8 if bits == 8 else onnx.helper.tensor_dtype_to_np_dtype(onnx.TensorProto.INT4)]
    assert not any(a.dtype == np.float32 and a.size == 500 * 32 for a in inits.values())
    ids = np.array([[1, 2, 3, 499, 250, 2]], np.int64)
    (expected,), (got,) = run_model(src, {"ids": ids}), run_model(out, {"ids": ids})
    cos = (got * expected).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(
        expected, axis=-1)
    assert cos.min() > (0.9999 if bits == 8 else 0.98)


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_low_bits_default_to_blocks_of_32_whose_scales_set_the_size(tmp_path, bits):
    src, out, report = quantize(tmp_path, mlp(), bits)
    assert {w.layout for w in report.quantized} == {"blocks of 32"}
    assert "  low bits: MatMul/Gemm weights, and Conv weights of 32 input channels or more, " \
        "in blocks of 32 along their inputs; depthwise convs and Gather tables in 8 bits " \
        "(ptqconv's default at 1-4 bits;" in report.format()
    # bits per weight plus, per block of 32, a float32 scale and a zero point of `bits`.
    storage = 2 if bits == 2 else 4
    limit = (storage + (32 + storage) / 32) / 32 + 0.005
    assert out.stat().st_size / src.stat().st_size <= limit
    x = np.random.default_rng(0).standard_normal((4, 256)).astype(np.float32)
    (ref,), (got,) = run_model(src, {"x": x}), run_model(out, {"x": x})
    (per_channel,) = run_model(
        quantize(tmp_path, mlp(), bits, name="pc.onnx",
                 config_file=per_channel_config(tmp_path))[1], {"x": x})
    # Blocks along K follow the weights more closely than one scale per output channel.
    assert np.abs(got - ref).mean() < np.abs(per_channel - ref).mean()


@pytest.mark.parametrize(("bits", "min_cosine"), [(8, 0.9999), (4, 0.99)])
def test_recurrent_weights_are_quantized_per_gate_row(tmp_path, bits, min_cosine):
    src, out, report = quantize(tmp_path, lstm(), bits)
    assert sorted(w.name for w in report.quantized) == ["R", "W"]
    assert {w.op_type for w in report.quantized} == {"LSTM"}
    float_weights = initializers(src)
    for name, (values, scale, _) in dequantized_weights(out).items():
        assert scale.shape == (1, 128, 1)  # one step per gate row
        assert np.all(np.abs(values - float_weights[name]) <= scale / 2 * (1 + 1e-5) + 1e-7)
    x = np.random.default_rng(5).standard_normal((10, 1, 16)).astype(np.float32)
    (ref,), (got,) = run_model(src, {"x": x}), run_model(out, {"x": x})
    assert cosine(ref.reshape(1, -1), got.reshape(1, -1))[0] > min_cosine
    # Weights 24 kB in float; their scales, zero points and the float bias stay.
    assert report.size_after < report.size_before * (0.4 if bits == 8 else 0.25)


def test_mixed_bit_is_named_so_in_the_summary_heading(tmp_path, capsys):
    from ptqconv.cli import main

    out = tmp_path / "q.onnx"
    status = main([f"--modelFile={DIGITS / 'model.onnx'}", f"--outputFile={out}",
                   "--quantType=WeightQuant", "--bitNum=0"])
    text = capsys.readouterr().out
    assert status == 0
    assert text.startswith(f"WeightQuant mixed bit: {DIGITS / 'model.onnx'} -> {out}"), text


def separable_net(seed: int = 0) -> onnx.ModelProto:
    """x [1, 3, 16, 16] -> stem Conv (3 -> 48) -> depthwise 3x3 -> pointwise (48 -> 64) ->
    Conv 3x3 (64 -> 40), each followed by Relu: every kind of conv the low-bit recipe meets."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed)
    layers = [("stem", 48, 3, 3, 1), ("dw", 48, 1, 3, 48), ("pw", 64, 48, 1, 1),
              ("conv", 40, 64, 3, 1)]
    nodes, inits, prev = [], [], "x"
    for name, cout, cin, k, group in layers:
        w = rng.laplace(size=(cout, cin, k, k)) / np.sqrt(cin * k * k)
        inits.append(numpy_helper.from_array(w.astype(np.float32), f"{name}_w"))
        nodes += [helper.make_node("Conv", [prev, f"{name}_w"], [f"{name}_c"], name=name,
                                   pads=[k // 2] * 4, group=group),
                  helper.make_node("Relu", [f"{name}_c"], [f"{name}_r"])]
        prev = f"{name}_r"
    graph = helper.make_graph(
        nodes, "separable", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [1, 40, 16, 16])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_low_bits_block_convs_along_their_inputs_and_keep_depthwise_weights_in_8_bits(
        tmp_path):
    src, out, report = quantize(tmp_path, separable_net(), 4)
    layouts = {w.name: (w.layout, w.bits) for w in report.quantized}
    # The stem has 3 input channels, fewer than a block: per channel, at 4 bits.
    assert layouts == {"stem_w": ("per channel", 4), "dw_w": ("per channel", 8),
                       "pw_w": ("blocks of 32", 4), "conv_w": ("blocks of 32", 4)}
    model = onnx.load(str(out))
    inits = {t.name: t for t in model.graph.initializer}
    scales = {name: tuple(inits[f"{name}_scale"].dims) for name in ("pw_w", "conv_w")}
    assert scales == {"pw_w": (64, 2, 1, 1), "conv_w": (40, 2, 3, 3)}
    # Both folded at load (Cast -> Mul): conv_w's 64 input channels two whole blocks, pw_w's
    # 40 padded to two and cut back.
    assert not any(n.op_type == "DequantizeLinear" for n in model.graph.node)
    assert {n.op_type for n in model.graph.node} >= {"Pad", "Slice", "Reshape"}
    assert "depthwise convs and Gather tables in 8 bits" in report.format()
    x = np.random.default_rng(1).standard_normal((1, 3, 16, 16)).astype(np.float32)
    (ref,), (got,) = run_model(src, {"x": x}), run_model(out, {"x": x})
    (per_channel,) = run_model(quantize(tmp_path, separable_net(), 4, name="pc.onnx",
                                        config_file=per_channel_config(tmp_path))[1], {"x": x})
    # Blocks along the inputs and an 8-bit depthwise weight follow the float model closer
    # than every weight per channel at 4 bits.
    assert np.abs(got - ref).mean() < 0.8 * np.abs(per_channel - ref).mean()
    # An explicit block size keeps the depthwise weight in 8 bits too, and says so.
    config = tmp_path / "b16.ini"
    config.write_text("[weight_quant_param]\nblock_size=16\n")
    _, _, report = quantize(tmp_path, separable_net(), 4, name="b16.onnx",
                            config_file=str(config))
    assert {w.name: w.bits for w in report.quantized}["dw_w"] == 8
    assert "  depthwise convs in 8 bits: 1 (one input channel per group" in report.format()


@pytest.mark.parametrize(("channels", "bits", "blocked"),
                         [(24, 8, 0), (24, 4, 0), (24, 2, 0), (64, 4, 1), (48, 4, 1)])
def test_conv_weights_are_dequantized_when_onnxruntime_loads_them(tmp_path, channels, bits,
                                                                 blocked):
    """Conv and ConvTranspose weights are written as Cast [-> Sub] -> Mul (blocks through a
    Reshape), which onnxruntime folds into float weights at load: nothing of them runs per
    inference, and the outputs equal those of the same weights dequantized at load from
    DequantizeLinear. Blocks that do not divide their axis (48 input channels in blocks of
    32) are padded to whole blocks and cut back."""
    from ptqconv.runtime import DEQUANTIZE_AT_LOAD

    src, out, report = quantize(tmp_path, conv_net(channels=channels), bits,
                                quant_weight_channel=0)
    layouts = {w.name: w.layout for w in report.quantized}
    assert sum(v.startswith("blocks") for v in layouts.values()) == blocked
    model = onnx.load(str(out))
    kept = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    assert kept == set()
    assert set(dequantized_weights(out)) == {w.name for w in report.quantized}
    x = {"x": np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)}
    outputs = []
    for config in ({}, DEQUANTIZE_AT_LOAD):
        got, ops = run_optimized(out, x, tmp_path, config)
        outputs.append(got)
        assert not ops & {"Cast", "Sub", "Mul", "Reshape", "Pad", "Slice", "DequantizeLinear"}
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-6, atol=1e-6)
    # The same numbers as DequantizeLinear's: the float model with the weights numpy
    # dequantizes from the written integers, scales and zero points.
    float_model = onnx.load(str(src))
    weights = dequantized_weights(out)
    for init in float_model.graph.initializer:
        if init.name in weights:
            init.CopyFrom(numpy_helper.from_array(weights[init.name][0].astype(np.float32),
                                                  init.name))
    (expected,) = run_model(save(float_model, tmp_path / "dequantized.onnx"), x)
    np.testing.assert_allclose(outputs[0], expected, rtol=1e-5, atol=1e-6)


def test_float16_conv_weights_are_dequantized_when_onnxruntime_loads_them(tmp_path):
    """A float16 model's conv weights fold at load too: computed in float32 (onnxruntime's
    CPU provider has no float16 Mul to fold) and cast to float16 at the end, which it folds.
    Nothing of them runs per inference; the outputs are the float16 model's with the same
    integers dequantized by numpy."""
    src, out, report = quantize(tmp_path, _half(conv_net(channels=24)), 4,
                                quant_weight_channel=0)
    written = onnx.load(str(out))
    assert not any(n.op_type == "DequantizeLinear" for n in written.graph.node)
    weights = dequantized_weights(out)
    assert set(weights) == {w.name for w in report.quantized}
    x = {"x": np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float16)}
    got, ops = run_optimized(out, x, tmp_path, {})
    assert not ops & {"Sub", "Mul", "Reshape", "Pad", "Slice", "DequantizeLinear"}, ops
    float_model = onnx.load(str(src))
    for init in float_model.graph.initializer:
        if init.name in weights:
            init.CopyFrom(numpy_helper.from_array(weights[init.name][0].astype(np.float16),
                                                  init.name))
    (expected,) = run_model(save(float_model, tmp_path / "dequantized.onnx"), x)
    np.testing.assert_allclose(got.astype(np.float32), expected.astype(np.float32),
                               rtol=1e-2, atol=1e-2)


def _timed(quantized: float, at_load: float):
    """A latency check's figures: float 1 ms, the model as written and dequantized at load,
    each round alike (so that the sign test sees them)."""
    from ptqconv.runtime import AT_LOAD, Latency

    ms = {"float": 1.0, "quantized": quantized, AT_LOAD: at_load}
    return Latency(ms, 30, 2, "test CPU", {k: (v,) * 30 for k, v in ms.items()})


def _half(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with every float32 initializer, input and output in float16."""
    for init in model.graph.initializer:
        array = numpy_helper.to_array(init)
        if array.dtype == np.float32:
            init.CopyFrom(numpy_helper.from_array(array.astype(np.float16), init.name))
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    return model


@pytest.mark.timed_folding
@pytest.mark.parametrize(("quantized", "at_load", "folded", "half"),
                         [(1.5, 1.0, True, False), (0.8, 0.7, False, False),
                          (1.5, 1.45, False, False), (1.5, 1.0, True, True)])
def test_weights_are_folded_at_load_only_where_the_timing_says_it_pays(
        tmp_path, monkeypatch, quantized, at_load, folded, half):
    """MatMul weights keep DequantizeLinear (MatMulNBits) unless the model ran slower than
    float as written and faster dequantized at load; then every weight is written as the
    Cast -> Mul onnxruntime folds, and the file runs as the at-load timing did (a float16
    model's in float32, cast to float16)."""
    from ptqconv import runtime
    from ptqconv.runtime import DEQUANTIZE_AT_LOAD

    def timed(models, *args, outputs=None, **kwargs):
        if outputs is not None:  # what the summary's sample error is computed from
            outputs.update((label, [np.ones(4, np.float32)]) for label in models)
        return _timed(quantized, at_load)

    monkeypatch.setattr(runtime, "compare_latency", timed)
    model = _half(mlp()) if half else mlp()
    _, out, report = quantize(tmp_path, model, 8)
    nodes = onnx.load(str(out)).graph.node
    assert any(n.op_type == "DequantizeLinear" for n in nodes) != folded
    summary = report.weight_quant
    assert (summary.folded_for_speed == (3, quantized)) == folded
    assert ("weights dequantized at load: 3 DequantizeLinear" in report.format()) == folded
    assert report.latency.ms["quantized"] == (at_load if folded else quantized)
    if folded:  # the values the weights had: the DequantizeLinear model's, at load
        x = {"x": np.random.default_rng(0).standard_normal((2, 256)).astype(
            np.float16 if half else np.float32)}
        untimed = tmp_path / "untimed.ini"
        untimed.write_text("[weight_quant_param]\nmeasure_latency=false\n")
        _, plain, _ = quantize(tmp_path, _half(mlp()) if half else mlp(), 8, name="plain.onnx",
                               config_file=str(untimed))
        got, ops = run_optimized(out, x, tmp_path, {})
        want, _ = run_optimized(plain, x, tmp_path, DEQUANTIZE_AT_LOAD)
        # Float16 MatMuls run in float32 between Casts onnxruntime adds (no CPU kernel).
        assert not ops & {"DequantizeLinear", "MatMulNBits", "Mul", *(() if half else ("Cast",))}
        tolerance = 1e-2 if half else 1e-6
        np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32),
                                   rtol=tolerance, atol=tolerance)


@pytest.mark.timed_folding
@pytest.mark.parametrize("bits", [8, 12])
def test_gathered_tables_are_folded_with_the_weights(tmp_path, monkeypatch, bits):
    """Folded for speed, a table gathered row by row is dequantized whole by constant ops
    before its Gather (onnxruntime folds them at load), so the Gather reads float rows as in
    the float model; the rows are the ones the gathered dequantization gave, and the file is
    timed again, since the at-load timing ran the gathered rows."""
    from ptqconv import runtime
    from ptqconv.runtime import DEQUANTIZE_AT_LOAD

    calls = []

    def timed(models, *args, outputs=None, **kwargs):
        calls.append(set(models))
        if outputs is not None:
            outputs.update((label, [np.ones(4, np.float32)]) for label in models)
        return _timed(1.5, 1.0)

    monkeypatch.setattr(runtime, "compare_latency", timed)
    _, out, report = quantize(tmp_path, embedding(), bits)
    assert report.weight_quant.tables_folded == 1
    assert "and 1 embedding table dequantized whole before the Gather" in report.format()
    assert calls == [{"float", "quantized", runtime.AT_LOAD}, {"float", "quantized"}]
    table = next(n for n, a in initializers(out).items() if a.shape == (1000, 64))
    assert _consumers(out)[table] == ["Cast"]
    ids = {"ids": np.array([[0, 5, 999, 5, 17, 400, 3, 1]], np.int64)}
    untimed = tmp_path / "untimed.ini"
    untimed.write_text("[weight_quant_param]\nmeasure_latency=false\n")
    _, plain, _ = quantize(tmp_path, embedding(), bits, name="plain.onnx",
                           config_file=str(untimed))
    assert _consumers(plain)[next(n for n, a in initializers(plain).items()
                                  if a.shape == (1000, 64))] == ["Gather"]
    got, ops = run_optimized(out, ids, tmp_path, {})
    want, _ = run_optimized(plain, ids, tmp_path, DEQUANTIZE_AT_LOAD)
    assert ops <= {"Gather", "MatMul", "Gemm"}, ops
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
