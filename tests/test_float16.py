"""--fp16: float32 constants that stay float are stored in float16 behind a Cast (converter_lite's
--fp16); inputs, outputs and quantized weights keep their types."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import run_model
from models import DIGITS, digits_eval, embedding, save, write_samples
from onnx import TensorProto, numpy_helper

import ptqconv
from ptqconv.cli import main

MODEL = DIGITS / "model.onnx"


def test_float_weights_round_trip_through_float16_and_the_model_still_runs(tmp_path, capsys):
    half, full = tmp_path / "half.onnx", tmp_path / "full.onnx"
    args = [f"--modelFile={MODEL}", "--quantType=WeightQuant", "--quantWeightChannel=64"]
    assert main([*args, f"--outputFile={full}"]) == 0
    assert main([*args, f"--outputFile={half}", "--fp16=on"]) == 0
    printed = capsys.readouterr().out
    assert "fp16: 8 float32 constants stored in float16 (0.11 MB -> 56.4 kB)" in printed
    model = onnx.load(str(half))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    original = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(MODEL)).graph.initializer}
    casts = [n for n in model.graph.node if n.op_type == "Cast"]
    assert len(casts) == 8  # 3 conv weights, 5 biases
    for cast in casts:  # the Cast's output keeps the constant's name; values round to float16
        stored = inits[cast.input[0]]
        assert stored.dtype == np.float16
        assert np.array_equal(stored, original[cast.output[0]].astype(np.float16))
    quantized = [t.name for t in model.graph.initializer if t.data_type == TensorProto.INT8]
    assert sorted(quantized) == ["fc1.weight_quantized", "fc1.weight_zero_point",
                                 "fc2.weight_quantized", "fc2.weight_zero_point"]
    scales = [t for t in model.graph.initializer if t.name.endswith("_scale")]
    assert {t.data_type for t in scales} == {TensorProto.FLOAT}
    assert [i.type.tensor_type.elem_type for i in (*model.graph.input, *model.graph.output)] == [
        TensorProto.FLOAT, TensorProto.FLOAT]
    assert half.stat().st_size < full.stat().st_size * 0.8
    x = digits_eval(50)
    a, b = run_model(half, {"input": x})[0], run_model(full, {"input": x})[0]
    assert a.dtype == np.float32 and (a.argmax(1) == b.argmax(1)).all()
    assert np.abs(a - b).max() < 1e-2 * np.abs(b).max()


def test_constants_float16_cannot_hold_and_quantization_parameters_stay_float32(tmp_path):
    model = embedding()
    huge = numpy_helper.from_array(np.array([1e5, 1.0], np.float32), "huge")
    tiny = numpy_helper.from_array(np.array([1e-9, 1.0], np.float32), "tiny")
    model.graph.initializer.extend([huge, tiny])
    y = model.graph.output[0]
    model.graph.node.extend([
        onnx.helper.make_node("Gather", ["huge", "idx"], ["h"]),
        onnx.helper.make_node("Gather", ["tiny", "idx"], ["t"]),
    ])
    model.graph.initializer.append(numpy_helper.from_array(np.array(0, np.int64), "idx"))
    model.graph.output.extend([onnx.helper.make_tensor_value_info("h", TensorProto.FLOAT, []),
                               onnx.helper.make_tensor_value_info("t", TensorProto.FLOAT, [])])
    assert y.name == "y"
    src = save(model, tmp_path / "f.onnx")
    out = tmp_path / "q.onnx"
    report = ptqconv.convert(src, out, "DynamicQuant", fp16="on")
    assert report.fp16 is not None and report.fp16.kept == 2
    types = {t.name: t.data_type for t in onnx.load(str(out)).graph.initializer}
    assert types["huge"] == types["tiny"] == TensorProto.FLOAT
    assert all(t == TensorProto.FLOAT for name, t in types.items() if name.endswith("_scale"))
    outputs = run_model(out, {"ids": np.zeros((1, 8), np.int64)})
    assert outputs[1] == np.float32(1e5) and outputs[2] == np.float32(1e-9)


def test_a_float16_models_float_constants_stay_float16_unless_told_otherwise(tmp_path, capsys):
    """--fp16 not given: a model that stores its float constants in float16 gets what stays
    float stored in float16 too (computed in float32 behind a Cast, as onnxruntime does), so
    the output is not bigger than the input; --fp16=off writes them float32."""
    from test_weight_quant import float16_mlp

    model = float16_mlp()
    for i, node in enumerate(model.graph.node):
        node.name = f"n{i}"
    src = save(model, tmp_path / "half.onnx")
    rng = np.random.default_rng(2)
    data = write_samples(tmp_path / "x",
                         [rng.standard_normal((4, 64)).astype(np.float16) for _ in range(8)])
    config = tmp_path / "c.ini"
    # The second MatMul stays float (skipped); no latency plan keeps anything else float.
    config.write_text(f"[data_preprocess_param]\ncalibrate_path=x:{data}\n"
                      "[full_quant_param]\nlatency_aware=false\nmeasure_latency=false\n"
                      "activation_quant_method=MAX_MIN\n[common_quant_param]\n"
                      "skip_quant_node=n2\n")
    sizes = {}
    for flag in ((), ("--fp16=off",)):
        out = tmp_path / f"q{len(flag)}.onnx"
        assert main([f"--modelFile={src}", f"--outputFile={out}", "--quantType=PostTraining",
                     f"--configFile={config}", *flag]) == 0
        printed = capsys.readouterr().out
        types = {t.name: t.data_type for t in onnx.load(str(out)).graph.initializer}
        assert types["w1_quantized"] == TensorProto.INT8
        if flag:
            assert types["w2"] == TensorProto.FLOAT and "fp16:" not in printed
        else:
            assert types["w2_float16"] == TensorProto.FLOAT16
            assert "fp16: 1 float32 constants stored in float16 (16.4 kB -> 8.2 kB), as the " \
                   "model stores its own (--fp16=off: float32)" in printed
        sizes[flag] = out.stat().st_size
        x = {"x": rng.standard_normal((4, 64)).astype(np.float16)}
        ref = run_model(src, x)[0].astype(np.float64)
        got = run_model(out, x)[0]
        assert got.dtype == np.float16
        assert 10 * np.log10(np.sum(ref**2) / np.sum((got - ref) ** 2)) > 25
    assert sizes[()] < src.stat().st_size < sizes[("--fp16=off",)]
    # Nothing float32 left to store: no line (WeightQuant keeps the float16 weights as they
    # are); a float32 model's constants stay float32 without the flag.
    assert main([f"--modelFile={src}", f"--outputFile={tmp_path / 'w.onnx'}",
                 "--quantType=WeightQuant", "--quantWeightSize=5000"]) == 0
    assert "fp16:" not in capsys.readouterr().out
    assert main([f"--modelFile={MODEL}", f"--outputFile={tmp_path / 'd.onnx'}",
                 "--quantType=WeightQuant", "--quantWeightChannel=64"]) == 0
    assert "fp16:" not in capsys.readouterr().out


def _float16_embedding() -> onnx.ModelProto:
    model = embedding()
    for i, t in enumerate(model.graph.initializer):
        model.graph.initializer[i].CopyFrom(numpy_helper.from_array(
            numpy_helper.to_array(t).astype(np.float16), t.name))
    model.graph.output[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    return model


@pytest.mark.parametrize("mode, opset", [("PostTraining", 13), ("DynamicQuant", 19),
                                         ("DynamicQuant", 17)])
def test_a_float16_embedding_table_is_quantized_like_a_float32_one(tmp_path, capsys, mode,
                                                                    opset):
    model = _float16_embedding()
    model.opset_import[0].version = opset
    src = save(model, tmp_path / "f.onnx")
    rng = np.random.default_rng(0)
    args = [f"--modelFile={src}", f"--outputFile={tmp_path / 'q.onnx'}", f"--quantType={mode}"]
    if mode == "PostTraining":
        data = write_samples(tmp_path / "ids",
                             [rng.integers(0, 1000, (1, 8)).astype(np.int64) for _ in range(8)])
        config = tmp_path / "c.ini"
        # AUTO's dynamic candidate (a table per table) may be timed faster than this
        # sub-millisecond model's float plan and written: per row is what is tested here.
        config.write_text(f"[data_preprocess_param]\ncalibrate_path=ids:{data}\n"
                          "[full_quant_param]\ndynamic_candidate=false\n")
        args.append(f"--configFile={config}")
    assert main(args) == 0
    printed = capsys.readouterr().out
    # DynamicQuant: the table and the float16 projection.
    assert ("embedding tables: 1 in int8" if mode == "PostTraining"
            else "weights quantized: 2") in printed, printed
    model = onnx.load(str(tmp_path / "q.onnx"))
    types = {t.name: t.data_type for t in model.graph.initializer}
    assert types["table_quantized"] == TensorProto.INT8 and "table" not in types
    if mode == "DynamicQuant":
        # Per table, as quantize_dynamic: DequantizeLinear takes a float16 scale from opset
        # 19; before, a float32 one and a Cast to float16.
        assert types["table_scale"] == (TensorProto.FLOAT16 if opset >= 19
                                        else TensorProto.FLOAT)
        dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear"
                  and n.input[1] == "table_scale")
        casts = [n for n in model.graph.node if n.op_type == "Cast"
                 and n.input[0] == dq.output[0] and n.attribute[0].i == TensorProto.FLOAT16]
        assert len(casts) == (opset < 19)
    ids = {"ids": rng.integers(0, 1000, (1, 8)).astype(np.int64)}
    ref = run_model(src, ids)[0].astype(np.float64)
    got = run_model(tmp_path / "q.onnx", ids)[0]
    assert got.dtype == np.float16
    assert 10 * np.log10(np.sum(ref**2) / np.sum((got - ref) ** 2)) > 30


def test_only_a_float16_models_own_constants_go_back_to_float16():
    """A mixed model's float32 constants may be float32 on purpose: with --fp16 left out,
    only the constants the model stored in float16 are stored so again."""
    import onnx_ir as ir

    from ptqconv import modelio
    from ptqconv.passes.float16 import Float16ConstantsPass

    half = np.ones((64, 8), np.float16)
    model = ir.Model(ir.Graph([], [], nodes=[], name="g"), ir_version=9)
    for name, array in (("big16", half), ("small32", np.ones(4, np.float32))):
        value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
        model.graph.register_initializer(value)
    assert modelio.float16_constants(model) == {"big16"}
    # Mostly float32: not a float16 model.
    model.graph.register_initializer(ir.Value(
        name="big32", const_value=ir.tensor(np.ones((64, 8), np.float32), name="big32")))
    assert modelio.float16_constants(model) == frozenset()
    # What the simplification made of them: float32 each, read by one node.
    graph = ir.Graph([], [], nodes=[], name="g")
    users = []
    for name in ("big16", "small32"):
        value = ir.Value(name=name, const_value=ir.tensor(np.ones(4, np.float32), name=name))
        graph.register_initializer(value)
        users.append(ir.node("Identity", [value], name=f"use_{name}"))
    for node in users:
        graph.append(node)
        graph.outputs.append(node.outputs[0])
        node.outputs[0].name = f"out_{node.name}"
    result = Float16ConstantsPass(frozenset({"big16"}))(ir.Model(graph, ir_version=9))
    assert result.converted == 1
    dtypes = {name: v.const_value.dtype for name, v in graph.initializers.items()}
    assert dtypes == {"big16_float16": ir.DataType.FLOAT16, "small32": ir.DataType.FLOAT}


def test_a_float16_models_matmuls_get_dynamic_quantization(tmp_path, capsys):
    """DynamicQuantizeMatMul takes float32: a float16 product runs it between two Casts, as
    onnxruntime's CPU provider runs float16 models anyway."""
    from test_weight_quant import float16_mlp

    src = save(float16_mlp(), tmp_path / "f.onnx")
    out = tmp_path / "q.onnx"
    assert main([f"--modelFile={src}", f"--outputFile={out}", "--quantType=DynamicQuant",
                 "--quantWeightSize=0"]) == 0
    assert "weights quantized: 2" in capsys.readouterr().out
    model = onnx.load(str(out))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("DynamicQuantizeMatMul") == 2 and ops.count("Cast") == 4
    assert {t.name for t in model.graph.initializer if t.data_type == TensorProto.FLOAT16} \
        == set()  # the float16 weights are gone
    x = {"x": np.random.default_rng(1).standard_normal((4, 64)).astype(np.float16)}
    ref = run_model(src, x)[0].astype(np.float64)
    got = run_model(out, x)[0]
    assert got.dtype == np.float16
    assert 10 * np.log10(np.sum(ref**2) / np.sum((got - ref) ** 2)) > 25


@pytest.mark.parametrize("bits", [8, 12])
def test_float16_weights_are_not_stored_in_integers_as_wide(tmp_path, capsys, bits):
    """At 9-16 bits a float16 model's weights would be int16, as many bytes as float16, with
    scales on top: the file grew (1.01-1.11x). Such weights stay float, said per weight."""
    model = _float16_embedding()
    src = save(model, tmp_path / "f.onnx")
    out = tmp_path / "q.onnx"
    assert main([f"--modelFile={src}", f"--outputFile={out}", "--quantType=WeightQuant",
                 f"--bitNum={bits}", "--quantWeightSize=0"]) == 0
    printed = capsys.readouterr().out
    if bits == 8:
        assert out.stat().st_size < 0.6 * src.stat().st_size
        return
    assert "int16 takes as many bytes as its float16 values" in printed, printed
    assert "weights quantized: 0" in printed
    assert out.read_bytes() == src.read_bytes()


def test_fp16_leaves_the_scales_of_conv_weights_folded_at_load_in_float32(tmp_path):
    """Conv weights dequantized at load (Cast -> Mul) keep float32 scales under --fp16, as
    DequantizeLinear's do: only the constants that stay float go to float16."""
    out = tmp_path / "half.onnx"
    assert main([f"--modelFile={MODEL}", "--quantType=WeightQuant", f"--outputFile={out}",
                 "--quantWeightChannel=0", "--fp16=on"]) == 0
    inits = {t.name: t for t in onnx.load(str(out)).graph.initializer}
    for name in ("conv1.weight", "conv2.weight", "conv3.weight", "fc1.weight"):
        assert inits[f"{name}_scale"].data_type == TensorProto.FLOAT, name
    assert inits["conv1.bias_float16"].data_type == TensorProto.FLOAT16
    x = digits_eval(50)
    full = tmp_path / "full.onnx"
    assert main([f"--modelFile={MODEL}", "--quantType=WeightQuant", f"--outputFile={full}",
                 "--quantWeightChannel=0"]) == 0
    a, b = run_model(out, {"input": x})[0], run_model(full, {"input": x})[0]
    assert (a.argmax(1) == b.argmax(1)).all()
