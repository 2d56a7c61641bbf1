"""Hostile files and invalid models: refused up front with one line naming the culprit, and
no output that onnxruntime refuses is ever reported as a success."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from harness import cli, digits_workspace, error_line, fails
from models import mlp

from ptqconv import conversion
from ptqconv.cli import main as cli_main

SECRET = np.arange(16 * 64, dtype=np.float32)


def _external_model(root, tensor: str, location: str):
    """mlp((64, 64, 16)) with its tensors in m.onnx.data and `tensor` pointing at
    `location` instead."""
    root.mkdir(exist_ok=True)
    path = root / "m.onnx"
    onnx.save(mlp((64, 64, 16)), str(path), save_as_external_data=True,
              location="m.onnx.data", size_threshold=0)
    proto = onnx.load(str(path), load_external_data=False)
    for t in proto.graph.initializer:
        if t.name == tensor:
            for entry in t.external_data:
                if entry.key == "location":
                    entry.value = location
                elif entry.key == "offset":
                    entry.value = "0"
    onnx.save(proto, str(path))
    return path


@pytest.mark.parametrize("where", ["dotdot", "absolute", "symlink"])
@pytest.mark.parametrize("tensor", ["b0", "w0"])  # a bias read as is, a weight quantized
def test_external_data_outside_the_models_directory_is_refused(tmp_path, capsys, where,
                                                               tensor):
    secret = tmp_path / "secret.bin"
    SECRET.tofile(secret)
    root = tmp_path / "model"
    root.mkdir()
    location = {"dotdot": "../secret.bin", "absolute": str(secret), "symlink": "inside.bin"}
    if where == "symlink":
        (root / "inside.bin").symlink_to(secret)
    model = _external_model(root, tensor, location[where])
    args = [f"--modelFile={model}", f"--outputFile={root / 'o.onnx'}", "--quantType=WeightQuant"]
    line = fails(capsys, tmp_path, args, 1, f"tensor {tensor!r}", location[where])
    assert "outside the model's directory" in line


def test_external_data_outside_is_refused_in_post_training_too(tmp_path, capsys):
    SECRET.tofile(tmp_path / "secret.bin")
    root = tmp_path / "model"
    model = _external_model(root, "b1", "../secret.bin")
    (root / "calib").mkdir()
    np.zeros((1, 64), np.float32).tofile(root / "calib" / "0.bin")
    (root / "c.ini").write_text("[data_preprocess_param]\ncalibrate_path=x:calib\n")
    args = [f"--modelFile={model}", f"--outputFile={root / 'o.onnx'}",
            "--quantType=PostTraining", f"--configFile={root / 'c.ini'}"]
    fails(capsys, tmp_path, args, 1, "tensor 'b1'", "../secret.bin")


@pytest.mark.parametrize("damage", ["missing", "short"])
def test_missing_or_truncated_external_data_names_the_tensor_and_the_file(tmp_path, capsys,
                                                                         damage):
    model = _external_model(tmp_path, "w1", "w1.bin")
    if damage == "short":
        (tmp_path / "w1.bin").write_bytes(b"\0" * 100)
    args = [f"--modelFile={model}", f"--outputFile={tmp_path / 'o.onnx'}",
            "--quantType=WeightQuant"]
    line = fails(capsys, tmp_path, args, 1, "tensor 'w1'", "w1.bin")
    assert {"missing": "no such file", "short": "truncated"}[damage] in line


def _child(args: list[str]) -> subprocess.CompletedProcess:
    """The CLI in a child process: reading a FIFO would hang, /dev/zero never ends."""
    return subprocess.run([sys.executable, "-m", "ptqconv.cli", *args], capture_output=True,
                          text=True, timeout=60, check=False)


def test_external_data_in_a_fifo_is_refused_without_reading_it(tmp_path):
    model = _external_model(tmp_path, "w1", "w1.bin")
    os.mkfifo(tmp_path / "w1.bin")
    result = _child([f"--modelFile={model}", f"--outputFile={tmp_path / 'o.onnx'}",
                     "--quantType=WeightQuant"])
    assert result.returncode == 1
    assert error_line(result.stderr).endswith(
        f"tensor 'w1': external data file {tmp_path / 'w1.bin'}: is a FIFO, not a regular file")


def test_truncated_embedded_tensor_names_the_tensor_and_the_file(tmp_path, capsys):
    proto = mlp((64, 64, 16))
    proto.graph.initializer[2].raw_data = proto.graph.initializer[2].raw_data[:100]
    onnx.save(proto, str(tmp_path / "m.onnx"))
    args = [f"--modelFile={tmp_path / 'm.onnx'}", f"--outputFile={tmp_path / 'o.onnx'}",
            "--quantType=WeightQuant"]
    fails(capsys, tmp_path, args, 1, "m.onnx", proto.graph.initializer[2].name, "too small")


@pytest.mark.parametrize("flag", ["--modelFile", "--configFile"])
@pytest.mark.parametrize("special", ["fifo", "/dev/zero"])
def test_special_files_are_refused_without_reading_them(tmp_path, flag, special):
    files = digits_workspace(tmp_path)
    target = tmp_path / "fifo" if special == "fifo" else special
    if special == "fifo":
        os.mkfifo(target)
    paths = {"--modelFile": files["model"], "--configFile": files["config"], flag: target}
    args = [f"--modelFile={paths['--modelFile']}", f"--outputFile={tmp_path / 'o.onnx'}",
            "--quantType=PostTraining", f"--configFile={paths['--configFile']}"]
    result = _child(args)
    line = error_line(result.stderr)
    assert result.returncode == 2
    kind = "a FIFO" if special == "fifo" else "a character device"
    assert line == f"ptqconv: error: {flag}: is {kind}, not a regular file: {target}"


def test_a_config_of_gigabytes_is_refused_without_reading_it(tmp_path, capsys):
    files = digits_workspace(tmp_path)
    with files["config"].open("r+b") as handle:
        handle.truncate(64 << 20)  # sparse
    args = [f"--modelFile={files['model']}", f"--outputFile={tmp_path / 'o.onnx'}",
            "--quantType=PostTraining", f"--configFile={files['config']}"]
    fails(capsys, tmp_path, args, 2, "--configFile", "c.ini", "at most 1048576 bytes")


def test_special_files_in_a_data_directory_are_refused(tmp_path, capsys):
    files = digits_workspace(tmp_path)
    os.mkfifo(files["calib"] / "000005a.bin")
    (files["calib"] / "000005b.bin").symlink_to(tmp_path / "nowhere")
    (files["calib"] / "subdirectory").mkdir()  # ignored, as documented
    args = [f"--modelFile={files['model']}", f"--outputFile={tmp_path / 'o.onnx'}",
            "--quantType=PostTraining", f"--configFile={files['config']}"]
    line = fails(capsys, tmp_path, args, 2, "000005a.bin is a FIFO, not a regular file")
    os.unlink(files["calib"] / "000005a.bin")
    line = fails(capsys, tmp_path, args, 2, "000005b.bin is a broken symbolic link")
    assert line


def _cycle() -> onnx.ModelProto:
    proto = mlp((64, 64, 16))
    proto.graph.node[0].input[0] = "h1"  # fc0 reads the output of a later node
    return proto


def _unknown_op() -> onnx.ModelProto:
    proto = mlp((64, 64, 16))
    proto.graph.node[-1].op_type = "Frobnicate"
    return proto


def _future_ir() -> onnx.ModelProto:
    proto = mlp((64, 64, 16))
    proto.ir_version = 99
    return proto


@pytest.mark.parametrize(("build", "culprit"), [
    (_cycle, "topologically sorted"),
    (_unknown_op, "Frobnicate"),
    (_future_ir, "IR version 99"),
])
@pytest.mark.parametrize("quant_type", ["WeightQuant", "PostTraining"])
def test_models_onnxruntime_refuses_are_refused_up_front(tmp_path, capsys, build, culprit,
                                                         quant_type):
    onnx.save(build(), str(tmp_path / "m.onnx"))
    args = [f"--modelFile={tmp_path / 'm.onnx'}", f"--outputFile={tmp_path / 'o.onnx'}",
            f"--quantType={quant_type}", *_mlp_calibration(tmp_path, quant_type)]
    fails(capsys, tmp_path, args, 1, "m.onnx", culprit)


def _mlp_calibration(root, quant_type: str) -> list[str]:
    """The --configFile flag of a PostTraining run of mlp((64, 64, 16)); none otherwise."""
    if quant_type != "PostTraining":
        return []
    (root / "calib").mkdir()
    np.zeros((1, 64), np.float32).tofile(root / "calib" / "0.bin")
    (root / "c.ini").write_text("[data_preprocess_param]\ncalibrate_path=x:calib\n")
    return [f"--configFile={root / 'c.ini'}"]


def _shape_disagrees() -> onnx.ModelProto:
    proto = mlp((64, 64, 16))
    proto.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 17  # the graph gives 16
    return proto


@pytest.mark.parametrize("quant_type", ["WeightQuant", "PostTraining"])
def test_a_model_onnxs_checker_refuses_but_onnxruntime_loads_is_converted(
        tmp_path, capsys, monkeypatch, quant_type):
    """onnxruntime, where the output runs, has the last word. PostTraining loads the model
    in onnxruntime first (its simplification), so onnx's checker is not even run."""
    onnx.save(_shape_disagrees(), str(tmp_path / "m.onnx"))
    with pytest.raises(Exception, match="existing shape"):
        onnx.checker.check_model(str(tmp_path / "m.onnx"), full_check=True)
    checked = []
    check = onnx.checker.check_model
    monkeypatch.setattr(onnx.checker, "check_model", lambda *a, **k: (checked.append(a),
                                                                      check(*a, **k)))
    status, _, err = cli(capsys, f"--modelFile={tmp_path / 'm.onnx'}",
                         f"--outputFile={tmp_path / 'o.onnx'}", f"--quantType={quant_type}",
                         *_mlp_calibration(tmp_path, quant_type))
    assert status == 0, err
    assert bool(checked) == (quant_type == "WeightQuant")
    ort.InferenceSession(str(tmp_path / "o.onnx"), providers=["CPUExecutionProvider"])


def test_a_model_only_onnxruntime_refuses_is_refused_by_post_training(tmp_path, capsys):
    """onnx's checker passes an ImageDecoder; onnxruntime's CPU provider has no kernel."""
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("ImageDecoder", ["b"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("b", onnx.TensorProto.UINT8, [100])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.UINT8, ["h", "w", 3])])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 20)]),
              str(tmp_path / "m.onnx"))
    (tmp_path / "calib").mkdir()
    np.zeros(100, np.uint8).tofile(tmp_path / "calib" / "0.bin")
    (tmp_path / "c.ini").write_text("[data_preprocess_param]\ncalibrate_path=b:calib\n")
    args = [f"--modelFile={tmp_path / 'm.onnx'}", f"--outputFile={tmp_path / 'o.onnx'}",
            "--quantType=PostTraining", f"--configFile={tmp_path / 'c.ini'}"]
    fails(capsys, tmp_path, args, 1, "m.onnx", "onnxruntime cannot load the model",
          "ImageDecoder")


def test_an_output_onnxruntime_refuses_is_not_a_success(tmp_path, capsys, monkeypatch):
    files = digits_workspace(tmp_path)
    weight_quant = conversion.weight_quant

    def broken(*args, **kwargs):
        model, records, summary = weight_quant(*args, **kwargs)
        next(iter(model.graph)).op_type = "Frobnicate"
        return model, records, summary

    monkeypatch.setattr(conversion, "weight_quant", broken)
    args = [f"--modelFile={files['model']}", f"--outputFile={tmp_path / 'o.onnx'}",
            "--quantType=WeightQuant"]
    line = fails(capsys, tmp_path, args, 1, "o.onnx", "onnxruntime cannot load")
    assert line.endswith("nothing was written")


@pytest.mark.parametrize("kind", ["WeightQuant", "WeightQuant GPTQ", "PostTraining"])
def test_a_model_with_external_data_converted_elsewhere_loads_from_there(tmp_path, capsys,
                                                                         kind):
    """Run from another directory (the tests run from the repository's): the sessions over
    a model that still reads its weights from its data file (WeightQuant's calibration for
    GPTQ) find the file."""
    files = digits_workspace(tmp_path / "in", config="[weight_quant_param]\n"
                             "quant_strategy=GPTQ\n" if kind == "WeightQuant GPTQ" else "")
    proto = onnx.load(str(files["model"]))
    onnx.save(proto, str(files["model"]), save_as_external_data=True, location="m.onnx.data",
              size_threshold=0)
    out = tmp_path / "out" / "o.onnx"
    out.parent.mkdir()
    args = [f"--modelFile={files['model']}", f"--outputFile={out}",
            f"--quantType={kind.split()[0]}",
            # Some weights stay float, still in the input's data file.
            "--quantWeightChannel=32" if kind == "WeightQuant"
            else f"--configFile={files['config']}"]
    status, _, err = cli(capsys, *args)
    assert status == 0, err
    shutil.rmtree(tmp_path / "in")
    assert sorted(p.name for p in out.parent.iterdir()) == ["o.onnx"]
    ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])


def _old_upsampling_net(opset: int, mode: str, scale: float) -> onnx.ModelProto:
    """An opset-`opset`, IR 3 net (initializers listed as inputs, as old exporters wrote
    them): Conv -> BatchNormalization -> Relu -> Upsample(mode, scale) -> Conv."""
    rng = np.random.default_rng(0)
    h, T = onnx.helper, onnx.TensorProto
    weights = {"w1": rng.standard_normal((8, 3, 3, 3)) * 0.3,
               "g": 1 + 0.1 * rng.standard_normal(8), "be": 0.1 * rng.standard_normal(8),
               "mu": 0.1 * rng.standard_normal(8), "var": 1 + 0.1 * rng.random(8),
               "w2": rng.standard_normal((4, 8, 3, 3)) * 0.2}
    inits = [onnx.numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()]
    up = (h.make_node("Upsample", ["r"], ["u"], mode=mode, scales=[1.0, 1.0, scale, scale])
          if opset < 9 else h.make_node("Upsample", ["r", "sc"], ["u"], mode=mode))
    if opset >= 9:
        inits.append(onnx.numpy_helper.from_array(
            np.array([1, 1, scale, scale], np.float32), "sc"))
    nodes = [h.make_node("Conv", ["x", "w1"], ["c"], pads=[1, 1, 1, 1]),
             h.make_node("BatchNormalization", ["c", "g", "be", "mu", "var"], ["b"]),
             h.make_node("Relu", ["b"], ["r"]), up,
             h.make_node("Conv", ["u", "w2"], ["y"], pads=[1, 1, 1, 1])]
    inputs = [h.make_tensor_value_info("x", T.FLOAT, [1, 3, 8, 8])] + [
        h.make_tensor_value_info(t.name, T.FLOAT, list(t.dims)) for t in inits]
    graph = h.make_graph(nodes, "old", inputs, [h.make_tensor_value_info("y", T.FLOAT, None)],
                         inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", opset)])
    model.ir_version = 3
    return model


@pytest.mark.parametrize("opset, mode, scale", [(7, "nearest", 3.0), (9, "linear", 2.0),
                                                (9, "nearest", 3.0)])
def test_old_opsets_upgrade_without_changing_what_the_model_computes(tmp_path, opset, mode,
                                                                    scale):
    """Upgraded to opset 13, an IR 3 model keeps its weights (the version converter missed
    initializers not listed as inputs) and its Upsample keeps sampling asymmetrically,
    nearest rounding down (the converter's Resize took half_pixel: cosine 0.97 in float)."""
    src = tmp_path / "old.onnx"
    onnx.save(_old_upsampling_net(opset, mode, scale), src)
    out = tmp_path / "q.onnx"
    assert cli_main([f"--modelFile={src}", f"--outputFile={out}", "--quantType=WeightQuant",
                     "--bitNum=8", "--quantWeightSize=0", "--quantWeightChannel=0"]) == 0
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version >= 13 and model.ir_version >= 4
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    ref = ort.InferenceSession(str(src)).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(out)).run(None, {"x": x})[0]
    cosine = float((ref * got).sum() / np.linalg.norm(ref) / np.linalg.norm(got))
    assert cosine > 0.9995, cosine
