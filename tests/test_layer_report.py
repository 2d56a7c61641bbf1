"""Per-layer debug report: one row per quantized tensor; a deliberately bad layer ranks first."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import onnx
import pytest
from conftest import run_model  # noqa: F401  (sets onnxruntime's log level)
from models import random_samples, residual_cnn, save

from ptqconv import qparams
from ptqconv.cli import main
from ptqconv.conversion import convert
from ptqconv.debug.layer_report import TensorStats
from ptqconv.settings import ConvertSettings


def outlier_model():
    model = residual_cnn(seed=7)
    # One output channel of block 0's first conv gets a bias of 500: its ReLU output's
    # per-tensor range is then dominated by that channel and every other channel is crushed.
    for init in model.graph.initializer:
        if init.name == "b0c0_b":
            bias = onnx.numpy_helper.to_array(init).copy()
            bias[3] = 500.0
            init.CopyFrom(onnx.numpy_helper.from_array(bias, init.name))
    return model


def test_report_rows_and_a_huge_outlier_layer_ranks_first(tmp_path, capsys):
    src = save(outlier_model(), tmp_path / "float.onnx")
    data = random_samples(tmp_path / "x", 8, seed=0)
    config = tmp_path / "c.ini"
    config.write_text(
        f"[common_quant_param]\ndebug_info_save_path={tmp_path / 'debug'}\n"
        f"[data_preprocess_param]\ncalibrate_path=x:{data}\n"
        # Equalization would rescue the outlier channel, which this test needs crushed; the
        # model is too small for integer kernels to pay, which would leave nothing to report.
        "[full_quant_param]\nequalize=false\nlatency_aware=false\n"
    )
    out = tmp_path / "q.onnx"
    assert (
        main(
            [
                f"--modelFile={src}",
                f"--outputFile={out}",
                "--quantType=PostTraining",
                f"--configFile={config}",
            ]
        )
        == 0
    )
    stdout = capsys.readouterr().out
    rows = list(csv.DictReader((tmp_path / "debug" / "layer_report.csv").open()))
    report = json.loads((tmp_path / "debug" / "layer_report.json").read_text())
    assert report["schema"] == "ptqconv.layer_report/1"
    quantized = onnx.load(str(out))
    weights = {
        n.input[0][: -len("_quantized")]
        for n in quantized.graph.node
        if n.op_type == "DequantizeLinear"
        and n.input[0].endswith("_quantized")
        and quantized.graph.initializer
        and any(
            i.name == n.input[0] and i.data_type == onnx.TensorProto.INT8
            for i in quantized.graph.initializer
        )
    }
    activations = {n.input[0] for n in quantized.graph.node if n.op_type == "QuantizeLinear"}
    assert {r["tensor_name"] for r in rows if r["kind"] == "weight"} == weights
    assert {r["tensor_name"] for r in rows if r["kind"] == "activation"} == activations
    for row in rows:
        assert float(row["min"]) <= float(row["q1"]) <= float(row["median"]) <= float(row["q3"])
        assert 0.0 <= float(row["clip_rate"]) <= 1.0 and float(row["scale"]) > 0
    assert report["worst"][0] == "b0ar"
    assert "block0_relu0" in report["suggested_skip_quant_node"]
    assert "suggested skip_quant_node=" in stdout and "b0ar (activation" in stdout


def test_well_quantized_layers_have_rmse_near_a_uniform_rounding_error(tmp_path):
    src = save(residual_cnn(seed=8), tmp_path / "float.onnx")
    data = random_samples(tmp_path / "x", 8, seed=1)
    config = tmp_path / "c.ini"
    # Quantized although integer kernels would not pay at this size.
    config.write_text(f"[data_preprocess_param]\ncalibrate_path=x:{data}\n"
                      "[full_quant_param]\nlatency_aware=false\n")
    assert (
        main(
            [
                f"--modelFile={src}",
                f"--outputFile={tmp_path / 'q.onnx'}",
                "--quantType=PostTraining",
                f"--configFile={config}",
                "--quiet",
                f"--debugDir={tmp_path / 'd'}",
            ]
        )
        == 0
    )
    rows = list(csv.DictReader((tmp_path / "d" / "layer_report.csv").open()))
    weights = [float(r["rmse_over_scale"]) for r in rows if r["kind"] == "weight"]
    # Rounding alone leaves rmse = scale / sqrt(12) = 0.289 scale.
    assert all(0.2 < w < 0.35 for w in weights), weights


def test_sensitivity_ranks_the_outlier_unit_first(tmp_path, capsys):
    src = save(outlier_model(), tmp_path / "float.onnx")
    data = random_samples(tmp_path / "x", 8, seed=2)
    config = tmp_path / "c.ini"
    config.write_text(f"[data_preprocess_param]\ncalibrate_path=x:{data}\n"
                      # keep the outlier crushed, and quantized though it is small
                      "[full_quant_param]\nequalize=false\nlatency_aware=false\n")
    assert (
        main(
            [
                f"--modelFile={src}",
                f"--outputFile={tmp_path / 'q.onnx'}",
                "--quantType=PostTraining",
                f"--configFile={config}",
                "--sensitivity",
                f"--debugDir={tmp_path / 'd'}",
            ]
        )
        == 0
    )
    rows = list(csv.DictReader((tmp_path / "d" / "sensitivity.csv").open()))
    assert len(rows) == 9  # 5 Conv, 2 Add, GlobalAveragePool, Gemm
    # The worst unit is one that quantizes the crushed tensor b0ar (block0_conv0 writes it,
    # block0_conv1 reads it); a well-behaved unit costs far less.
    assert rows[0]["node_name"] in ("block0_conv0", "block0_conv1")
    sqnr = {r["node_name"]: float(r["output_sqnr_db_alone"]) for r in rows}
    assert list(sqnr.values()) == sorted(sqnr.values())
    assert sqnr[rows[0]["node_name"]] < sqnr["stem"] - 20
    assert f"--skipQuantNode={rows[0]['node_name']}" in capsys.readouterr().out


def test_every_figure_matches_a_float64_computation():
    """The vectorised float32 statistics against the definitions, computed in float64."""
    rng = np.random.default_rng(3)
    scale, zero_point = 0.02, 40
    grid = qparams.activation_grid(8)
    lo, hi = (grid.qmin - zero_point) * scale, (grid.qmax - zero_point) * scale
    stats = TensorStats("t", "activation", "n", 8, scale, zero_point, lo, hi)
    xs = [(rng.standard_normal((1, 6, 5, 7)) * 1.5).astype(np.float32) for _ in range(4)]
    outs = [(x + 0.01 * rng.standard_normal(x.shape)).astype(np.float32) for x in xs]
    for x, out in zip(xs, outs, strict=True):
        stats.update(x, qparams.fake_quantize(x, scale, zero_point, grid), out)
    row = stats.row()
    x = np.concatenate([a.astype(np.float64) for a in xs], axis=0)
    out = np.concatenate([a.astype(np.float64) for a in outs], axis=0)
    local = np.concatenate([qparams.dequantize(qparams.quantize(a, scale, zero_point, grid),
                                               scale, zero_point) for a in xs]).astype(np.float64)
    err, diff = local - x, out - x
    signal, noise = (x**2).sum(axis=(0, 2, 3)), (err**2).sum(axis=(0, 2, 3))
    expected = {
        "min": x.min(), "max": x.max(), "mean": x.mean(), "var": x.var(),
        "clip_rate": np.mean((x < lo - scale / 2) | (x > hi + scale / 2)),
        "rmse_over_scale": np.sqrt(np.mean(err**2)) / scale,
        "local_sqnr_db": 10 * np.log10((x**2).sum() / (err**2).sum()),
        "channel_sqnr_db": np.mean(10 * np.log10(signal / noise)),
        "cos_similarity": (x * out).sum() / np.sqrt((x**2).sum() * (out**2).sum()),
        "sqnr_db": 10 * np.log10((x**2).sum() / (diff**2).sum()),
    }
    for key, value in expected.items():
        assert row[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    # Quartiles come from a 4096-bin histogram of the representable range.
    for key, q in (("q1", 0.25), ("median", 0.5), ("q3", 0.75)):
        assert abs(row[key] - np.quantile(np.clip(x, lo, hi), q)) <= (hi - lo) / 4096, key


def test_the_layer_report_streams_with_its_own_progress(tmp_path):
    src = save(residual_cnn(seed=8), tmp_path / "float.onnx")
    data = random_samples(tmp_path / "x", 6, seed=1)
    config = tmp_path / "c.ini"
    config.write_text(f"[data_preprocess_param]\ncalibrate_path=x:{data}\n"
                      "[full_quant_param]\nlatency_aware=false\n")
    steps: dict[str, list[int]] = {}

    def progress(total: int, label: str):
        steps[label] = [total, 0]

        def advance(amount: int) -> None:
            steps[label][1] += amount

        return advance

    settings = ConvertSettings.create(src, tmp_path / "q.onnx", "PostTraining",
                                      config_file=config, debug_dir=tmp_path / "d")
    convert(settings, progress)
    assert steps["layer report"] == [6, 6]


@pytest.mark.skipif(not os.environ.get("PTQCONV_CORPUS"), reason="no corpus ($PTQCONV_CORPUS)")
def test_the_suggested_skip_names_nodes_of_the_users_model(tmp_path, capsys):
    """all_minilm_l6_v2's worst tensor is a SmoothQuant output: the report suggested the Mul
    ptqconv inserts (gelu_smooth), which is no node of the model, and following the
    suggestion failed. Its readers are suggested, and following them converts."""
    from pathlib import Path

    root = Path(os.environ["PTQCONV_CORPUS"]) / "all_minilm_l6_v2"
    paths = ",".join(f"{n}:{root / 'calib' / n}" for n in ("input_ids", "attention_mask"))
    base = (f"[data_preprocess_param]\ncalibrate_path={paths}\ncalibrate_size=8\n"
            "[full_quant_param]\nlatency_aware=false\nactivation_quant_method=MAX_MIN\n"
            # 7-bit weights put a layer past the skip thresholds; with 8 (VNNI) none is.
            "target_device=x86_avx2\n")
    config = tmp_path / "a.ini"
    config.write_text(base)
    args = [f"--modelFile={root / 'model.onnx'}", "--quantType=PostTraining", "--quiet"]
    assert main([*args, f"--outputFile={tmp_path / 'a.onnx'}", f"--configFile={config}",
                 f"--debugDir={tmp_path / 'debug'}"]) == 0
    report = json.loads((tmp_path / "debug" / "layer_report.json").read_text())
    suggested = report["suggested_skip_quant_node"]
    assert suggested and not any(name.endswith("_smooth") for name in suggested)
    config.write_text(base + f"[common_quant_param]\nskip_quant_node={','.join(suggested)}\n")
    assert main([*args, f"--outputFile={tmp_path / 'b.onnx'}", f"--configFile={config}"]) == 0, \
        capsys.readouterr().err


def test_a_report_without_rows_has_no_heading_over_nothing(tmp_path):
    from ptqconv.debug.layer_report import LayerReport
    from ptqconv.report import layer_report_lines

    empty = LayerReport(tmp_path / "layers.csv", [], [], [])
    assert layer_report_lines(empty) == [f"  per-layer report: {tmp_path / 'layers.csv'} "
                                         "(0 tensors)"]
    row = dict(tensor_name="t", kind="activation", node_name="n", channel_sqnr_db=20.0,
               rmse_over_scale=0.3, clip_rate=0.0, cos_similarity=0.999)
    lines = layer_report_lines(LayerReport(tmp_path / "layers.csv", [row], [row], []))
    assert lines[0].endswith("(1 tensor); worst by per-channel SQNR:") and len(lines) == 2
