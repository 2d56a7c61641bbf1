"""input_type=IMAGE and --inputDataFormat: images made here, decoded by Pillow, preprocessed as
converter_lite does and fed in the model's layout; NHWC .bin samples transposed."""

from __future__ import annotations

import numpy as np
import pytest
from models import DIGITS, conv_net, save
from PIL import Image

import ptqconv
from ptqconv.calibrate.dataset import CalibrationSet, InputSpec
from ptqconv.calibrate.images import ImagePreprocess
from ptqconv.cli import main
from ptqconv.errors import PtqUsageError

MODEL = DIGITS / "model.onnx"
CALIB = DIGITS / "calib" / "input"
# Set, every choice is fixed: left out, AUTO measures and the latency check times, and a
# close timing may pick another model in each of the runs these tests compare byte for byte.
FIXED = """
[full_quant_param]
activation_quant_method=MAX_MIN
bias_correction=false
equalize=false
smooth_quant=false
latency_aware=true
"""


def digit_pngs(directory, count=12, suffix=".png"):
    """The digits' calibration samples (raw 0..16 / 16) as 8-bit grey images, value * 240."""
    directory.mkdir()
    for path in sorted(CALIB.iterdir())[:count]:
        pixels = np.fromfile(path, "<f4").reshape(8, 8)
        Image.fromarray(np.rint(pixels * 240).astype(np.uint8), "L").save(
            directory / (path.stem + suffix))
    return directory


def image_config(path, directory, extra=""):
    path.write_text(f"[data_preprocess_param]\ncalibrate_path=input:{directory}\n"
                    f"calibrate_size=12\ninput_type=IMAGE\nimage_to_format=GRAY\n"
                    f"normalize_mean=[0]\nnormalize_std=[240]\n{extra}{FIXED}")
    return path


def test_grey_images_reproduce_the_bin_samples_and_the_same_model(tmp_path):
    pngs = digit_pngs(tmp_path / "png")
    bins = tmp_path / "bin.ini"
    bins.write_text(f"[data_preprocess_param]\ncalibrate_path=input:{CALIB}\n"
                    f"calibrate_size=12\ninput_shape=input:1,1,8,8\n{FIXED}")
    from_images = ptqconv.convert(MODEL, tmp_path / "a.onnx", "PostTraining",
                                  config_file=image_config(tmp_path / "img.ini", pngs))
    ptqconv.convert(MODEL, tmp_path / "b.onnx", "PostTraining", config_file=bins)
    # (p - 0) / 240 with p = 15 r is exactly r / 16: the same calibration, the same bytes.
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert "data: images, GRAY, normalize mean [0] std [240], into the model's NCHW" \
        in from_images.format()


def test_rgb_pipeline_resize_crop_normalize_in_order(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(tmp_path / "a.png")
    step = ImagePreprocess("BGR", resize=(20, 15), resize_method="NEAREST",
                           center_crop=(10, 5), mean=(1.0, 2.0, 3.0), std=(2.0, 4.0, 8.0))
    got = step.load(tmp_path / "a.png", "data", "x")
    resized = np.asarray(Image.fromarray(pixels).resize((20, 15), Image.Resampling.NEAREST))
    expected = resized[5:10, 5:15, ::-1].astype(np.float32)  # OpenCV's centre offsets, BGR
    expected = (expected - np.array([1, 2, 3], np.float32)) / np.array([2, 4, 8], np.float32)
    assert got.shape == (5, 10, 3) and np.array_equal(got, expected)
    assert step.output_size(tmp_path / "a.png", "data", "x") == (5, 10)


def test_image_set_feeds_nchw_and_nhwc_models_and_checks_headers_first(tmp_path):
    rng = np.random.default_rng(1)
    (tmp_path / "d").mkdir()
    for k in range(3):
        Image.fromarray(rng.integers(0, 256, (6, 4, 3), dtype=np.uint8)).save(
            tmp_path / "d" / f"{k}.jpg", quality=95)
    rgb = ImagePreprocess("RGB")
    nchw = InputSpec("x", np.dtype(np.float32), ("N", 3, 6, 4), "NCHW")
    nhwc = InputSpec("x", np.dtype(np.float32), (1, 6, 4, 3), "NHWC")
    a = next(iter(CalibrationSet.open([nchw], [(None, tmp_path / "d")], 3, image=rgb)))["x"]
    b = next(iter(CalibrationSet.open([nhwc], [(None, tmp_path / "d")], 3, image=rgb)))["x"]
    assert a.shape == (1, 3, 6, 4) and b.shape == (1, 6, 4, 3)
    assert np.array_equal(a, b.transpose(0, 3, 1, 2))
    small = InputSpec("x", np.dtype(np.float32), (1, 3, 8, 8), "NCHW")
    with pytest.raises(PtqUsageError, match=r"images give \[1,3,6,4\] .* takes \[1,3,8,8\]"):
        CalibrationSet.open([small], [(None, tmp_path / "d")], 3, image=rgb)
    (tmp_path / "d" / "3.png").write_bytes(b"not an image")
    with pytest.raises(PtqUsageError, match=r"3\.png is not an image Pillow can read"):
        CalibrationSet.open([nchw], [(None, tmp_path / "d")], 4, image=rgb)


def test_nhwc_bins_are_transposed_to_the_model_layout(tmp_path):
    model = save(conv_net(), tmp_path / "conv.onnx")
    rng = np.random.default_rng(2)
    for name in ("nchw", "nhwc"):
        (tmp_path / name).mkdir()
    for k in range(4):
        x = rng.standard_normal((1, 3, 16, 16)).astype("<f4")
        x.tofile(tmp_path / "nchw" / f"{k}.bin")
        x.transpose(0, 2, 3, 1).copy().tofile(tmp_path / "nhwc" / f"{k}.bin")
    outputs, summaries = [], []
    for name, layout in (("nchw", None), ("nhwc", "NHWC"), ("nchw", "NCHW")):
        config = tmp_path / f"{name}.ini"
        config.write_text(f"[data_preprocess_param]\ncalibrate_path=x:{tmp_path / name}\n"
                          f"calibrate_size=4\n{FIXED}")
        out = tmp_path / f"{name}-{layout}.onnx"
        report = ptqconv.convert(model, out, "PostTraining", config_file=config,
                                 input_data_format=layout)
        outputs.append(out.read_bytes())
        summaries.append(report.format())
    assert outputs[0] == outputs[1] == outputs[2]
    assert "data: .bin samples in the model's NCHW layout" in summaries[0]
    assert "in NHWC (--inputDataFormat), transposed to the model's NCHW" in summaries[1]
    assert "in NCHW (--inputDataFormat), the model's layout" in summaries[2]


def test_eval_images_and_benchmark_images(tmp_path, capsys):
    pngs = digit_pngs(tmp_path / "png")
    config = image_config(tmp_path / "img.ini", pngs)
    config.write_text(config.read_text() + f"[evaluate_param]\neval_path=input:{pngs}\n")
    out = tmp_path / "q.onnx"
    report = ptqconv.convert(MODEL, out, "PostTraining", config_file=config,
                             cosine_threshold=0.99)
    assert report.passed and report.gate is not None and report.gate.samples == 12
    status = main(["benchmark", f"--modelFile={out}", f"--referenceModel={MODEL}",
                   f"--inDataDir=input:{pngs}", f"--configFile={config}",
                   "--accuracyThreshold=100", "--cosineDistanceThreshold=0.99"])
    printed = capsys.readouterr().out
    assert status == 0, printed
    assert "12 samples" in printed and "inputs: images, GRAY" in printed


@pytest.mark.parametrize(("extra", "message"), [
    ("resize_width=8\n", "resize_width: needs resize_height too"),
    ("resize_method=CUBIC\n", "resize_method: needs resize_width and resize_height"),
    ("center_crop_height=4\n", "center_crop_height: needs center_crop_width too"),
])
def test_image_key_combinations_are_one_line_errors(tmp_path, capsys, extra, message):
    config = image_config(tmp_path / "c.ini", tmp_path, extra)
    status = main([f"--modelFile={MODEL}", f"--outputFile={tmp_path / 'o.onnx'}",
                   "--quantType=PostTraining", f"--configFile={config}"])
    err = capsys.readouterr().err
    assert status == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.onnx").exists()


def test_image_keys_without_input_type_image_are_refused(tmp_path):
    config = tmp_path / "c.ini"
    config.write_text(f"[data_preprocess_param]\ncalibrate_path=input:{CALIB}\n"
                      "image_to_format=RGB\n")
    with pytest.raises(PtqUsageError, match=r"c.ini:3: \[data_preprocess_param\] "
                       r"image_to_format: applies to input_type=IMAGE only"):
        ptqconv.convert(MODEL, tmp_path / "o.onnx", "PostTraining", config_file=config)
