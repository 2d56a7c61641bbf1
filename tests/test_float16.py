"""--fp16: float32 constants that stay float are stored in float16 behind a Cast (converter_lite's
--fp16); inputs, outputs and quantized weights keep their types."""

from __future__ import annotations

import numpy as np
import onnx
from conftest import run_model
from models import DIGITS, digits_eval, embedding, save
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
