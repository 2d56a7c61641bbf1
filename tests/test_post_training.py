"""PostTraining end to end: formats, methods, bits, fusion in onnxruntime, bias correction."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import run_model, scored_alike
from harness import optimized_ops
from models import (
    DIGITS,
    conv_net,
    digits_eval,
    lstm,
    mlp,
    random_samples,
    residual_cnn,
    save,
    split_concat_cnn,
    two_input_text_model,
    write_samples,
)

from ptqconv.cli import main

CONFIGS = DIGITS.parent.parent / "configs"


def convert(*args: str) -> int:
    return main(["--quantType=PostTraining", "--quiet", *args])


def digits_accuracy(path) -> tuple[float, float]:
    import json

    x = digits_eval()
    labels = np.array(json.loads((DIGITS / "eval" / "labels.json").read_text()))
    (ref,), (got,) = run_model(DIGITS / "model.onnx", {"input": x}), run_model(path, {"input": x})
    return float((got.argmax(1) == labels).mean()), float((got.argmax(1) == ref.argmax(1)).mean())


@pytest.mark.parametrize("config", ["digits.ini", "digits.yaml", "digits_flat.cfg"])
def test_each_shipped_config_format_quantizes_the_example(tmp_path, config):
    out = tmp_path / "q.onnx"
    assert (
        convert(
            f"--modelFile={DIGITS / 'model.onnx'}",
            f"--outputFile={out}",
            f"--configFile={CONFIGS / config}",
        )
        == 0
    )
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    accuracy, agreement = digits_accuracy(out)
    assert accuracy >= 0.97 and agreement >= 0.98


def ini(
    tmp_path, calibrate_path: str, method: str = "MAX_MIN", extra: str = "", bias: bool = False
) -> str:
    path = tmp_path / "c.ini"
    path.write_text(
        f"[data_preprocess_param]\ncalibrate_path={calibrate_path}\n{extra}"
        f"[full_quant_param]\nactivation_quant_method={method}\n"
        f"bias_correction={str(bias).lower()}\n"
        # The test models are too small for integer kernels to pay (latency_plan.py); these
        # tests are about the quantized graph, so every unit is quantized.
        "latency_aware=false\n"
    )
    return str(path)


def nearest(config: str) -> str:
    """`config` (from `ini`) with weights rounded to nearest at every width."""
    path = Path(config)
    path.write_text(path.read_text() + "quant_strategy=MAX_MIN\n")
    return config


@pytest.mark.parametrize("method", ["MAX_MIN", "KL", "REMOVAL_OUTLIER"])
@pytest.mark.parametrize(("bits", "min_accuracy"), [(8, 0.97), (4, 0.9)])
def test_every_method_at_8_and_4_bits_on_real_data(tmp_path, method, bits, min_accuracy):
    out = tmp_path / "q.onnx"
    config = ini(tmp_path, f"input:{DIGITS / 'calib' / 'input'}", method)
    assert (
        convert(
            f"--modelFile={DIGITS / 'model.onnx'}",
            f"--outputFile={out}",
            f"--configFile={config}",
            f"--bitNum={bits}",
        )
        == 0
    )
    accuracy, _ = digits_accuracy(out)
    assert accuracy >= min_accuracy


def test_residual_cnn_runs_as_integer_kernels_in_onnxruntime(tmp_path):
    src = save(residual_cnn(), tmp_path / "float.onnx")
    data = random_samples(tmp_path / "x", 16, seed=0)
    out = tmp_path / "q.onnx"
    assert (
        convert(
            f"--modelFile={src}",
            f"--outputFile={out}",
            f"--configFile={ini(tmp_path, f'x:{data}')}",
        )
        == 0
    )
    ops = optimized_ops(out, tmp_path)
    # Every quantized Conv became QLinearConv and every quantized Add QLinearAdd: no float
    # Conv or Add is left between Q and DQ.
    assert ops["QLinearConv"] == 5 and ops["Conv"] == 0
    assert ops["QLinearAdd"] == 2 and ops["Add"] == 0
    assert ops["QGemm"] == 1 and ops["QLinearGlobalAveragePool"] == 1
    x = np.random.default_rng(100).standard_normal((1, 3, 16, 16)).astype(np.float32)
    for level in (
        ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    ):
        (ref,), (got,) = run_model(src, {"x": x}), run_model(out, {"x": x}, level)
        cos = (ref * got).sum() / np.linalg.norm(ref) / np.linalg.norm(got)
        assert cos >= 0.99, level


def test_split_halves_run_on_uint8_into_an_integer_concat(tmp_path):
    src = save(split_concat_cnn(), tmp_path / "float.onnx")
    data = random_samples(tmp_path / "x", 16, seed=0)
    out = tmp_path / "q.onnx"
    assert convert(f"--modelFile={src}", f"--outputFile={out}",
                   f"--configFile={ini(tmp_path, f'x:{data}')}") == 0
    ops = optimized_ops(out, tmp_path)
    # The Split reads and writes uint8 (onnxruntime drops the Q/DQ around it when its
    # outputs share its input's scale) and the Concat of its halves is a QLinearConcat:
    # before, the Split stayed float and the Concat with it, between DQ and Q.
    assert ops["QLinearConv"] == 3 and ops["QLinearConcat"] == 1 and ops["Concat"] == 0
    assert ops["Split"] == 1 and ops["QuantizeLinear"] == 1 and ops["DequantizeLinear"] == 1
    x = np.random.default_rng(100).standard_normal((1, 3, 16, 16)).astype(np.float32)
    (ref,), (got,) = run_model(src, {"x": x}), run_model(out, {"x": x})
    assert (ref * got).sum() / np.linalg.norm(ref) / np.linalg.norm(got) >= 0.99


def test_constant_node_weights_at_opset_11(tmp_path):
    src = save(residual_cnn(opset=11, constant_nodes=True), tmp_path / "float.onnx")
    data = random_samples(tmp_path / "x", 8, seed=1)
    out = tmp_path / "q.onnx"
    assert (
        convert(
            f"--modelFile={src}",
            f"--outputFile={out}",
            f"--configFile={ini(tmp_path, f'x:{data}')}",
        )
        == 0
    )
    model = onnx.load(str(out))
    assert model.opset_import[0].version == 13
    assert optimized_ops(out, tmp_path)["QLinearConv"] == 5


def test_multi_input_model_with_int64_ids_flat_config(tmp_path):
    src = save(two_input_text_model(), tmp_path / "float.onnx")
    rng = np.random.default_rng(2)
    ids = write_samples(tmp_path / "ids", (rng.integers(0, 50, (1, 8)) for _ in range(10)))
    scale = write_samples(
        tmp_path / "scale", (rng.uniform(0.5, 1.5, (1, 8, 1)).astype(np.float32) for _ in range(10))
    )
    config = tmp_path / "flat.cfg"
    config.write_text(f"image_path={ids},{scale}\nbatch_count=10\nmethod_x=KL\n")
    out = tmp_path / "q.onnx"
    assert convert(f"--modelFile={src}", f"--outputFile={out}", f"--configFile={config}") == 0
    feeds = {
        "ids": rng.integers(0, 50, (1, 8)),
        "scale": rng.uniform(0.5, 1.5, (1, 8, 1)).astype(np.float32),
    }
    (ref,), (got,) = run_model(src, feeds), run_model(out, feeds)
    # Softmax output is quantized with onnxruntime's fixed step of 1/256.
    assert np.abs(ref - got).max() < 8 / 256
    assert (ref * got).sum() / np.linalg.norm(ref) / np.linalg.norm(got) >= 0.99
    model = onnx.load(str(out))
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    matmul = next(n for n in model.graph.node if n.op_type == "MatMul")
    # The flat form cannot set latency_aware: the latency check measures on this CPU whether
    # the tiny MatMul runs integer (both inputs dequantized) or float, and either way Mul and
    # Softmax have no integer producer or consumer, so they stay float without Q/DQ around them.
    if producers.get(matmul.input[1]) != "DequantizeLinear":
        assert not any(n.op_type == "QuantizeLinear" for n in model.graph.node)
    else:
        assert [producers[i] for i in matmul.input] == ["DequantizeLinear"] * 2
        assert sum(n.op_type == "QuantizeLinear" for n in model.graph.node) == 1
        assert optimized_ops(out, tmp_path)["MatMulIntegerToFloat"] == 1


def biased_rounding_model(seed: int = 5) -> onnx.ModelProto:
    """A 1x1 Conv and a Gemm whose weights all round the same way on a 3-bit grid.

    In each output channel one weight sets the range (grid step absmax/3) and the others sit
    at 1.4 steps, which rounds to 1 step: a systematic error of -0.4 step per weight that, on
    positive inputs, shifts every output channel by a constant.
    """
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)

    def biased(shape):
        step = rng.uniform(0.05, 0.2, (shape[0], 1)).astype(np.float32)
        w = np.full(shape, 1.4, np.float32).reshape(shape[0], -1) * step
        w *= np.sign(rng.uniform(-0.2, 1, w.shape)).astype(np.float32)
        w[:, 0] = 3 * step[:, 0]
        return w.reshape(shape)

    inits = [
        numpy_helper.from_array(biased((16, 8, 1, 1)), "cw"),
        numpy_helper.from_array(np.zeros(16, np.float32), "cb"),
        numpy_helper.from_array(biased((10, 16 * 4 * 4)), "fw"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "cw", "cb"], ["c"], name="conv"),
        helper.make_node("Flatten", ["c"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fw"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_bias_correction_removes_a_systematic_shift(tmp_path):
    src = save(biased_rounding_model(), tmp_path / "float.onnx")
    rng = np.random.default_rng(6)
    calib = [rng.uniform(0, 1, (1, 8, 4, 4)).astype(np.float32) for _ in range(32)]
    held_out = [rng.uniform(0, 1, (1, 8, 4, 4)).astype(np.float32) for _ in range(32)]
    data = write_samples(tmp_path / "x", calib)
    shift = {}
    for bias in (False, True):
        out = tmp_path / f"q_{bias}.onnx"
        assert (
            convert(
                f"--modelFile={src}",
                f"--outputFile={out}",
                "--bitNum=3",
                # Nearest weights: below 8 bits ptqconv would round them by GPTQ.
                f"--configFile={nearest(ini(tmp_path, f'x:{data}', bias=bias))}",
            )
            == 0
        )
        diffs = [run_model(src, {"x": s})[0] - run_model(out, {"x": s})[0] for s in held_out]
        shift[bias] = float(np.abs(np.mean(diffs, axis=0)).mean())
    # The mean error mostly goes away; the Gemm had no bias input, so correction created one.
    assert shift[True] < 0.2 * shift[False], shift
    assert any(
        i.name.startswith("fc_bias")
        for i in onnx.load(str(tmp_path / "q_True.onnx")).graph.initializer
    )


def test_skip_quant_node_keeps_nodes_float(tmp_path):
    src = save(residual_cnn(), tmp_path / "float.onnx")
    data = random_samples(tmp_path / "x", 4, seed=4)
    out = tmp_path / "q.onnx"
    assert (
        convert(
            f"--modelFile={src}",
            f"--outputFile={out}",
            "--skipQuantNode=fc,Add",
            f"--configFile={ini(tmp_path, f'x:{data}')}",
        )
        == 0
    )
    ops = optimized_ops(out, tmp_path)
    assert ops["QGemm"] == 0 and ops["QLinearAdd"] == 0
    # Convs whose output feeds only quantized nodes still run as integer kernels.
    assert ops["QLinearConv"] >= 2
    model = onnx.load(str(out))
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.op_type in ("Add", "Gemm"):  # the skipped nodes read float tensors
            assert all(producers.get(i) != "DequantizeLinear" for i in node.input[:1]), node.name
    # The grids of conv outputs that only skipped nodes read are not left behind, unused
    # (onnxruntime warned about each on every load).
    read = {i for node in model.graph.node for i in node.input}
    assert [t.name for t in model.graph.initializer if t.name not in read] == []


def test_reduce_range_spares_depthwise_convs(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(9)
    # 64 channels: the int8 weights must outweigh the Q/DQ nodes, or the float model is kept.
    inits = [
        numpy_helper.from_array(rng.standard_normal((64, 3, 3, 3)).astype(np.float32), "w0"),
        numpy_helper.from_array(rng.standard_normal((64, 1, 3, 3)).astype(np.float32), "dw"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["a"], name="conv", pads=[1] * 4),
        helper.make_node("Relu", ["a"], ["ar"], name="relu"),
        helper.make_node("Conv", ["ar", "dw"], ["y"], name="depthwise", group=64, pads=[1] * 4),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64, 8, 8])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    src = save(model, tmp_path / "float.onnx")
    data = write_samples(
        tmp_path / "x", (rng.standard_normal((1, 3, 8, 8)).astype(np.float32) for _ in range(4))
    )
    for reduce_range, gemm_max in (("true", 63), ("false", 127)):
        out = tmp_path / f"q_{reduce_range}.onnx"
        config = ini(tmp_path, f"x:{data}", extra="")
        with open(config, "a") as handle:
            handle.write(f"reduce_range={reduce_range}\n")
        assert (
            convert(
                f"--modelFile={src}",
                f"--outputFile={out}",
                f"--configFile={config}",
            )
            == 0
        )
        inits = {
            t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer
        }
        assert np.abs(inits["w0_quantized"]).max() == gemm_max
        # onnxruntime's depthwise kernel adds no int16 pairs: the full grid is kept.
        assert np.abs(inits["dw_quantized"]).max() == 127


def test_w4a8_keeps_8_bit_activations_with_4_bit_weights(tmp_path):
    errors = {}
    for name, extra in (("w4a4", ""), ("w4a8", "activation_bit_num=8\n")):
        config = tmp_path / f"{name}.ini"
        # Every weight on the 4-bit grid, its first conv's too (test_shallow_convs_...).
        config.write_text(f"[data_preprocess_param]\ncalibrate_path=input:"
                          f"{DIGITS / 'calib' / 'input'}\n[full_quant_param]\n{extra}"
                          "shallow_convs_8bit=false\n")
        out = tmp_path / f"{name}.onnx"
        assert convert(f"--modelFile={DIGITS / 'model.onnx'}", f"--outputFile={out}",
                       f"--configFile={config}", "--bitNum=4") == 0
        model = onnx.load(str(out))
        inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
        weights = [inits[n.input[0]] for n in model.graph.node
                   if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) is not None
                   and inits[n.input[0]].dtype == np.int8]
        assert weights and max(int(np.abs(w).max()) for w in weights) <= 7
        x = digits_eval()
        (ref,) = run_model(DIGITS / "model.onnx", {"input": x})
        (got,) = run_model(out, {"input": x})
        errors[name] = float(np.sqrt(np.mean(np.square(ref - got))))
    assert errors["w4a8"] < 0.7 * errors["w4a4"], errors


def _stem_depthwise_deep(path: Path, rng: np.random.Generator) -> Path:
    """A 3-channel stem, a depthwise conv and a 1x1 conv over 64 channels, with ReLUs."""
    from onnx import TensorProto, helper, numpy_helper

    weights = {"stem": (64, 3, 3, 3), "dw": (64, 1, 3, 3), "deep": (64, 64, 1, 1)}
    inits = [numpy_helper.from_array(
        (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32), name)
        for name, shape in weights.items()]
    nodes = [
        helper.make_node("Conv", ["x", "stem"], ["a"], name="stem", pads=[1] * 4),
        helper.make_node("Relu", ["a"], ["ar"]),
        helper.make_node("Conv", ["ar", "dw"], ["b"], name="dw", group=64, pads=[1] * 4),
        helper.make_node("Relu", ["b"], ["br"]),
        helper.make_node("Conv", ["br", "deep"], ["y"], name="deep"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64, 16, 16])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return save(model, path)


def test_shallow_convs_keep_8_bit_weights_below_8_bits(tmp_path):
    import ptqconv

    rng = np.random.default_rng(21)
    src = _stem_depthwise_deep(tmp_path / "float.onnx", rng)
    data = write_samples(tmp_path / "x", (rng.standard_normal((1, 3, 16, 16)).astype(np.float32)
                                          for _ in range(8)))
    x = rng.standard_normal((1, 3, 16, 16)).astype(np.float32)
    (ref,) = run_model(src, {"x": x})
    errors, lines = {}, {}
    for shallow in ("true", "false"):
        config = Path(ini(tmp_path, f"x:{data}", extra="[common_quant_param]\nbit_num=4\n"))
        config.write_text(config.read_text() + f"activation_bit_num=8\nmeasure_latency=false\n"
                          f"quant_strategy=MAX_MIN\nshallow_convs_8bit={shallow}\n")
        out = tmp_path / f"q_{shallow}.onnx"
        report = ptqconv.convert(src, out, "PostTraining", config_file=config)
        lines[shallow] = [line for line in report.format().splitlines()
                          if line.startswith("  shallow")]
        inits = {t.name: onnx.numpy_helper.to_array(t)
                 for t in onnx.load(str(out)).graph.initializer}
        levels = {name: int(np.abs(inits[f"{name}_quantized"]).max())
                  for name in ("stem", "dw", "deep")}
        # 64 input channels: the 1x1 conv keeps the 4 bits asked; 27 and 9 values per
        # output channel do not average rounding errors out.
        assert levels == ({"stem": 127, "dw": 127, "deep": 7} if shallow == "true"
                          else {"stem": 7, "dw": 7, "deep": 7}), levels
        (got,) = run_model(out, {"x": x})
        errors[shallow] = float(np.sqrt(np.mean(np.square(ref - got))))
    assert errors["true"] < 0.7 * errors["false"], errors
    assert lines["true"] == [
        "  shallow convs in 8 bits: 2 (at most 32 weights per output channel: depthwise convs, "
        "image stems, convs over few channels; shallow_convs_8bit=false gives them 4)"]
    assert lines["false"] == []


@pytest.mark.parametrize("extra, line", [
    ("", "  activations: 4-bit (activation_bit_num follows bit_num; activation_bit_num=8 keeps "
         "8-bit ones)\n"),
    ("activation_bit_num=8\n", "  activations: 8-bit\n"),
])
def test_the_summary_says_what_width_the_activations_take(tmp_path, extra, line):
    import ptqconv

    config = tmp_path / "c.ini"
    config.write_text(f"[common_quant_param]\nbit_num=4\n[data_preprocess_param]\n"
                      f"calibrate_path=input:{DIGITS / 'calib' / 'input'}\ncalibrate_size=8\n"
                      "[full_quant_param]\nactivation_quant_method=MAX_MIN\n"
                      f"measure_latency=false\n{extra}")
    report = ptqconv.convert(DIGITS / "model.onnx", tmp_path / "q.onnx", "PostTraining",
                             config_file=config)
    assert line in report.format()


@pytest.mark.parametrize("layers, hidden, heads, ffn, seq",
                         [(2, 128, 2, 256, 16), (3, 256, 4, 1024, 32)])
def test_attention_blocks_convert_and_fuse(tmp_path, layers, hidden, heads, ffn, seq):
    """BERT-like encoders. onnxruntime's basic MatMulAddFusion used to leave a simplified model
    that onnxruntime itself failed to load ("Attempt to replace the existing tensor"); then the
    quantized 3-layer one failed to load with default session options, because fusing it
    again generated names the simplification had used. Every MatMul with a bias must end up
    an integer kernel: a float bias left MatMul + Add as a float Gemm between DequantizeLinear."""
    import sys

    sys.path.insert(0, str(DIGITS.parent.parent))
    from bench.models import bert, normal_samples

    src = bert(tmp_path / "bert.onnx", layers=layers, hidden=hidden, heads=heads, ffn=ffn,
               seq=seq)
    data = normal_samples(tmp_path / "hidden", 4, (1, seq, hidden))
    out = tmp_path / "q.onnx"
    assert convert(f"--modelFile={src}", f"--outputFile={out}",
                   f"--configFile={ini(tmp_path, f'hidden:{data}')}") == 0
    ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])  # default options
    ops = optimized_ops(out, tmp_path)
    assert ops["QLinearMatMul"] >= 2 * layers and ops["QLinearSoftmax"] == layers
    # Per layer: Q, K, V, output projection and two FFN MatMuls, all with biases.
    assert ops["QGemm"] + ops["MatMulIntegerToFloat"] + ops["QLinearMatMul"] >= 6 * layers
    assert ops["Gemm"] == ops["MatMul"] == ops["DequantizeLinear"] == 0, ops


def test_a_model_whose_only_quantized_activation_is_its_input(tmp_path):
    # MatMul + Add with a float output: calibration observes the model input alone.
    rng = np.random.default_rng(0)
    w = onnx.numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "w")
    b = onnx.numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["m"]),
         onnx.helper.make_node("Add", ["m", "b"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4, 16])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4, 8])], [w, b])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    src = save(model, tmp_path / "float.onnx")
    samples = [rng.standard_normal((1, 4, 16)).astype(np.float32) for _ in range(4)]
    data = write_samples(tmp_path / "x", samples)
    out = tmp_path / "q.onnx"
    assert convert(f"--modelFile={src}", f"--outputFile={out}",
                   f"--configFile={ini(tmp_path, f'x:{data}')}") == 0
    (ref,), (got,) = run_model(src, {"x": samples[0]}), run_model(out, {"x": samples[0]})
    assert np.abs(ref - got).max() < 0.05 * np.abs(ref).max()


def test_float16_model_gets_int8_weights(tmp_path):
    """onnxruntime's simplification computes float16 models in float32 behind a Cast per
    weight; folded, those weights are quantized per channel like any float32 weight."""
    from test_weight_quant import float16_mlp

    src = tmp_path / "fp16.onnx"
    onnx.save(float16_mlp(), src)
    rng = np.random.default_rng(2)
    data = tmp_path / "x"
    data.mkdir()
    for i in range(8):
        rng.standard_normal((4, 64)).astype(np.float16).tofile(data / f"{i:06d}.bin")
    out = tmp_path / "q.onnx"
    assert convert(f"--modelFile={src}", f"--outputFile={out}",
                   f"--configFile={ini(tmp_path, f'x:{data}')}") == 0
    model = onnx.load(str(out))
    weights = [t.name for t in model.graph.initializer
               if t.data_type == onnx.TensorProto.INT8 and t.name.endswith("_quantized")]
    assert sorted(weights) == ["w1_quantized", "w2_quantized"]
    assert not [n for n in model.graph.node
                if n.op_type == "Cast" and n.input[0] in ("w1", "w2")]
    assert [o.domain for o in model.opset_import] == [""]  # no domains left unused
    x = {"x": rng.standard_normal((4, 64)).astype(np.float16)}
    ref = run_model(src, x)[0].astype(np.float64)
    got = run_model(out, x)[0]
    assert got.dtype == np.float16
    assert 10 * np.log10(np.sum(ref**2) / np.sum((got - ref) ** 2)) > 25


def test_kl_histograms_sample_big_tensors_unless_told_to_bin_every_value(tmp_path):
    """200 samples: the 128-channel activations go over the per-sample budget and are
    sampled; histogram_sampling=false bins every value. Both models stay close to float."""
    import ptqconv
    from ptqconv.calibrate.observers import histogram_values

    model = save(conv_net(channels=128), tmp_path / "m.onnx")
    calib = random_samples(tmp_path / "calib", 200, seed=1)
    x = np.random.default_rng(2).standard_normal((1, 3, 16, 16)).astype(np.float32)
    (ref,) = run_model(model, {"x": x})
    reports = {}
    for sampling in ("true", "false"):
        cfg = tmp_path / f"{sampling}.ini"
        cfg.write_text(f"[data_preprocess_param]\ncalibrate_path=x:{calib}\ncalibrate_size=200\n"
                       f"[full_quant_param]\nactivation_quant_method=KL\n"
                       # Every unit quantized, whatever the CPU: on x86_avx2 the latency plan
                       # keeps the ConvTranspose, most of the weights, float.
                       f"histogram_sampling={sampling}\nmeasure_latency=false\n"
                       "latency_aware=false\n")
        out = tmp_path / f"{sampling}.onnx"
        reports[sampling] = ptqconv.convert(model, out, "PostTraining", config_file=str(cfg))
        assert not reports[sampling].kept_input  # the quantized model was written
        (got,) = run_model(out, {"x": x})
        assert np.sum((got - ref) ** 2) / np.sum(ref**2) < 1e-3
    assert histogram_values(200) == 20972 < 128 * 16 * 16
    assert reports["true"].post_training.histogram_values == 20972
    assert reports["false"].post_training.histogram_values == 0
    # relu0's output (128 x 16 x 16) and relu1's (128 x 32 x 32) are over the budget.
    assert reports["true"].post_training.histogram_sampled == 2
    assert reports["false"].post_training.histogram_sampled == 0
    assert "histograms of 2 tensors from at most 20,972 of their values" in (
        reports["true"].format())
    assert "histograms of" not in reports["false"].format()


def _causal_attention(mask_value: float, tokens: int = 16, width: int = 32) -> onnx.ModelProto:
    """x [1, T, D] -> one attention head whose scores get a causal mask constant (`mask_value`
    above the diagonal: -inf in CLIP's and Hugging Face's exports, float32's min in others)
    -> Softmax -> output projection."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(
        (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32), name)
        for name in ("wq", "wk", "wv", "wo")]
    mask = np.triu(np.full((tokens, tokens), mask_value, np.float32), 1)
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["q"]),
             helper.make_node("MatMul", ["x", "wk"], ["k"]),
             helper.make_node("MatMul", ["x", "wv"], ["v"]),
             helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["q", "kt"], ["scores"]),
             helper.make_node("Add", ["scores", "mask"], ["masked"]),
             helper.make_node("Softmax", ["masked"], ["p"], axis=-1),
             helper.make_node("MatMul", ["p", "v"], ["a"]),
             helper.make_node("MatMul", ["a", "wo"], ["y"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, tokens, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, tokens, width])],
        [*weights, numpy_helper.from_array(mask, "mask")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("mask_value", [-np.inf, float(np.finfo(np.float32).min)])
@pytest.mark.parametrize("method", ["", "MAX_MIN", "KL", "MSE", "REMOVAL_OUTLIER"])
def test_a_causal_mask_of_infinities_stays_float_and_the_rest_is_quantized(
        tmp_path, capsys, mask_value, method):
    """The masked scores hold -inf (or float32's min) above the diagonal: every method
    (AUTO among them) keeps that tensor float, as a mask, and quantizes the rest, with no
    warning on the way."""
    import warnings

    model = save(_causal_attention(mask_value), tmp_path / "m.onnx")
    random_samples(tmp_path / "calib", 8, 0, (1, 16, 32))
    (tmp_path / "c.ini").write_text(
        f"[data_preprocess_param]\ncalibrate_path=x:{tmp_path / 'calib'}\ncalibrate_size=8\n"
        "[full_quant_param]\nlatency_aware=false\n"
        + (f"activation_quant_method={method}\n" if method else ""))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        status = main([f"--modelFile={model}", f"--outputFile={tmp_path / 'q.onnx'}",
                       "--quantType=PostTraining", f"--configFile={tmp_path / 'c.ini'}"])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert "Warning" not in err
    assert "kept float (mask-like range beyond 1e+15): masked" in out
    q = onnx.load(str(tmp_path / "q.onnx"))
    quantized = {n.input[0] for n in q.graph.node if n.op_type == "QuantizeLinear"}
    assert "masked" not in quantized and "x" in quantized
    x = np.random.default_rng(1).standard_normal((1, 16, 32)).astype(np.float32)
    (ref,), (got,) = run_model(model, {"x": x}), run_model(tmp_path / "q.onnx", {"x": x})
    assert np.isfinite(got).all()
    assert float(ref.ravel() @ got.ravel() / np.linalg.norm(ref) / np.linalg.norm(got)) > 0.99


def _detector_with_nms(size: int = 16) -> onnx.ModelProto:
    """x [1, 3, S, S] -> Conv -> Sigmoid: one score per position of a grid of disjoint anchor
    boxes -> NonMaxSuppression (score threshold 0.5) -> the kept boxes, [K, 4]: K depends on
    the data, and on the rounding of scores near 0.5."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    count = size * size
    row, col = np.divmod(np.arange(count, dtype=np.float32), size)
    anchors = np.stack([row, col, row + 0.5, col + 0.5], axis=-1)
    inits = [numpy_helper.from_array((rng.standard_normal((1, 3, 3, 3)) / 3).astype(np.float32),
                                     "w"),
             numpy_helper.from_array(anchors[None], "anchors"),
             numpy_helper.from_array(anchors, "anchor_rows"),
             numpy_helper.from_array(np.array([1, 1, count], np.int64), "score_shape"),
             numpy_helper.from_array(np.array([count], np.int64), "max_out"),
             numpy_helper.from_array(np.array([0.5], np.float32), "iou"),
             numpy_helper.from_array(np.array([0.5], np.float32), "threshold"),
             numpy_helper.from_array(np.array([2], np.int64), "box_column")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["logits"], pads=[1, 1, 1, 1]),
             helper.make_node("Sigmoid", ["logits"], ["prob"]),
             helper.make_node("Reshape", ["prob", "score_shape"], ["scores"]),
             helper.make_node("NonMaxSuppression",
                              ["anchors", "scores", "max_out", "iou", "threshold"], ["selected"]),
             helper.make_node("Gather", ["selected", "box_column"], ["which"], axis=1),
             helper.make_node("Squeeze", ["which", "box_column_axis"], ["index"]),
             helper.make_node("Gather", ["anchor_rows", "index"], ["boxes"], axis=0)]
    inits.append(numpy_helper.from_array(np.array([1], np.int64), "box_column_axis"))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 1, count]),
         helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["K", 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _detector_with_top_k(size: int = 16) -> onnx.ModelProto:
    """_detector_with_nms's scores, ranked by TopK: the best scores (values), their indices
    and their boxes (gathered by index). Scores rounded to 8 bits tie where float's differ,
    so indices and boxes change order."""
    from onnx import TensorProto, helper, numpy_helper

    proto = _detector_with_nms(size)
    count = size * size
    graph = proto.graph
    del graph.node[3:]  # from NonMaxSuppression on
    del graph.output[1:]
    graph.node.extend([
        helper.make_node("Reshape", ["scores", "flat"], ["flat_scores"]),
        helper.make_node("TopK", ["flat_scores", "k"], ["best", "index"]),
        helper.make_node("Gather", ["anchor_rows", "index"], ["boxes"], axis=0)])
    graph.initializer.extend([numpy_helper.from_array(np.array([count], np.int64), "flat"),
                              numpy_helper.from_array(np.array([count], np.int64), "k")])
    del graph.output[0]
    graph.output.extend([helper.make_tensor_value_info("best", TensorProto.FLOAT, [count]),
                         helper.make_tensor_value_info("index", TensorProto.INT64, [count]),
                         helper.make_tensor_value_info("boxes", TensorProto.FLOAT,
                                                       [count, 4])])
    return proto


def test_outputs_picked_by_top_k_indices_are_not_scored(tmp_path, capsys):
    """AUTO scores a model whose outputs include TopK's indices and what they gather on its
    other outputs: indices that swap between near-equal scores are no measure of error."""
    model = save(_detector_with_top_k(), tmp_path / "m.onnx")
    random_samples(tmp_path / "calib", 16, 0, (1, 3, 16, 16))
    (tmp_path / "c.ini").write_text(
        f"[data_preprocess_param]\ncalibrate_path=x:{tmp_path / 'calib'}\ncalibrate_size=16\n"
        f"[full_quant_param]\nlatency_aware=false\n")
    status = main([f"--modelFile={model}", f"--outputFile={tmp_path / 'q.onnx'}",
                   "--quantType=PostTraining", f"--configFile={tmp_path / 'c.ini'}"])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert "chosen by measurement" in out
    assert "warning: the chosen model's output error" not in out, out
    x = np.fromfile(sorted((tmp_path / "calib").iterdir())[0], np.float32).reshape(1, 3, 16, 16)
    ref, got = run_model(model, {"x": x}), run_model(tmp_path / "q.onnx", {"x": x})
    assert (ref[1] != got[1]).any(), "the test needs indices that change"
    assert np.abs(ref[0] - got[0]).max() < 0.05


def test_a_detector_whose_kept_boxes_change_in_number_is_scored_and_gated(tmp_path, capsys):
    """AUTO scores its candidates, and the accuracy gate compares, outputs whose shape
    depends on the data: a sample where quantization kept another number of boxes counts
    as unrelated values, and the gate says on how many samples that happened."""
    model = save(_detector_with_nms(), tmp_path / "m.onnx")
    random_samples(tmp_path / "calib", 16, 0, (1, 3, 16, 16))
    random_samples(tmp_path / "eval", 8, 1, (1, 3, 16, 16))
    (tmp_path / "c.ini").write_text(
        f"[data_preprocess_param]\ncalibrate_path=x:{tmp_path / 'calib'}\ncalibrate_size=16\n"
        f"[full_quant_param]\nlatency_aware=false\n"
        f"[evaluate_param]\neval_path=x:{tmp_path / 'eval'}\n")
    status = main([f"--modelFile={model}", f"--outputFile={tmp_path / 'q.onnx'}",
                   "--quantType=PostTraining", f"--configFile={tmp_path / 'c.ini'}",
                   "--accuracyThreshold=100"])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert "chosen by measurement" in out
    # Scored on the scores before NonMaxSuppression, not on what it kept: a few boxes more
    # or fewer do not make the chosen model look unusable.
    assert "warning: the chosen model's output error" not in out, out
    x = [np.fromfile(p, np.float32).reshape(1, 3, 16, 16)
         for p in sorted((tmp_path / "eval").iterdir())]
    changed = sum(run_model(model, {"x": s})[1].shape != run_model(tmp_path / "q.onnx",
                                                                     {"x": s})[1].shape
                  for s in x)
    assert changed, "the test needs a sample whose number of kept boxes changes"
    assert f"shape differs from float's on {changed} of 8 samples" in out


def test_the_summary_counts_recurrent_weights_left_float(tmp_path, capsys):
    """onnxruntime has no static int8 LSTM: its W and R stay float, and the summary says
    so instead of only counting the units it quantized."""
    model = save(lstm(), tmp_path / "m.onnx")
    random_samples(tmp_path / "calib", 8, 0, (10, 1, 16))
    (tmp_path / "c.ini").write_text(
        f"[data_preprocess_param]\ncalibrate_path=x:{tmp_path / 'calib'}\n"
        "[full_quant_param]\nactivation_quant_method=MAX_MIN\nmeasure_latency=false\n")
    status = main([f"--modelFile={model}", f"--outputFile={tmp_path / 'q.onnx'}",
                   "--quantType=PostTraining", f"--configFile={tmp_path / 'c.ini'}"])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert "  LSTM/GRU/RNN weights kept float: 2 (onnxruntime has no static int8" in out, out


def _auto_with_dynamic_timed(tmp_path, monkeypatch, model, shape, dynamic_ms: float,
                             extra: str = ""):
    """AUTO on `model`, every timing faked (never time in a test): float 10 ms, the static
    model 8 ms, DynamicQuant's `dynamic_ms`. The summary and the written model."""
    from ptqconv import runtime
    from ptqconv.runtime import Latency

    def compare(models, feeds, threads=0, budget_s=0.0, session_config=None, outputs=None):
        ms = {"float": 10.0, "dynamic": dynamic_ms}
        return Latency({label: ms.get(label, 8.0) for label in models}, 40, 2, "a test CPU",
                       {label: (ms.get(label, 8.0),) * 40 for label in models})

    monkeypatch.setattr(runtime, "compare_latency", compare)
    src = save(model, tmp_path / "m.onnx")
    # Samples of scales 1/30 to 30: a static range spans them all, run-time ones fit each.
    rng = np.random.default_rng(0)
    write_samples(tmp_path / "calib", (
        (rng.standard_normal(shape) * 30.0 ** rng.uniform(-1, 1)).astype(np.float32)
        for _ in range(16)))
    (tmp_path / "c.ini").write_text(
        f"[data_preprocess_param]\ncalibrate_path=x:{tmp_path / 'calib'}\n"
        f"[full_quant_param]\n{extra}")
    out = tmp_path / "q.onnx"
    status = main([f"--modelFile={src}", f"--outputFile={out}", "--quantType=PostTraining",
                   f"--configFile={tmp_path / 'c.ini'}"])
    return status, out


@pytest.mark.parametrize(("dynamic_ms", "tie", "why"), [
    (5.0, False, ""), (9.0, False, "slower than the static model"),
    (5.0, True, ""), (7.9, True, "not faster: not faster by 5% on the medians")])
def test_auto_writes_dynamic_quantization_where_it_measures_better(tmp_path, capsys,
                                                                   monkeypatch, dynamic_ms,
                                                                   tie, why):
    """A model of MatMul weights: DynamicQuant's model is scored on AUTO's held-out samples
    and timed against the static one. More accurate (run-time ranges fit each sample of
    scales 1/30 to 30), it is written unless slower; as accurate, only when faster."""
    if tie:
        scored_alike(monkeypatch, 0.001)
    # 128 rows a sample: GEMMs the cost model quantizes.
    status, out = _auto_with_dynamic_timed(tmp_path, monkeypatch, mlp((64, 256, 256, 16)),
                                           (128, 64), dynamic_ms)
    text, err = capsys.readouterr()
    assert status == 0, err
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert ("DynamicQuantizeMatMul" in ops or "MatMulInteger" in ops) == (not why), ops
    line = next(x for x in text.splitlines() if x.startswith("  dynamic quantization"))
    errors = line.split("held-out error ")[1].split(",")[0].split(" against the static "
                                                                  "model's ")
    assert (float(errors[0]) < float(errors[1])) == (not tie), line
    ratios = f"{dynamic_ms / 10:.2f}x float against 0.80x"
    if not why:
        assert " written instead: held-out error " in line and ratios in line
        assert f"latency: {dynamic_ms:.3f} ms" in text
    else:
        assert line.startswith("  dynamic quantization tried: held-out error ")
        assert line.endswith(f": kept the static model ({why})"), line
        assert "QuantizeLinear" in ops


@pytest.mark.parametrize("first_only", [True, False])
def test_dynamic_quantizations_higher_error_on_one_held_out_sample_is_a_tie(
        tmp_path, capsys, monkeypatch, first_only):
    """DynamicQuant's model scores worse than the static one on the first held-out sample
    only, or on every sample: the first is a tie (AUTO's rule), so the faster dynamic model
    is written; the second refuses it without a timing."""
    dynamic_ops = {"DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul"}

    def error(model):
        return 0.1 if dynamic_ops & {n.op_type for n in model.graph} else None

    scored_alike(monkeypatch, 0.001, error)
    if not first_only:
        from ptqconv.post_training import PostTraining

        scored = PostTraining.held_out_errors

        def everywhere(self, model):
            found = scored(self, model)
            if error(model) is None:
                return found
            return [type(e)({k: np.full_like(v, 0.1) for k, v in e.noise.items()}, e.signal)
                    for e in found]

        monkeypatch.setattr(PostTraining, "held_out_errors", everywhere)
    status, out = _auto_with_dynamic_timed(tmp_path, monkeypatch, mlp((64, 256, 256, 16)),
                                           (128, 64), 5.0)
    text, err = capsys.readouterr()
    assert status == 0, err
    line = next(x for x in text.splitlines() if x.startswith("  dynamic quantization"))
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    if first_only:
        assert re.search(r" written instead: held-out error 0\.\d+ against the static model's "
                         r"0\.001 \(the lower rests on one held-out sample: a tie\), 0\.50x "
                         r"float against 0\.80x", line), line
        assert dynamic_ops & ops, ops
    else:
        assert line == ("  dynamic quantization tried: held-out error 0.1 against the static "
                        "model's 0.001: kept the static model (more held-out error)"), line
        assert "QuantizeLinear" in ops


@pytest.mark.parametrize("extra", ["dynamic_candidate=false\n", "per_channel=false\n",
                                   "embedding_quant=false\n"])
def test_dynamic_candidate_false_keeps_the_static_model(tmp_path, capsys, monkeypatch, extra):
    """So do settings DynamicQuant's model would not keep (a sweep: written with per-channel
    weights and int8 tables over per_channel=false / embedding_quant=false, unsaid)."""
    status, out = _auto_with_dynamic_timed(tmp_path, monkeypatch, mlp((64, 256, 256, 16)),
                                           (128, 64), 5.0, extra)
    text = capsys.readouterr().out
    assert status == 0, text
    assert "dynamic quantization" not in text
    assert "QuantizeLinear" in {n.op_type for n in onnx.load(str(out)).graph.node}


def test_auto_does_not_try_dynamic_quantization_on_a_convolutional_model(tmp_path, capsys,
                                                                         monkeypatch):
    status, _ = _auto_with_dynamic_timed(tmp_path, monkeypatch, conv_net(),
                                         (1, 3, 16, 16), 1.0)
    text = capsys.readouterr().out
    assert status == 0, text
    assert "dynamic quantization" not in text


@pytest.mark.parametrize("gptq_worse", [False, True])
def test_w4a8_rounds_weights_by_gptq_where_the_held_out_samples_score_it_better(
        tmp_path, monkeypatch, gptq_worse):
    from conftest import initializers

    import ptqconv
    from ptqconv.post_training import PostTraining

    if gptq_worse:  # GPTQ's model scored worse than the chosen candidate's nearest weights
        monkeypatch.setattr(PostTraining, "held_out_error", lambda self, model: 1e9)
    data = f"input:{DIGITS / 'calib' / 'input'}"

    def config(name: str, extra: str = "") -> str:
        path = tmp_path / f"{name}.ini"
        path.write_text(f"[common_quant_param]\nbit_num=4\n[data_preprocess_param]\n"
                        f"calibrate_path={data}\n[full_quant_param]\nactivation_bit_num=8\n"
                        f"measure_latency=false\n{extra}")
        return str(path)

    out = tmp_path / "auto.onnx"
    report = ptqconv.convert(str(DIGITS / "model.onnx"), str(out), "PostTraining",
                             config_file=config("auto"))
    gptq = report.post_training.gptq
    assert gptq.by_default and gptq.errors is not None and gptq.kept == (not gptq_worse)
    chosen = next(m.error for m in report.post_training.measured
                  if m.choice == report.post_training.chosen)
    assert gptq.errors[1] == chosen
    line = next(x for x in report.format().splitlines() if "GPTQ" in x)
    assert line.startswith("  GPTQ left out" if gptq_worse else "  GPTQ: 5 layers")
    assert "against nearest weights'" in line and "ptqconv's default with calibration data" in line
    # Nearest weights written where GPTQ lost: the model of quant_strategy=MAX_MIN.
    plain = tmp_path / "nearest.onnx"
    ptqconv.convert(str(DIGITS / "model.onnx"), str(plain), "PostTraining",
                    config_file=config("nearest", "quant_strategy=MAX_MIN\n"))
    a, b = initializers(out), initializers(plain)
    same = a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert same == gptq_worse
    if not gptq_worse:  # both agree with float on every eval digit (held-out 3.3e-4 / 1.2e-3)
        assert digits_accuracy(out)[1] >= digits_accuracy(plain)[1]


def test_a_model_is_scored_on_the_held_out_samples_once(monkeypatch):
    # The latency check and the dynamic candidate may both ask for the written model's
    # held-out error: the second asking reuses the first figure.
    import weakref
    from types import SimpleNamespace

    import onnx_ir as ir

    import ptqconv.post_training as post_training
    from ptqconv.post_training import PostTraining

    runs = []
    real = post_training._output_error

    def counted(model, *args):
        runs.append(model)
        return real(model, *args)

    monkeypatch.setattr(post_training, "_output_error", counted)
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((1, 8)).astype(np.float32)} for _ in range(3)]
    float_model = mlp((8, 16, 4))
    session = ort.InferenceSession(float_model.SerializeToString())
    output = session.get_outputs()[0].name
    references = {output: {i: session.run(None, f)[0] for i, f in enumerate(feeds)}}
    pt = PostTraining.__new__(PostTraining)
    pt.settings = SimpleNamespace(threads=1)
    pt.scoring = (references, {0: [0, 1, 2]}, {0: feeds})
    pt._held_out = weakref.WeakKeyDictionary()
    model, other = ir.serde.deserialize_model(float_model), ir.serde.deserialize_model(float_model)
    first = pt.held_out_error(model)
    assert first == pytest.approx(0.0, abs=1e-12)
    assert pt.held_out_error(model) == first and runs == [model]
    pt.held_out_error(other)
    assert runs == [model, other]


def test_a_gemm_and_relu_before_float_ops_run_as_one_integer_gemm(tmp_path):
    # Gemm -> Relu -> Einsum (no integer kernel): a float-output Gemm would be fused with the
    # Relu into a float FusedGemm that dequantizes its weight every run; quantized after the
    # Relu it is a QGemm, the Relu dropped.
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.standard_normal((32, 64)) / 8).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["g"], transB=1),
         helper.make_node("Relu", ["g"], ["r"]),
         helper.make_node("Einsum", ["r", "r"], ["y"], equation="bi,bi->b")],
        "gemm_relu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])], [w, b])
    src = save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]),
               tmp_path / "m.onnx")
    data = random_samples(tmp_path / "x", 8, seed=0, shape=(1, 64))
    config = tmp_path / "c.ini"
    config.write_text(f"[data_preprocess_param]\ncalibrate_path=x:{data}\n"
                      "[full_quant_param]\nactivation_quant_method=MAX_MIN\n"
                      "latency_aware=false\nmeasure_latency=false\n")
    out = tmp_path / "q.onnx"
    assert convert(f"--modelFile={src}", f"--outputFile={out}", f"--configFile={config}") == 0
    ops = optimized_ops(out, tmp_path)
    assert ops["QGemm"] == 1 and ops["FusedGemm"] == 0 and ops["Relu"] == 0
    feeds = [{"x": np.fromfile(p, np.float32).reshape(1, 64)} for p in sorted(data.iterdir())]
    want = np.concatenate([run_model(src, f)[0] for f in feeds])
    got = np.concatenate([run_model(out, f)[0] for f in feeds])
    assert np.abs(got - want).max() <= 0.02 * np.abs(want).max()


def _quantized(tmp_path, model: onnx.ModelProto, samples: list[np.ndarray]) -> tuple:
    """`model` saved, calibrated on `samples` (input x) with `ini`'s settings, quantized:
    the float and quantized models' paths."""
    src = tmp_path / "m.onnx"
    onnx.save(model, src)  # outputs of unknown shape: onnx's full check would refuse them
    data = write_samples(tmp_path / "x", samples)
    out = tmp_path / "q.onnx"
    assert convert(f"--modelFile={src}", f"--outputFile={out}",
                   f"--configFile={ini(tmp_path, f'x:{data}')}") == 0
    return src, out


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.parametrize("group", [1, 4])
def test_grouped_conv_transpose_gets_a_bias_scale_per_output_channel(tmp_path, group):
    """A ConvTranspose weight [C, M/g, k, k] has a scale per output of a group (axis 1);
    output channel o is output o mod M/g of its group, so the int32 bias takes the scales
    tiled over the groups (a sweep's group-4 decoder failed with a broadcast error)."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((16, 16 // group, 3, 3)) * 0.2).astype(np.float32)
    b = (rng.standard_normal(16) * 0.1).astype(np.float32)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("ConvTranspose", ["x", "w", "b"], ["t"], group=group,
                               strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1]),
         onnx.helper.make_node("Relu", ["t"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 16, 8, 8])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(w, "w"), onnx.numpy_helper.from_array(b, "b")])
    samples = [np.abs(rng.standard_normal((1, 16, 8, 8))).astype(np.float32) for _ in range(8)]
    src, out = _quantized(tmp_path, onnx.helper.make_model(
        graph, opset_imports=[onnx.helper.make_opsetid("", 13)]), samples)
    model = onnx.load(str(out))
    scales = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    assert scales["w_scale"].shape == (16 // group,) and scales["b_scale"].shape == (16,)
    assert np.allclose(scales["b_scale"] / np.tile(scales["w_scale"], group),
                       scales["b_scale"][0] / scales["w_scale"][0], rtol=1e-6)
    (ref,), (got,) = run_model(src, {"x": samples[0]}), run_model(out, {"x": samples[0]})
    assert _cosine(ref, got) > 0.999


def test_an_input_passed_straight_through_as_an_output_keeps_its_name(tmp_path):
    """A graph input that is also a graph output (and quantized for the Conv reading it)
    stays the model's input: renamed as a quantized output, the model lost its input."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((8, 3, 3, 3)) * 0.2).astype(np.float32)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
         onnx.helper.make_node("Relu", ["c"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None),
         onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
        [onnx.numpy_helper.from_array(w, "w")])
    samples = [rng.standard_normal((1, 3, 8, 8)).astype(np.float32) for _ in range(8)]
    _, out = _quantized(tmp_path, onnx.helper.make_model(
        graph, opset_imports=[onnx.helper.make_opsetid("", 13)]), samples)
    model = onnx.load(str(out))
    assert [i.name for i in model.graph.input] == ["x"]
    assert [o.name for o in model.graph.output] == ["y", "x"]
    assert "QuantizeLinear" in {n.op_type for n in model.graph.node}
    _, x = run_model(out, {"x": samples[0]})
    assert np.array_equal(x, samples[0])


def _conv_relu(w: np.ndarray, b: np.ndarray) -> onnx.ModelProto:
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
         onnx.helper.make_node("Relu", ["c"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4, 8, 8])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(w, "w"), onnx.numpy_helper.from_array(b, "b")])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])


def test_pruned_channels_keep_their_bias(tmp_path):
    """Pruned output channels (all-zero weights) borrow a scale that holds their bias: they
    had the floor's 1e-10, and their int32 biases saturated (output cosine 0.72)."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((8, 4, 3, 3)) * 0.2).astype(np.float32)
    w[[1, 5]] = 0.0
    b = rng.uniform(0.5, 2.0, 8).astype(np.float32)
    samples = [rng.standard_normal((1, 4, 8, 8)).astype(np.float32) for _ in range(8)]
    src, out = _quantized(tmp_path, _conv_relu(w, b), samples)
    model = onnx.load(str(out))
    biases = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    assert np.abs(biases["b_quantized"]).max() < 2**31 - 1  # none saturated
    probe = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    (ref,), (got,) = run_model(src, {"x": probe}), run_model(out, {"x": probe})
    assert _cosine(ref, got) > 0.999, _cosine(ref, got)


def test_a_layer_reading_a_constant_input_keeps_its_bias(tmp_path, capsys):
    """An input that is zero in every calibration sample (a streaming model's first state)
    has a floor-sized scale: input x weight scale was too fine for the int32 bias, which
    saturated (output cosine 0.93 on the calibration data itself). The weight scale is
    raised until the bias holds, as onnxruntime's quantizer does."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((8, 4, 3, 3)) * 0.2).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    zeros = np.zeros((1, 4, 8, 8), np.float32)
    src, out = tmp_path / "m.onnx", tmp_path / "q.onnx"
    onnx.save(_conv_relu(w, b), src)
    data = write_samples(tmp_path / "x", [zeros] * 8)
    assert main(["--quantType=PostTraining", f"--modelFile={src}", f"--outputFile={out}",
                 f"--configFile={ini(tmp_path, f'x:{data}')}"]) == 0
    assert "weight scales raised so that the int32 bias holds: 1" in capsys.readouterr().out
    biases = {t.name: onnx.numpy_helper.to_array(t)
              for t in onnx.load(str(out)).graph.initializer}
    assert np.abs(biases["b_quantized"]).max() < 2**31 - 1  # none saturated
    (ref,), (got,) = run_model(src, {"x": zeros}), run_model(out, {"x": zeros})
    assert np.allclose(got, ref, atol=0.02 * np.abs(ref).max()), np.abs(got - ref).max()


def test_a_weight_that_is_also_a_model_output_stays_one(tmp_path):
    """Quantizing a Conv weight dropped its float initializer even where the graph outputs
    it: an invalid model ("Graph output (w) does not exist")."""
    rng = np.random.default_rng(0)
    model = _conv_relu((rng.standard_normal((8, 4, 3, 3)) * 0.2).astype(np.float32),
                       rng.uniform(0.5, 2.0, 8).astype(np.float32))
    model.graph.output.append(onnx.helper.make_tensor_value_info(
        "w", onnx.TensorProto.FLOAT, [8, 4, 3, 3]))
    samples = [rng.standard_normal((1, 4, 8, 8)).astype(np.float32) for _ in range(8)]
    src, out = _quantized(tmp_path, model, samples)
    written = onnx.load(str(out))
    onnx.checker.check_model(written, full_check=True)
    assert "w_quantized" in {t.name for t in written.graph.initializer}
    x = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    assert np.array_equal(run_model(out, {"x": x})[1], run_model(src, {"x": x})[1])


@pytest.mark.parametrize("skip", ["fc1", "MatMul", "fc1/MatMulAddFusion"])
def test_skip_quant_node_names_a_matmul_onnxruntime_fused_with_its_bias(tmp_path, capsys,
                                                                         skip):
    """onnxruntime's simplification fuses MatMul + bias Add into a Gemm named
    "fc1/MatMulAddFusion": the MatMul's own name, its op type and the fused name (printed by
    --sensitivity) all keep it float; the first two were ignored and the third refused."""
    rng = np.random.default_rng(0)
    h = onnx.helper
    graph = h.make_graph(
        [h.make_node("MatMul", ["x", "w1"], ["m1"], name="fc1"),
         h.make_node("Add", ["m1", "b1"], ["a1"], name="fc1_bias"),
         h.make_node("Relu", ["a1"], ["r"]),
         h.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")], "g",
        [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4, 64])],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4, 64])],
        [onnx.numpy_helper.from_array((rng.standard_normal((64, 64)) / 8).astype(np.float32),
                                      n) for n in ("w1", "w2")]
        + [onnx.numpy_helper.from_array(rng.standard_normal(64).astype(np.float32), "b1")])
    src = tmp_path / "m.onnx"
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 13)]), src)
    data = write_samples(tmp_path / "x", [rng.standard_normal((4, 64)).astype(np.float32)
                                          for _ in range(8)])
    out = tmp_path / "q.onnx"
    assert main(["--quantType=PostTraining", f"--modelFile={src}", f"--outputFile={out}",
                 f"--configFile={ini(tmp_path, f'x:{data}')}", f"--skipQuantNode={skip}"]) == 0
    printed = capsys.readouterr().out
    kept = "2 nodes (fc1/MatMulAddFusion, fc2)" if skip == "MatMul" else \
        "1 node (fc1/MatMulAddFusion)"
    assert f"kept float by skip_quant_node: {kept}" in printed, printed
    types = {t.name: t.data_type for t in onnx.load(str(out)).graph.initializer}
    assert types["w1"] == onnx.TensorProto.FLOAT and "w1_quantized" not in types
    assert ("w2_quantized" in types) == (skip != "MatMul")
