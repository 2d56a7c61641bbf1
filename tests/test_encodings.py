"""AIMET / QNN encodings: written beside the model bit for bit, read back as fixed grids
(a round trip rebuilds the same bytes), and ranges from quantization-aware training kept."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from conftest import run_model
from hypothesis import given, settings
from hypothesis import strategies as st
from models import DIGITS, save, write_samples
from onnx import TensorProto, helper, numpy_helper

from ptqconv import encodings, qparams
from ptqconv.cli import main
from ptqconv.passes.qdq import BIAS_GRID
from ptqconv.target import detect

CONFIGS = DIGITS.parent.parent / "configs"
CORPUS = os.environ.get("PTQCONV_CORPUS")


def _import_config(config: Path, encodings_file: Path, out: Path) -> Path:
    """`config` with its data paths made absolute and encodings_path added."""
    text = config.read_text().replace("calibrate_path=input:../",
                                      f"calibrate_path=input:{config.parent.parent}/")
    if "[full_quant_param]" not in text:
        text += "\n[full_quant_param]\n"
    out.write_text(text.replace("[full_quant_param]",
                                f"[full_quant_param]\nencodings_path={encodings_file}", 1))
    return out


def test_the_example_round_trips_to_the_same_bytes(tmp_path, capsys):
    first, second = tmp_path / "a.onnx", tmp_path / "b.onnx"
    model = DIGITS / "model.onnx"
    assert main([f"--modelFile={model}", f"--outputFile={first}", "--quantType=PostTraining",
                 f"--configFile={CONFIGS / 'digits.ini'}",
                 f"--encodingsFile={tmp_path / 'a.json'}"]) == 0
    out = capsys.readouterr().out
    assert f"encodings: {tmp_path / 'a.json'}" in out
    chosen = out.split("chosen by measurement: ", 1)[1].split(" (", 1)[0]
    doc = json.loads((tmp_path / "a.json").read_text())
    assert doc["version"] == "0.6.1" and doc["quantizer_args"]["ptqconv"]["method"]
    # Without VNNI, reduce_range weights span 7 bits: AIMET's symmetric offset for them is -64.
    bits = 7 if detect().saturates else 8
    half = 2 ** (bits - 1)
    (channel, *_) = doc["param_encodings"]["conv1.weight"]
    assert (channel["bitwidth"], channel["offset"], channel["is_symmetric"]) == (bits, -half,
                                                                                 "True")
    assert channel["min"] == -half * channel["scale"]
    assert channel["max"] == (half - 1) * channel["scale"]
    bias = doc["param_encodings"]["conv1.bias"][0]
    assert (bias["bitwidth"], bias["offset"]) == (32, -(2**31))
    config = _import_config(CONFIGS / "digits.ini", tmp_path / "a.json", tmp_path / "b.ini")
    assert main([f"--modelFile={model}", f"--outputFile={second}", "--quantType=PostTraining",
                 f"--configFile={config}", f"--encodingsFile={tmp_path / 'b.json'}"]) == 0
    text = capsys.readouterr().out
    assert first.read_bytes() == second.read_bytes()
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert "6 activations and 5 weights on the file's grids; 0 activations calibrated" in text
    # The same label as the run that wrote the file: what changed the model, not every
    # technique that was on.
    assert chosen.startswith(doc["quantizer_args"]["ptqconv"]["method"])
    assert f"chosen by the encodings file (ptqconv wrote it): {chosen}\n" in text
    # Every DequantizeLinear of the model holds exactly the file's grid.
    model_q = onnx.load(str(first))
    inits = {t.name: numpy_helper.to_array(t) for t in model_q.graph.initializer}
    scales = [float(inits[n.input[1]].reshape(-1)[0]) for n in model_q.graph.node
              if n.op_type == "QuantizeLinear"]
    written = {e[0]["scale"] for e in doc["activation_encodings"].values()}
    assert set(scales) <= written


@pytest.mark.skipif(not CORPUS, reason="no corpus ($PTQCONV_CORPUS)")
@pytest.mark.parametrize("name", ["mtcnn_pnet", "silero_vad_16k_sequence"])
def test_a_corpus_model_round_trips_to_the_same_bytes(tmp_path, name):
    root = Path(CORPUS) / name
    manifest = json.loads((root / "manifest.json").read_text())
    paths = ",".join(f"{i['name']}:{root / 'calib' / i['dir']}" for i in manifest["inputs"])
    shapes = ";".join(f"{i['name']}:{','.join(map(str, i['shape']))}"
                      for i in manifest["inputs"])
    size = min(16, manifest["splits"]["calib"]["count"])
    base = f"[data_preprocess_param]\ncalibrate_path={paths}\ninput_shape={shapes}\n" \
           f"calibrate_size={size}\n"
    (tmp_path / "a.ini").write_text(base)
    (tmp_path / "b.ini").write_text(base + f"[full_quant_param]\nencodings_path="
                                           f"{tmp_path / 'a.json'}\n")
    for run in "ab":
        assert main([f"--modelFile={root / 'model.onnx'}", f"--outputFile={tmp_path}/{run}.onnx",
                     "--quantType=PostTraining", f"--configFile={tmp_path}/{run}.ini", "--quiet",
                     f"--encodingsFile={tmp_path}/{run}.json"]) == 0
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


def _on_grid(rng, shape, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Weights as quantization-aware training leaves them: int8 codes times a per-channel
    scale (AIMET symmetric: [-128, 127], scale = absmax / 127)."""
    channels = shape[axis]
    fan_in = int(np.prod(shape)) // channels
    scale = ((0.5 + rng.random(channels)) / (64 * np.sqrt(fan_in))).astype(np.float32)
    codes = np.clip(np.rint(rng.standard_normal(shape) * 40), -128, 127)
    view = [1] * len(shape)
    view[axis] = -1
    return (codes * scale.reshape(view)).astype(np.float32), scale


def qat_net(seed: int = 0) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """x -> Conv -> Relu -> Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm, weights on
    their trained grids."""
    rng = np.random.default_rng(seed)
    w1, s1 = _on_grid(rng, (16, 3, 3, 3), 0)
    w2, s2 = _on_grid(rng, (32, 16, 3, 3), 0)
    w3, s3 = _on_grid(rng, (10, 32), 0)
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
             numpy_helper.from_array(w3, "w3"),
             numpy_helper.from_array((0.1 * rng.standard_normal(16)).astype(np.float32), "b1"),
             numpy_helper.from_array((0.1 * rng.standard_normal(10)).astype(np.float32), "b3")]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1] * 4),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1] * 4),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("GlobalAveragePool", ["r2"], ["pooled"], name="pool"),
             helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
             helper.make_node("Gemm", ["flat", "w3", "b3"], ["logits"], name="fc", transB=1)]
    graph = helper.make_graph(
        nodes, "qat", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, {"w1": s1, "w2": s2, "w3": s3}


def _inputs(count: int = 8, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.uniform(-1.5, 1.5, (1, 3, 8, 8)).astype(np.float32) for _ in range(count)]


def _trained_ranges(names: list[str]) -> dict[str, float]:
    """The largest value of each tensor of the float qat_net on the data: the range the
    training learned, for the test."""
    model, _ = qat_net()
    model.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                              for n in names)
    session = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    found = [session.run(names, {"x": x}) for x in _inputs()]
    return {n: float(max(v[i].max() for v in found)) for i, n in enumerate(names)}


def _qat_setup(tmp_path, doc: dict) -> tuple[Path, Path, Path]:
    model, _ = qat_net()
    src = save(model, tmp_path / "qat.onnx")
    data = write_samples(tmp_path / "x", _inputs())
    (tmp_path / "trained.json").write_text(json.dumps(doc))
    config = tmp_path / "c.ini"
    config.write_text(f"[data_preprocess_param]\ncalibrate_path=x:{data}\n"
                      f"[full_quant_param]\nencodings_path=trained.json\n")
    return src, config, tmp_path / "q.onnx"


def _grids(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Scale and zero point of each float tensor's QuantizeLinear, and of each weight's
    DequantizeLinear (by the float weight's name), in the written model."""
    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    found = {}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear":
            found[node.input[0]] = (inits[node.input[1]], inits[node.input[2]])
        elif node.op_type == "DequantizeLinear" and node.input[0].endswith("_quantized") \
                and node.input[0] in inits and len(node.input) > 2:
            found[node.input[0].removesuffix("_quantized")] = (
                inits[node.input[1]], inits[node.input[2]])
    return found


def test_a_qat_model_keeps_exactly_its_trained_grids(tmp_path, capsys):
    _, scales = qat_net()
    # AIMET 1.0.0, as its quantization-aware training exports: symmetric per-channel weights
    # (offset -128) and asymmetric activations; r2 is not named, so it is calibrated.
    top = _trained_ranges(["r1", "pooled"])
    trained = {"x": (3.0 / 255, -128), "r1": (1.1 * top["r1"] / 255, 0),
               "pooled": (1.1 * top["pooled"] / 255, 0)}
    doc = {"version": "1.0.0",
           "activation_encodings": [
               {"name": n, "dtype": "INT", "enc_type": "PER_TENSOR", "bw": 8, "is_sym": False,
                "scale": [s], "offset": [o]} for n, (s, o) in trained.items()],
           "param_encodings": [
               {"name": n, "dtype": "INT", "enc_type": "PER_CHANNEL", "bw": 8, "is_sym": True,
                "scale": [float(v) for v in s], "offset": [-128] * len(s)}
               for n, s in scales.items()],
           "excluded_layers": []}
    src, config, out = _qat_setup(tmp_path, doc)
    assert main([f"--modelFile={src}", f"--outputFile={out}", "--quantType=PostTraining",
                 f"--configFile={config}"]) == 0
    text = capsys.readouterr().out
    grids = _grids(out)
    for name, (scale, offset) in trained.items():
        assert grids[name][0] == np.float32(scale) and grids[name][1] == -offset
        assert grids[name][1].dtype == np.uint8
    for name, scale in scales.items():
        assert np.array_equal(grids[name][0], scale) and not np.any(grids[name][1])
    # On their trained grids, the weights dequantize to themselves.
    model = onnx.load(str(out))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    original = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(src)).graph.initializer}
    for name, scale in scales.items():
        q = inits[f"{name}_quantized"].astype(np.float32)
        view = [-1] + [1] * (q.ndim - 1)
        assert np.array_equal(q * scale.reshape(view), original[name])
        assert q.min() >= -128 and q.max() <= 127
    assert "r2" in grids and float(grids["r2"][0]) not in {np.float32(s) for s, _ in
                                                           trained.values()}
    assert ("3 activations and 3 weights on the file's grids; 1 activations calibrated"
            in text)
    # Equalizing the convs would change what the trained grids describe.
    assert "equalization left alone" in text or "equalized" not in text
    # Only U8S8 kernels without VNNI saturate on 8-bit weights.
    assert ("3 imported weight grids are wider than 7 bits" in text) == detect().saturates
    for x in _inputs(4, seed=7):
        (ref,), (got,) = run_model(src, {"x": x}), run_model(out, {"x": x})
        assert np.dot(ref.ravel(), got.ravel()) / np.linalg.norm(ref) / np.linalg.norm(got) > 0.99


def test_trained_ranges_given_as_min_and_max_are_kept(tmp_path):
    # TensorFlow's fake-quant nodes hold a min and a max: the grid AIMET makes of them.
    top = _trained_ranges(["r1", "r2"])
    ranges = {"x": (-1.5, 1.5), "r1": (0.0, top["r1"]), "r2": (0.0, top["r2"])}
    doc = {"version": "0.5.0", "activation_encodings": {
        n: [{"bitwidth": 8, "dtype": "int", "is_symmetric": "False", "min": lo, "max": hi}]
        for n, (lo, hi) in ranges.items()}, "param_encodings": {}}
    src, config, out = _qat_setup(tmp_path, doc)
    assert main([f"--modelFile={src}", f"--outputFile={out}", "--quantType=PostTraining",
                 f"--configFile={config}", "--quiet"]) == 0
    grids = _grids(out)
    for name, (lo, hi) in ranges.items():
        scale = (hi - lo) / 255
        assert grids[name][0] == np.float32(scale)
        assert grids[name][1] == np.rint(-lo / scale)


@pytest.mark.parametrize(("doc", "message"), [
    ("{", "not a JSON encodings file"),
    ('{"version": "3.0.0"}', "encodings version '3.0.0' is not supported; allowed: 0.4.0"),
    ('{"version": "1.0.0", "param_encodings": [{"name": "w1", "dtype": "INT", '
     '"enc_type": "PER_BLOCK", "bw": 4, "is_sym": true, "scale": [1], "offset": [-8]}]}',
     "tensor 'w1': enc_type PER_BLOCK is not supported; allowed: PER_TENSOR, PER_CHANNEL"),
    ('{"version": "0.6.1", "param_encodings": {"w1": [{"bitwidth": 8, "is_symmetric": "True", '
     '"scale": 0.1, "offset": -128}, {"bitwidth": 8, "is_symmetric": "True", "scale": 0.1, '
     '"offset": -128}]}}', "tensor 'w1': 2 per-channel encodings; the weight has 16 channels"),
    ('{"version": "0.6.1", "activation_encodings": {"x": [{"bitwidth": 8, '
     '"is_symmetric": "maybe", "scale": 0.1, "offset": 0}]}}',
     "tensor 'x': is_symmetric must be true or false, got 'maybe'"),
    ('{"version": "0.6.1", "activation_encodings": {"x": [{"bitwidth": 8, '
     '"is_symmetric": "False", "scale": -0.1, "offset": 0}]}}',
     "tensor 'x': a scale is not a positive number"),
    ('{"version": "0.6.1", "activation_encodings": {"x": [{"bitwidth": 8, '
     '"is_symmetric": "False", "max": 1.0}]}}',
     "tensor 'x': the encoding has no 'min'; AIMET 0.6.1 entries need bitwidth and scale + "
     "offset (or min + max)"),
])
def test_a_bad_encodings_file_is_a_one_line_usage_error(tmp_path, capsys, doc, message):
    src, config, out = _qat_setup(tmp_path, {})
    (tmp_path / "trained.json").write_text(doc)
    status = main([f"--modelFile={src}", f"--outputFile={out}", "--quantType=PostTraining",
                   f"--configFile={config}"])
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and message in line and "trained.json" in line and not out.exists()


def test_encodings_file_flag_errors(tmp_path, capsys):
    model = str(DIGITS / "model.onnx")
    out = tmp_path / "q.onnx"
    for args, message in (
            (["--quantType=WeightQuant", f"--encodingsFile={tmp_path / 'e.json'}"],
             "--encodingsFile: only with --quantType=PostTraining"),
            (["--quantType=PostTraining", f"--configFile={CONFIGS / 'digits.ini'}",
              f"--encodingsFile={out}"], f"--encodingsFile: {out} is also written as --outputFile"),
            (["--quantType=PostTraining", f"--configFile={CONFIGS / 'digits.ini'}",
              f"--encodingsFile={tmp_path / 'none' / 'e.json'}"],
             "--encodingsFile: directory does not exist")):
        status = main([f"--modelFile={model}", f"--outputFile={out}", *args])
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert status == 2 and message in line and not out.exists()


@st.composite
def _encodings(draw):
    """A grid as the QDQ pass makes it: uint8 activations of 1-8 bits, int8 symmetric
    weights (per channel, 2-8 bits, reduce_range or not) or an int32 bias."""
    kind = draw(st.sampled_from(["activation", "weight", "bias"]))
    scales = st.floats(2.0**-40, 2.0**20, width=32)
    if kind == "activation":
        bits = draw(st.integers(1, 8))
        grid = qparams.activation_grid(bits)
        zero_point = np.int64(draw(st.integers(0, grid.qmax)))
        return kind, qparams.Encoding(np.float32(draw(scales)), zero_point, grid)
    channels = draw(st.integers(1, 6))
    scale = np.array(draw(st.lists(scales, min_size=channels, max_size=channels)), np.float32)
    if kind == "bias":
        return kind, qparams.Encoding(scale, np.zeros(channels, np.int64), BIAS_GRID)
    grid = qparams.fused_weight_grid(draw(st.integers(2, 8)), draw(st.booleans()))
    return kind, qparams.Encoding(scale, np.zeros(channels, np.int64), grid)


@settings(max_examples=200, deadline=None)
@given(_encodings())
def test_grids_survive_the_file_bit_for_bit(found):
    kind, encoding = found
    doc = encodings.document({"t": encoding} if kind == "activation" else {},
                             {} if kind == "activation" else {"t": encoding}, [], {})
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"ptqconv-enc-{os.getpid()}.json"
    encodings.write(path, doc)
    entry = encodings.read(path).tensors["t"]
    path.unlink()
    if kind == "bias":  # 32-bit: int8 cannot hold it; offsets and scales still exact
        assert np.array_equal(entry.scale, np.atleast_1d(encoding.scale))
        assert np.all(entry.offset == -(2**31))
        return
    back = (qparams.activation_encoding(entry.scale.reshape(()), entry.offset.reshape(()),
                                        entry.bits) if kind == "activation" else
            qparams.weight_encoding(entry.scale, entry.offset, entry.bits, entry.symmetric))
    assert back is not None
    assert back.scale.dtype == np.float32 and np.array_equal(back.scale, encoding.scale)
    assert np.array_equal(back.zero_point, encoding.zero_point)
    # The grid read back contains the one written (AIMET's symmetric grid has one more level
    # below, which the weights never reach: they were quantized on the narrower one).
    assert back.grid.qmin <= encoding.grid.qmin and back.grid.qmax == encoding.grid.qmax


def test_other_versions_read_as_aimet_and_qairt_write_them(tmp_path):
    # AIMET's documented 0.6.1 example, the same tensor as 1.0.0 and as 2.0.0.
    legacy = {"version": "0.6.1", "activation_encodings": {"a": [
        {"bitwidth": 8, "dtype": "int", "is_symmetric": "False", "max": 2.608697,
         "min": -2.109158, "offset": -114, "scale": 0.0185014}]}, "param_encodings": {}}
    v1 = {"version": "1.0.0", "activation_encodings": [
        {"name": "a", "dtype": "INT", "enc_type": "PER_TENSOR", "bw": 8, "is_sym": "False",
         "scale": [0.0185014], "offset": [-114]}], "param_encodings": []}
    v2 = {"version": "2.0.0", "encodings": [
        {"name": "a", "output_dtype": "uint8", "y_scale": 0.0185014, "y_zero_point": 114},
        {"name": "w", "output_dtype": "int8", "y_scale": [0.5, 0.25], "axis": 0}]}
    found = []
    for i, doc in enumerate((legacy, v1, v2)):
        (tmp_path / f"{i}.json").write_text(json.dumps(doc))
        found.append(encodings.read(tmp_path / f"{i}.json").tensors)
    for tensors in found:
        grid = qparams.activation_encoding(tensors["a"].scale.reshape(()),
                                           tensors["a"].offset.reshape(()), tensors["a"].bits)
        assert grid.scale == np.float32(0.0185014) and grid.zero_point == 114
    weight = found[2]["w"]
    assert weight.per_channel and weight.axis == 0 and weight.symmetric
    assert list(weight.offset) == [-128, -128]


def test_encodings_written_for_a_control_flow_model_name_body_tensors(tmp_path):
    from cf_models import stream, streaming_model

    src = save(streaming_model(), tmp_path / "float.onnx")
    samples = stream(src, 24)
    dirs = {n: write_samples(tmp_path / n, [s[n] for s in samples]) for n in ("x", "h", "active")}
    base = ("[data_preprocess_param]\ncalibrate_path="
            + ",".join(f"{n}:{d}" for n, d in dirs.items()) + "\n")
    (tmp_path / "a.ini").write_text(base)
    (tmp_path / "b.ini").write_text(base + "[full_quant_param]\nencodings_path=a.json\n")
    for run in "ab":
        assert main([f"--modelFile={src}", f"--outputFile={tmp_path}/{run}.onnx", "--quiet",
                     "--quantType=PostTraining", f"--configFile={tmp_path}/{run}.ini",
                     f"--encodingsFile={tmp_path}/{run}.json"]) == 0
    doc = json.loads((tmp_path / "a.json").read_text())
    assert {"mm_xz", "h", "c_relu"} <= set(doc["activation_encodings"])  # in the branch
    assert {"Wc", "Whn"} <= set(doc["param_encodings"])
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    model = ir.load(tmp_path / "a.onnx")
    assert model.graph.initializers["Wc_quantized"].const_value.dtype == ir.DataType.INT8


def test_the_encodings_file_written_never_replaces_the_one_imported(tmp_path, capsys):
    model = DIGITS / "model.onnx"
    assert main([f"--modelFile={model}", f"--outputFile={tmp_path / 'a.onnx'}",
                 "--quantType=PostTraining", f"--configFile={CONFIGS / 'digits.ini'}",
                 f"--encodingsFile={tmp_path / 'a.json'}", "--quiet"]) == 0
    before = (tmp_path / "a.json").read_bytes()
    config = _import_config(CONFIGS / "digits.ini", tmp_path / "a.json", tmp_path / "b.ini")
    status = main([f"--modelFile={model}", f"--outputFile={tmp_path / 'b.onnx'}",
                   "--quantType=PostTraining", f"--configFile={config}",
                   f"--encodingsFile={tmp_path / 'a.json'}"])
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and "which this run reads" in line and "a.json" in line
    assert (tmp_path / "a.json").read_bytes() == before and not (tmp_path / "b.onnx").exists()


def test_a_gptq_model_round_trips_to_the_same_bytes(tmp_path, capsys):
    """GPTQ's integers are not the nearest ones on the grid the file records: replaying the
    file with GPTQ on writes them again, not the weights rounded to nearest."""
    config = tmp_path / "g.ini"
    config.write_text((CONFIGS / "digits.ini").read_text().replace(
        "calibrate_path=input:../", f"calibrate_path=input:{CONFIGS.parent}/").replace(
        "[full_quant_param]", "[full_quant_param]\nquant_strategy=GPTQ\nmeasure_latency=false",
        1))
    first, second = tmp_path / "a.onnx", tmp_path / "b.onnx"
    model = DIGITS / "model.onnx"
    assert main([f"--modelFile={model}", f"--outputFile={first}", "--quantType=PostTraining",
                 f"--configFile={config}", f"--encodingsFile={tmp_path / 'a.json'}"]) == 0
    replay = _import_config(config, tmp_path / "a.json", tmp_path / "b.ini")
    assert main([f"--modelFile={model}", f"--outputFile={second}", "--quantType=PostTraining",
                 f"--configFile={replay}"]) == 0
    text = capsys.readouterr().out
    assert first.read_bytes() == second.read_bytes()
    assert "  weights quantized: 5 (on the encodings file's grids)\n" in text


def test_an_8_bit_run_replaying_4_bit_weights_says_whose_grids_they_are(tmp_path, capsys):
    """The weights line states the file's grids, not the 8-bit ones bit_num would give."""
    config = tmp_path / "c.ini"
    config.write_text((CONFIGS / "digits.ini").read_text().replace(
        "calibrate_path=input:../", f"calibrate_path=input:{CONFIGS.parent}/"))
    model = DIGITS / "model.onnx"
    assert main([f"--modelFile={model}", f"--outputFile={tmp_path / 'a.onnx'}",
                 "--quantType=PostTraining", "--bitNum=4", f"--configFile={config}",
                 f"--encodingsFile={tmp_path / 'a.json'}"]) == 0
    replay = _import_config(config, tmp_path / "a.json", tmp_path / "b.ini")
    capsys.readouterr()
    assert main([f"--modelFile={model}", f"--outputFile={tmp_path / 'b.onnx'}",
                 "--quantType=PostTraining", f"--configFile={replay}"]) == 0
    text = capsys.readouterr().out
    assert "  weights quantized: 5 (on the encodings file's grids)\n" in text, text
    assert "levels [-63, 63]" not in text


@pytest.mark.parametrize("gptq_kept", [True, False])
def test_a_4_bit_model_replays_the_weights_its_default_strategy_wrote(
        tmp_path, capsys, monkeypatch, gptq_kept):
    """Below 8 bits GPTQ is ptqconv's choice, kept where it scores better: the file records
    which weights were written, and the replay writes the same."""
    from ptqconv.post_training import PostTraining

    if not gptq_kept:
        monkeypatch.setattr(PostTraining, "held_out_error", lambda self, model: 1e9)
    config = tmp_path / "c.ini"
    config.write_text((CONFIGS / "digits.ini").read_text().replace(
        "calibrate_path=input:../", f"calibrate_path=input:{CONFIGS.parent}/").replace(
        "[full_quant_param]", "[full_quant_param]\nmeasure_latency=false", 1))
    first, second = tmp_path / "a.onnx", tmp_path / "b.onnx"
    model = DIGITS / "model.onnx"
    assert main([f"--modelFile={model}", f"--outputFile={first}", "--quantType=PostTraining",
                 "--bitNum=4", f"--configFile={config}",
                 f"--encodingsFile={tmp_path / 'a.json'}"]) == 0
    text = capsys.readouterr().out
    assert ("  GPTQ: 5 layers" in text) == gptq_kept and ("GPTQ left out" in text) != gptq_kept
    recorded = json.loads((tmp_path / "a.json").read_text())["quantizer_args"]
    assert recorded[encodings.CHOICES_KEY]["quant_strategy"] == (
        "GPTQ" if gptq_kept else "MAX_MIN")
    replay = _import_config(config, tmp_path / "a.json", tmp_path / "b.ini")
    assert main([f"--modelFile={model}", f"--outputFile={second}", "--quantType=PostTraining",
                 "--bitNum=4", f"--configFile={replay}"]) == 0
    assert first.read_bytes() == second.read_bytes()
    # The replay runs GPTQ only where the file's model had GPTQ's weights.
    assert ("  GPTQ: 5 layers" in capsys.readouterr().out) == gptq_kept
