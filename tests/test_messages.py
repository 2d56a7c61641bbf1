"""Messages a user needs: one line whatever a file is called, the culprit of a huge shape,
misspelt or contradicting settings, the shape read from a file, progress in CI logs, figures
that can be told apart."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from harness import cli, digits_workspace, error_line, fails, subprocess_cli
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from ptqconv import cli as cli_module
from ptqconv.calibrate.dataset import CalibrationSet
from ptqconv.cli import Stopped, main


def _pt(files, *extra: str) -> list[str]:
    return [f"--modelFile={files['model']}", f"--outputFile={files['model'].parent / 'o.onnx'}",
            "--quantType=PostTraining", f"--configFile={files['config']}", *extra]


def _wq(files, *extra: str) -> list[str]:
    return [f"--modelFile={files['model']}", f"--outputFile={files['model'].parent / 'o.onnx'}",
            "--quantType=WeightQuant", *extra]


def _double_samples(files) -> None:
    for path in files["calib"].iterdir():
        path.write_bytes(path.read_bytes() * 2)


def test_input_shape_flag_wins_over_the_config(tmp_path, capsys):
    files = digits_workspace(tmp_path)  # the config says input:1,1,8,8
    _double_samples(files)
    fails(capsys, tmp_path, _pt(files), 2, "is 512 bytes; expected 256")
    status, _, err = cli(capsys, *_pt(files, "--inputShape=input:2,1,8,8"))
    assert status == 0, err
    fails(capsys, tmp_path, _pt(files, "--inputShape=input:4,1,8,8"), 2, "[4,1,8,8]")


@pytest.mark.parametrize("name", ["bad\nname.onnx", "bad\rname\x1b.onnx"])
def test_control_characters_in_a_file_name_stay_on_one_line(tmp_path, capsys, name):
    files = digits_workspace(tmp_path)
    bad = tmp_path / name
    bad.write_bytes(b"not a model")
    args = _wq(files)
    args[0] = f"--modelFile={bad}"
    line = fails(capsys, tmp_path, args, 1, "not an ONNX model")
    assert repr(name)[1:-1] in line


@pytest.mark.parametrize("kind", ["WeightQuant", "PostTraining"])
def test_file_names_that_are_not_utf8(tmp_path, capsys, kind):
    files = digits_workspace(tmp_path)
    model = tmp_path / os.fsdecode(b"m\xff.onnx")
    shutil.copy(files["model"], model)
    args = _wq(files) if kind == "WeightQuant" else _pt(files)
    args[0] = f"--modelFile={model}"
    status, out, err = cli(capsys, *args)
    assert status == 0, err
    assert "m\\udcff.onnx' ->" in out
    model.write_bytes(b"junk")
    fails(capsys, tmp_path, args, 1, "m\\udcff.onnx': not an ONNX model")


def _one_input_model(root, dims) -> dict:
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(root / "m.onnx"))
    (root / "calib").mkdir()
    (root / "c.ini").write_text("[data_preprocess_param]\ncalibrate_path=x:calib\n")
    return {"model": root / "m.onnx", "config": root / "c.ini", "calib": root / "calib"}


@pytest.mark.parametrize(("dims", "flag", "status"), [
    ([1, 3, 100_000, 100_000], None, 1),  # the model declares it: the model is the culprit
    (["a", "b"], "--inputShape=x:100000,1000000", 2),  # given: the flag is
    ([1, "n"], None, 2),  # read from the file's size: the file is
])
def test_a_sample_too_big_for_memory_is_refused_before_allocating(tmp_path, capsys, dims, flag,
                                                                  status):
    files = _one_input_model(tmp_path, dims)
    size = 4 * (100_000 * 100_000 * 3 if dims[0] == 1 and len(dims) == 4 else 100_000_000_000)
    with (files["calib"] / "0.bin").open("wb") as handle:
        handle.truncate(size)  # sparse: the size matches, the memory does not exist
    args = _pt(files, *([flag] if flag else []))
    before = {"0.bin": (files["calib"] / "0.bin").stat().st_size}
    got, _, err = cli(capsys, *args)
    line = error_line(err)
    assert got == status, line
    assert "input 'x': one sample of float32" in line and f"needs {size} bytes" in line
    assert {p.name: p.stat().st_size for p in files["calib"].iterdir()} == before
    assert not (tmp_path / "o.onnx").exists()


def test_skip_quant_node_names_matching_nothing_are_refused(tmp_path, capsys):
    files = digits_workspace(tmp_path, config="[common_quant_param]\nskip_quant_node=Comv\n")
    line = fails(capsys, tmp_path, _pt(files), 2, "c.ini:6: [common_quant_param] "
                  "skip_quant_node: 'Comv' matches no node name or op type", "'Conv'")
    assert "did you mean" in line
    files["config"].write_text(files["config"].read_text().replace("Comv", "Conv"))
    fails(capsys, tmp_path, _wq(files, "--skipQuantNode=/fc2/Gem"), 2,
           "--skipQuantNode: '/fc2/Gem' matches no node", "did you mean '/fc2/Gemm'")
    # An exporter's name holds the module's: fc2 suggests /fc2/Gemm.
    fails(capsys, tmp_path, _wq(files, "--skipQuantNode=fc2"), 2,
          "--skipQuantNode: 'fc2' matches no node", "did you mean '/fc2/Gemm'")
    status, _, err = cli(capsys, *_wq(files, "--skipQuantNode=/fc2/Gemm,Relu"))
    assert status == 0, err


@pytest.mark.parametrize("samples, found", [(5, "5 files"), (1, "1 file in")])
def test_calibrate_size_above_the_files_is_refused(tmp_path, capsys, samples, found):
    files = digits_workspace(tmp_path, samples=samples)
    files["config"].write_text(files["config"].read_text().replace(
        f"calibrate_size={samples}", "calibrate_size=50"))
    fails(capsys, tmp_path, _pt(files), 2,
           "c.ini:3: [data_preprocess_param] calibrate_size: 50 samples asked for, but input "
           f"'input' has only {found}")


def test_a_post_training_key_given_to_weight_quant_is_refused_unless_it_reads_it(
        tmp_path, capsys):
    files = digits_workspace(tmp_path, config="[full_quant_param]\nactivation_quant_method=KL\n")
    args = _wq(files, "--bitNum=8", f"--configFile={files['config']}")
    fails(capsys, tmp_path, args, 2, "[full_quant_param] activation_quant_method: "
          "[full_quant_param] is for --quantType=PostTraining, not WeightQuant")
    # GPTQ calibrates on thread_num threads: MindSpore's key, where its docs put it.
    files["config"].write_text(files["config"].read_text().replace(
        "activation_quant_method=KL", "thread_num=2\n[weight_quant_param]\nquant_strategy=GPTQ"))
    status, _, err = cli(capsys, *args)
    assert status == 0, err


@pytest.mark.parametrize("ask", ["--debugDir", "--sensitivity"])
def test_post_training_debugging_asked_of_weight_quant_is_refused(tmp_path, capsys, ask):
    files = digits_workspace(tmp_path)
    args = _wq(files, "--sensitivity" if ask == "--sensitivity" else "--debugDir=dbg")
    fails(capsys, tmp_path, args, 2, ask, "is for --quantType=PostTraining")


def test_debug_info_save_path_of_a_weight_quant_config_writes_nothing(tmp_path, capsys):
    # MindSpore's documented weight quantization config sets it; it must convert unchanged.
    files = digits_workspace(tmp_path)
    files["config"].write_text("[common_quant_param]\ndebug_info_save_path=dbg\n")
    status, _, err = cli(capsys, *_wq(files, f"--configFile={files['config']}"))
    assert status == 0, err
    assert not (files["config"].parent / "dbg").exists()


def test_a_config_quant_type_contradicting_the_flag_is_refused(tmp_path, capsys):
    files = digits_workspace(tmp_path, config="[common_quant_param]\nquant_type=WEIGHT_QUANT\n")
    fails(capsys, tmp_path, _pt(files), 2, "--quantType=PostTraining contradicts",
           "c.ini:6: [common_quant_param] quant_type=WeightQuant")


def test_samples_of_different_batches_or_lengths(tmp_path, capsys):
    """Each file's size gives its own sample's length along the one dynamic dimension."""
    files = digits_workspace(tmp_path)
    files["config"].write_text("[data_preprocess_param]\ncalibrate_path=input:calib\n")
    for path in sorted(files["calib"].iterdir())[::3]:
        path.write_bytes(path.read_bytes() * 3)
    status, out, err = cli(capsys, *_pt(files))
    assert status == 0, err
    assert ("calibration data: input 'input' read as float32 [1..3,1,8,8] (from each file's "
            "size)") in out


def test_samples_holding_several_batches(tmp_path, capsys):
    files = digits_workspace(tmp_path)
    files["config"].write_text("[data_preprocess_param]\ncalibrate_path=input:calib\n")
    _double_samples(files)
    # A dynamic batch is read from the file size, and the summary says so.
    status, out, err = cli(capsys, *_pt(files))
    assert status == 0, err
    assert ("calibration data: input 'input' read as float32 [2,1,8,8] (from the size of "
            "000000.bin)") in out
    # float32 samples saved as float64 (numpy's default) would pass as two garbage samples.
    first = sorted(files["calib"].iterdir())[0]
    doubled = first.read_bytes()
    noisy = np.fromfile(first, np.float32)[:64] + np.random.default_rng(0).random(64, np.float32)
    noisy.astype(np.float64).tofile(first)
    fails(capsys, tmp_path, _pt(files), 2, "000000.bin holds float64 values, it seems",
          "save them with .astype(numpy.float32)")
    first.write_bytes(doubled)
    # A fixed batch is refused, saying what the file holds.
    proto = onnx.load(str(files["model"]))
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(proto, str(files["model"]))
    fails(capsys, tmp_path, _pt(files), 2, "000000.bin is 512 bytes; expected 256",
           "that is the size of one sample of float64 values (the model takes float32: save "
           "them with .astype(numpy.float32)) or of 2 samples (one file is one sample, and the "
           "model's batch dimension is fixed at 1)")
    # Half the size: int64 token ids saved as int32 are named before float32.
    ids = tmp_path / "ids"
    ids.mkdir()
    np.arange(8, dtype=np.int32).tofile(ids / "000000.bin")
    from models import embedding, save
    src = save(embedding(), tmp_path / "e.onnx")
    (tmp_path / "e.ini").write_text(f"[data_preprocess_param]\ncalibrate_path=ids:{ids}\n")
    fails(capsys, tmp_path, [f"--modelFile={src}", f"--outputFile={tmp_path / 'q.onnx'}",
                             "--quantType=PostTraining", f"--configFile={tmp_path / 'e.ini'}"],
          2, "000000.bin is 32 bytes; expected 64 (int64 [1,8]); that is the size of one "
          "sample of int32 values (the model takes int64: save them with "
          ".astype(numpy.int64))")


def test_progress_in_ci_logs_is_a_plain_line_every_few_seconds(tmp_path):
    files = digits_workspace(tmp_path / "w")
    faster = "import ptqconv.cli\nptqconv.cli.PLAIN_PROGRESS_SECONDS = 0\n"
    process = subprocess_cli(_pt(files), tmp_path, faster)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert "ptqconv: calibrating (AUTO): 100% (10 of 10)," in err
    assert "\r" not in err and "\x1b" not in err
    process = subprocess_cli([*_pt(files), "--quiet"], tmp_path, faster)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0 and out == err == ""


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_cursor_is_shown_again_after_an_interruption(tmp_path, monkeypatch):
    files = digits_workspace(tmp_path)
    samples = CalibrationSet.__iter__

    def interrupted(self):
        for index, sample in enumerate(samples(self)):
            if index == 5:
                raise Stopped(2)
            yield sample

    monkeypatch.setattr(CalibrationSet, "__iter__", interrupted)
    terminal = _Terminal()
    monkeypatch.setattr(cli_module.sys, "stderr", terminal)
    assert main(_pt(files)) == 130
    shown = terminal.getvalue()
    assert "\x1b[?25l" in shown  # the bar hid the cursor
    assert shown.rindex("\x1b[?25h") > shown.rindex("\x1b[?25l")
    assert shown.endswith("ptqconv: error: interrupted\n")
    assert np.array_equal(sorted(p.name for p in tmp_path.iterdir()), ["c.ini", "calib", "m.onnx"])


@pytest.mark.parametrize(("bits", "warned"), [(8, False), (1, True)])
def test_weight_quant_states_its_output_error_on_the_sample_it_timed(tmp_path, capsys, bits,
                                                                     warned):
    """WeightQuant has no held-out samples: the sample it times both models on gives the
    output error, and a warning where it is above 10 dB."""
    files = digits_workspace(tmp_path)
    status, out, err = cli(capsys, *_wq(files, f"--bitNum={bits}"))
    assert status == 0, err
    line = next(x for x in out.splitlines() if "output error against float" in x)
    assert line.startswith("  output error against float on a seeded random input: ")
    error = float(line.split(": ")[1].split()[0])
    assert (error >= 0.1) == warned
    assert ("  warning: above 0.1 (about 10 dB) on this one sample" in out) == warned


@pytest.mark.parametrize(("bits", "target", "levels"), [
    (8, "7-bit GEMM weights (reduce_range)", "levels [-63, 63], reduce_range"),
    (4, "4-bit weights", "levels [-7, 7]"),
    (1, "1-bit weights", "binary levels {-1, +1}")])
def test_the_weight_lines_state_the_bits_written(tmp_path, capsys, bits, target, levels):
    """reduce_range caps only 8-bit weights; 1 bit is the binary grid, not [-1, 1]."""
    files = digits_workspace(tmp_path, config="[full_quant_param]\nmeasure_latency=false\n"
                                              "target_device=x86_avx2\n")
    status, out, err = cli(capsys, *_pt(files, f"--bitNum={bits}"))
    assert status == 0, err
    assert f"x86_avx2 (given: x86 without VNNI): {target}\n" in out, out
    assert f"(int8 symmetric per-channel, {levels})\n" in out, out


def test_a_model_onnx_accepts_and_onnxruntime_refuses_is_named_as_the_culprit(tmp_path,
                                                                            capsys):
    """Duplicate node names pass onnx's checker; onnxruntime refuses the model, and then
    the quantized one: the message names the model given, not the output."""
    rng = np.random.default_rng(0)
    w1, w2 = (rng.standard_normal((64, 64)).astype(np.float32) for _ in range(2))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="n"),
         helper.make_node("MatMul", ["h", "w2"], ["y"], name="n")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        [onnx.numpy_helper.from_array(w1, "w1"), onnx.numpy_helper.from_array(w2, "w2")])
    src = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), src)
    line = fails(capsys, tmp_path, [f"--modelFile={src}", f"--outputFile={tmp_path / 'q.onnx'}",
                                    "--quantType=WeightQuant"], 1,
                 f"{src}: onnxruntime cannot load the model", "nothing was written")
    assert "the quantized model" not in line


def test_calibration_samples_that_are_all_the_same_are_warned_about(tmp_path, capsys):
    files = digits_workspace(tmp_path)
    files["config"].write_text("[data_preprocess_param]\ncalibrate_path=input:calib\n")
    status, out, err = cli(capsys, *_pt(files))
    assert status == 0, err
    assert "are all the same bytes" not in out
    paths = sorted(files["calib"].iterdir())
    for path in paths[1:]:
        path.write_bytes(paths[0].read_bytes())
    status, out, err = cli(capsys, *_pt(files))
    assert status == 0, err
    assert (f"warning: calibration data: the {len(paths)} samples of input 'input' are all "
            "the same bytes: every range fits that one sample") in out


def test_a_calibration_sample_far_above_the_others_is_named(tmp_path, capsys):
    """One sample saved unnormalized (0-255 among 0-1 images, or a corrupted value) sets
    every MAX_MIN range it reaches: the summary names the file."""
    files = digits_workspace(tmp_path)
    files["config"].write_text("[data_preprocess_param]\ncalibrate_path=input:calib\n")
    paths = sorted(files["calib"].iterdir())
    status, out, err = cli(capsys, *_pt(files))
    assert status == 0, err
    assert "unnormalized sample" not in out
    x = np.fromfile(paths[3], np.float32)
    (x * 255).tofile(paths[3])
    status, out, err = cli(capsys, *_pt(files))
    assert status == 0, err
    assert f"warning: calibration data: input 'input': {paths[3]} reaches " in out, out
    assert "a corrupted or unnormalized sample?" in out


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(1.0, 10.0), min_size=8, max_size=60), st.integers(0, 3),
       st.floats(100.0, 1e30))
def test_only_few_samples_far_above_the_median_are_outliers(peaks, strays, factor):
    """Natural spread is never flagged; a few samples 100x above the median are; many such
    samples are a distribution and are not."""
    from ptqconv.calibrate.dataset import outlying

    paths = [Path(f"{i}.bin") for i in range(len(peaks) + strays)]
    assert outlying("x", list(zip(paths, peaks, strict=False))) == ()
    stray = [max(peaks) * factor * 1.01] * strays  # above 100x any median they leave
    found = outlying("x", list(zip(paths, peaks + stray, strict=True)))
    allowed = max(1, (len(peaks) + strays) // 20)
    assert len(found) == (strays if strays <= allowed else 0)
    assert all(o.path in paths[len(peaks):] for o in found)


def test_a_sample_the_model_refuses_is_named_with_its_file(tmp_path, capsys):
    """Token ids out of a table's range pass every file check; onnxruntime refuses them at
    run time. The error names the file, exits 2 (the data is wrong), and onnxruntime's own
    coloured log line is not printed before it."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["t", "i"], ["e"]),
         helper.make_node("MatMul", ["e", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("i", TensorProto.INT64, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(rng.standard_normal((50, 64)).astype(np.float32), "t"),
         onnx.numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "w")])
    src = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), src)
    ids = [rng.integers(0, 50, (1, 4)) for _ in range(4)]
    ids[2][0, 1] = 999
    data = tmp_path / "i"
    data.mkdir()
    for k, a in enumerate(ids):
        a.astype(np.int64).tofile(data / f"{k:04d}.bin")
    config = tmp_path / "c.ini"
    config.write_text(f"[data_preprocess_param]\ncalibrate_path=i:{data}\n")
    child = subprocess_cli([f"--modelFile={src}", f"--outputFile={tmp_path / 'q.onnx'}",
                            "--quantType=PostTraining", f"--configFile={config}"], tmp_path)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 2, err
    assert err.startswith(
        f"ptqconv: error: calibration: inference failed on sample 2 ({data / '0002.bin'}): ")
    assert "idx=999" in err and "\x1b[" not in err
    assert not (tmp_path / "q.onnx").exists()


def test_a_file_of_the_wrong_size_names_the_likely_causes(tmp_path, capsys):
    """Directories given in the wrong order (the file is the other input's sample) and a
    stray file that is no sample were blamed on float16 or on the shape."""
    from ptqconv.calibrate.dataset import InputSpec

    a = InputSpec("a", np.dtype(np.float32), (1, 16))
    b = InputSpec("b", np.dtype(np.int64), (1, 4))
    da, db = tmp_path / "first", tmp_path / "second"
    for d, arr in ((da, np.zeros((1, 16), np.float32)), (db, np.zeros((1, 4), np.int64))):
        d.mkdir()
        arr.tofile(d / "0.bin")
    with pytest.raises(Exception, match="that is the size of a sample of input 'b' "
                       r"\(int64 \[1,4\]: directories in the wrong order\?\)"):
        CalibrationSet.open([a, b], [(None, db), (None, da)], count=1)
    (da / "notes.txt").write_text("calibration notes\n")
    with pytest.raises(Exception, match=r"notes\.txt is no \.bin file: is it a sample\?"):
        CalibrationSet.open([a, b], [(None, da), (None, db)], count=2)
    (db / "1.bin").write_bytes((db / "0.bin").read_bytes())
    with pytest.raises(Exception, match=r"is it a sample\? Every file of the directory but "
                       r"hidden ones is read as one"):
        CalibrationSet.open([a, b], [(None, da), (None, db)], count=2)


def test_directories_by_position_named_after_another_input_are_refused(tmp_path):
    """all_minilm_l6_v2 with its two int64 directories swapped by position converted in
    silence (embedding cosine 0.9968 -> 0.9876)."""
    from ptqconv.calibrate.dataset import InputSpec

    ids = InputSpec("input_ids", np.dtype(np.int64), (1, 8))
    mask = InputSpec("attention_mask", np.dtype(np.int64), (1, 8))
    for name in ("input_ids", "attention_mask"):
        (tmp_path / name).mkdir()
        np.ones((1, 8), np.int64).tofile(tmp_path / name / "0.bin")
    with pytest.raises(Exception, match=r"given by position for input 'input_ids', is named "
                       r"after input 'attention_mask'; give the directories in the model's "
                       r"input order"):
        CalibrationSet.open([ids, mask], [(None, tmp_path / "attention_mask"),
                                          (None, tmp_path / "input_ids")], count=1)
    CalibrationSet.open([ids, mask], [(None, tmp_path / "input_ids"),
                                      (None, tmp_path / "attention_mask")], count=1)


def test_nodes_skip_quant_node_keeps_float_are_named_in_the_summary(tmp_path, capsys):
    files = digits_workspace(tmp_path)
    status, out, err = cli(capsys, *_pt(files), "--skipQuantNode=/fc2/Gemm")
    assert status == 0, err
    assert "  kept float by skip_quant_node: 1 node (/fc2/Gemm)\n" in out


@given(st.floats(1e-12, 1e6), st.floats(1e-12, 1e6))
def test_two_errors_are_shown_apart_unless_they_agree_to_six_digits(a, b):
    from ptqconv.report import distinct

    shown = distinct(a, b)
    assert all(abs(float(x) - v) <= 5e-3 * v for x, v in zip(shown, (a, b), strict=True))
    if f"{a:.6g}" != f"{b:.6g}":
        assert shown[0] != shown[1]
    if f"{a:.3g}" != f"{b:.3g}" or f"{a:.6g}" == f"{b:.6g}":  # no more digits than needed
        assert shown == (f"{a:.3g}", f"{b:.3g}")
