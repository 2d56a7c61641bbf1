"""MindSpore Lite's documented example configs (configs/mindspore/) convert shared-corpus models
unchanged, but for the calibration directory; skipped without the corpus
($PTQCONV_CORPUS or ../corpus_out)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from harness import optimized_ops
from models import REPO
from PIL import Image

import ptqconv
from ptqconv.cli import main

CONFIGS = REPO / "configs" / "mindspore"
CORPUS = next((p for p in (Path(os.environ.get("PTQCONV_CORPUS", "/nonexistent")),
                           REPO.parent / "corpus_out", REPO.parent.parent / "corpus_out")
               if (p / "mobilenet_v2" / "model.onnx").exists()), None)
needs_corpus = pytest.mark.skipif(CORPUS is None, reason="no shared corpus")


def eval_sample(model: str) -> dict[str, np.ndarray]:
    root = CORPUS / model
    manifest = json.loads((root / "manifest.json").read_text())
    return {x["name"]: np.fromfile(root / "eval" / x["dir"] / "000000.bin", x["dtype"])
            .reshape(x["shape"]) for x in manifest["inputs"]}


def cosine(a, b) -> float:
    a, b = np.ravel(a), np.ravel(b)
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def run(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


@needs_corpus
def test_full_quant_config_with_images_converts_mobilenet_v2(tmp_path):
    # The corpus' ImageNet-normalized calibration samples back as RGB images, shifted
    # copies added up to the example's calibrate_size=100 (fewer files is an error).
    images = tmp_path / "images"
    images.mkdir()
    mean = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
    std = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]
    for path in sorted((CORPUS / "mobilenet_v2" / "calib" / "input").iterdir()):
        x = np.fromfile(path, "<f4").reshape(3, 224, 224)
        rgb = np.clip(np.rint((x * std + mean) * 255), 0, 255).astype(np.uint8)
        for shift in range(5):
            Image.fromarray(np.roll(rgb.transpose(1, 2, 0), 16 * shift, axis=1)).save(
                images / f"{path.stem}_{shift}.png")
    text = (CONFIGS / "full_quant.cfg").read_text()
    assert "calibrate_path=input:images\n" in text
    config = tmp_path / "full_quant.cfg"
    config.write_text(text)  # unchanged: its images directory is now beside it
    model, out = CORPUS / "mobilenet_v2" / "model.onnx", tmp_path / "q.onnx"
    report = ptqconv.convert(model, out, config_file=config)
    assert report.quant_type == "PostTraining" and report.post_training.samples == 100
    assert report.post_training.method == "MAX_MIN"
    assert "normalize mean [127.5, 127.5, 127.5] std [127.5, 127.5, 127.5]" in report.format()
    plan = report.post_training.latency_plan  # x86 without VNNI: a few convs float for speed
    kept = sum(c.op_type == "Conv" for c in plan.kept_float) if plan is not None else 0
    assert optimized_ops(out, tmp_path)["QLinearConv"] == 52 - kept and kept <= 8
    sample = eval_sample("mobilenet_v2")
    # The example's normalization is not this model's, so the ranges are approximate.
    assert cosine(run(out, sample), run(model, sample)) > 0.7


@needs_corpus
def test_weight_quant_config_converts_mobilenet_v2(tmp_path):
    model, out = CORPUS / "mobilenet_v2" / "model.onnx", tmp_path / "q.onnx"
    report = ptqconv.convert(model, out, config_file=CONFIGS / "weight_quant.cfg")
    assert report.quant_type == "WeightQuant" and len(report.quantized) == 52
    sample = eval_sample("mobilenet_v2")
    assert cosine(run(out, sample), run(model, sample)) > 0.9


@needs_corpus
def test_common_quant_param_example_converts_once_its_placeholder_names_are_real(tmp_path,
                                                                                  capsys):
    model, out = CORPUS / "mobilenet_v2" / "model.onnx", tmp_path / "q.onnx"
    status = main([f"--modelFile={model}", f"--outputFile={out}",
                   f"--configFile={CONFIGS / 'common_quant_param.cfg'}"])
    err = capsys.readouterr().err
    # A name that matches nothing would quantize the node it meant to keep float.
    assert status == 2 and "'node_name1' matches no node name or op type" in err
    assert not out.exists()
    text = (CONFIGS / "common_quant_param.cfg").read_text()
    config = tmp_path / "common_quant_param.cfg"
    config.write_text(text.replace("node_name1,node_name2,node_name3", "Conv"))
    report = ptqconv.convert(model, out, config_file=config)
    assert report.quant_type == "WeightQuant" and len(report.quantized) == 1  # the Gemm


@needs_corpus
def test_dynamic_quant_config_converts_the_transformer(tmp_path):
    model, out = CORPUS / "all_minilm_l6_v2" / "model.onnx", tmp_path / "q.onnx"
    report = ptqconv.convert(model, out, config_file=CONFIGS / "dynamic_quant.cfg")
    assert report.quant_type == "DynamicQuant" and report.size_after < report.size_before / 3
    assert optimized_ops(out, tmp_path)["DynamicQuantizeMatMul"] == 36
    sample = eval_sample("all_minilm_l6_v2")
    assert cosine(run(out, sample), run(model, sample)) > 0.98


@needs_corpus
def test_mixed_bit_config_converts_mobilenet_v2(tmp_path):
    model, out = CORPUS / "mobilenet_v2" / "model.onnx", tmp_path / "q.onnx"
    report = ptqconv.convert(model, out, config_file=CONFIGS / "mixed_bit_weight_quant.cfg")
    assert report.quant_type == "WeightQuant" and report.weight_quant.init_scale == 0.02
    # Each layer at the fewest bits its relative error allows: below 8 on average.
    bits = {w.bits for w in report.quantized}
    assert report.size_after < report.size_before / 3 and len(bits) > 1 and max(bits) <= 8
    assert "mixed bit: init_scale 0.02" in report.format()
    sample = eval_sample("mobilenet_v2")
    assert cosine(run(out, sample), run(model, sample)) > 0.9


def test_every_example_config_parses():
    from ptqconv.config import load_config

    for path in sorted(CONFIGS.glob("*.cfg")):
        assert load_config(path).quant_type is not None, path
