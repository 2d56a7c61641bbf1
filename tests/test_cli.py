"""The command line: summary, help, and one-line errors with the right exit status."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from models import DIGITS, REPO, mlp, save
from onnx import TensorProto, helper, numpy_helper

from ptqconv.cli import main

MODEL = str(DIGITS / "model.onnx")


def cli(capsys, *args: str) -> tuple[int, str, str]:
    status = main(list(args))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_summary_lists_quantized_and_skipped_weights_sizes_and_time(tmp_path, capsys):
    out = tmp_path / "w8.onnx"
    status, stdout, _ = cli(
        capsys,
        "--fmk=ONNX",
        f"--modelFile={MODEL}",
        f"--outputFile={out}",
        "--quantType=WeightQuant",
        "--bitNum=8",
        "--quantWeightChannel=32",
    )
    assert status == 0 and out.exists()
    assert "weights quantized: 3 (stored as int8)" in stdout
    assert "weights skipped:   2" in stdout
    assert "32 output channels <= quantWeightChannel 32" in stdout
    assert "of float)" in stdout and "time:" in stdout


def test_console_script_and_help():
    result = subprocess.run(
        [sys.executable, "-m", "ptqconv.cli", "--help"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0
    for flag in (
        "--fmk",
        "--modelFile",
        "--outputFile",
        "--quantType",
        "--bitNum",
        "--quantWeightSize",
        "--quantWeightChannel",
        "--configFile",
        "Examples:",
    ):
        assert flag in result.stdout


def test_traceback_only_with_verbose(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage that protobuf may half-parse")
    status, _, err = cli(
        capsys,
        f"--modelFile={bad}",
        f"--outputFile={tmp_path / 'o.onnx'}",
        "--quantType=WeightQuant",
        "--verbose",
    )
    assert status == 1 and "Traceback" in err


def bad_cases(tmp_path):
    out = str(tmp_path / "out.onnx")
    text = tmp_path / "notes.txt"
    text.write_text("this is not a model\n")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    unreadable = tmp_path / "secret.onnx"
    save(mlp((8, 8)), unreadable)
    unreadable.chmod(0o000)
    base = [f"--modelFile={MODEL}", f"--outputFile={out}", "--quantType=WeightQuant"]
    return [
        (["--modelFile=missing.onnx", *base[1:]], 2, "--modelFile: no such file: missing.onnx"),
        ([f"--modelFile={unreadable}", *base[1:]], 2, "--modelFile: permission denied"),
        ([f"--modelFile={text}", *base[1:]], 1, "notes.txt: not an ONNX model"),
        ([f"--modelFile={tmp_path}", *base[1:]], 2, "--modelFile: is a directory"),
        (
            [*base[::2], f"--outputFile={tmp_path}/nodir/out.onnx"],
            2,
            "--outputFile: directory does not exist",
        ),
        (
            [*base[::2], f"--outputFile={locked}/out.onnx"],
            2,
            "--outputFile: directory is not writable",
        ),
        ([*base[::2], f"--outputFile={MODEL}"], 2, "is --modelFile, which this run reads"),
        (
            [*base, "--bitNum=17"],
            2,
            "--bitNum: 17 is out of range; allowed: [0, 16] for WeightQuant",
        ),
        ([*base, "--bitNum=-1"], 2, "--bitNum: -1 is out of range; allowed: [0, 16]"),
        ([*base, "--bitNum=eight"], 2, "--bitNum: 'eight' is not an integer; allowed: [0, 16]"),
        ([*base, "--bitNum=4.5"], 2, "--bitNum: '4.5' is not an integer"),
        (
            [*base, "--quantWeightSize=-1"],
            2,
            "--quantWeightSize: -1 is out of range; allowed: >= 0",
        ),
        (
            [*base, "--quantWeightChannel=-3"],
            2,
            "--quantWeightChannel: -3 is out of range; allowed: >= 0",
        ),
        (
            [*base[:2], "--quantType=Dynamic"],
            2,
            "--quantType: 'Dynamic' is not supported; allowed: WeightQuant, PostTraining",
        ),
        (base[:2], 2, "--quantType is required; allowed: WeightQuant, PostTraining"),
        ([*base, "--fmk=TF"], 2, "--fmk: 'TF' is not supported; allowed: ONNX"),
        ([*base, "--bitnum=8"], 2, "No such option '--bitnum'. Did you mean '--bitNum'?"),
        ([*base[:2], "--quantType=PostTraining"], 2, "--configFile is required"),
        # A directory that exists but takes no files (writable to root): not "no such file".
        *([([*base[::2], "--outputFile=/proc/ptqconv-test.onnx"], 1,
            "cannot write in /proc: it takes no new files")]
          if Path("/proc/self").is_dir() and os.access("/proc", os.W_OK) else []),
    ]


@pytest.mark.parametrize("case", range(18))
def test_bad_input_fails_with_one_line_and_writes_nothing(tmp_path, capsys, case):
    args, expected_status, message = bad_cases(tmp_path)[case]
    if os.geteuid() == 0 and ("permission denied" in message or "not writable" in message):
        pytest.skip("root bypasses file permissions")
    before = set(tmp_path.rglob("*"))
    status, _, err = cli(capsys, *args)
    assert status == expected_status
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("ptqconv: error: ")
    assert message in lines[0]
    assert "Traceback" not in err
    assert set(tmp_path.rglob("*")) == before


def post_training_cases(tmp_path):
    """(args, status, message) for bad PostTraining input: config, data, shapes."""
    from models import write_samples

    model = str(DIGITS / "model.onnx")
    out = str(tmp_path / "out.onnx")
    good = DIGITS / "calib" / "input"

    written = []

    def config(text: str, suffix: str = ".ini") -> str:
        path = tmp_path / f"c{len(written)}{suffix}"
        written.append(path)
        path.write_text(text)
        return str(path)

    short = write_samples(tmp_path / "short", [np.zeros(10, np.float32)])
    nan = write_samples(
        tmp_path / "nan",
        [np.zeros((1, 1, 8, 8), np.float32), np.full((1, 1, 8, 8), np.nan, np.float32)],
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    sequence_model = tmp_path / "sequence.onnx"
    seq = helper.make_tensor_sequence_value_info("input", TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("SequenceAt", ["input", "i"], ["o"])], "g",
                              [seq], [helper.make_tensor_value_info("o", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.array(0, np.int64), "i")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
              sequence_model)
    base = [f"--modelFile={model}", f"--outputFile={out}", "--quantType=PostTraining"]
    section = "[data_preprocess_param]\ncalibrate_path="
    return [
        (base, 2, "--configFile is required for --quantType=PostTraining"),
        ([*base, "--configFile=nope.cfg"], 2, "--configFile: no such file: nope.cfg"),
        (
            [*base, f"--configFile={config(section + f'input:{good}' + chr(10) + 'bogus=1')}"],
            2,
            "c0.ini:3: [data_preprocess_param] bogus is not supported",
        ),
        (
            [*base, f"--configFile={config('[full_quant_param]' + chr(10) + 'method=1')}"],
            2,
            "c1.ini:2: [full_quant_param] method is not supported",
        ),
        ([*base, f"--configFile={config(section + f'nosuch:{good}')}"], 2, "'nosuch' (directory"),
        (
            [*base, f"--configFile={config(section + f'input:{tmp_path}/missing')}"],
            2,
            "does not exist",
        ),
        ([*base, f"--configFile={config(section + f'input:{empty}')}"], 2, "has no data files"),
        (
            [*base, f"--configFile={config(section + f'input:{short}')}"],
            2,
            "000000.bin is 40 bytes",
        ),
        ([*base, f"--configFile={config(section + f'input:{nan}')}"], 2, "000001.bin holds NaN"),
        (
            [*base, "--bitNum=9", f"--configFile={config(section + f'input:{good}')}"],
            2,
            "--bitNum: 9 is out of range; allowed: [1, 8] for PostTraining",
        ),
        (
            [*base, f"--configFile={config('full_quant_param: [1, 2]', '.yaml')}"],
            2,
            "c8.yaml:1: section [full_quant_param] must be a mapping",
        ),
        (
            [f"--modelFile={sequence_model}", f"--outputFile={out}", "--quantType=PostTraining",
             f"--configFile={config(section + f'input:{good}')}"],
            1,  # an unsupported model, not a usage error
            "sequence.onnx: model input 'input' is a sequence, not a tensor",
        ),
    ]


@pytest.mark.parametrize("case", range(12))
def test_bad_post_training_input_fails_with_one_line_and_writes_nothing(tmp_path, capsys, case):
    args, expected_status, message = post_training_cases(tmp_path)[case]
    before = set(tmp_path.rglob("*"))
    status, _, err = cli(capsys, *args)
    assert status == expected_status, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert message in lines[0], lines[0]
    assert "Traceback" not in err
    assert set(tmp_path.rglob("*")) == before


def test_version_and_the_explicit_convert_command(tmp_path, capsys):
    from ptqconv import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"ptqconv, version {__version__}"
    out = tmp_path / "w8.onnx"
    status, stdout, _ = cli(capsys, "convert", f"--modelFile={MODEL}", f"--outputFile={out}",
                            "--quantType=WeightQuant")
    assert status == 0 and out.exists() and "WeightQuant 8-bit" in stdout
    status, _, err = cli(capsys, "--bogus")
    assert status == 2 and err.startswith("ptqconv: error: No such option '--bogus'")
    assert err.endswith("(see ptqconv --help)\n")


def test_mindspore_flags_without_meaning_here_say_why(capsys):
    for args, message in (
        (["--modelFile=m.onnx", "--weightFile=w.caffemodel"],
         "--weightFile (MindSpore's) has no meaning here: it is the weight file of Caffe"),
        (["benchmark", "--modelFile=m.onnx", "--device=GPU"],
         "--device (MindSpore's) has no meaning here: ptqconv benchmark runs onnxruntime's"),
    ):
        status = main(args)
        err = capsys.readouterr().err
        assert status == 2 and message in err and len(err.strip().splitlines()) == 1


def test_an_already_quantized_model_is_refused_in_every_mode(tmp_path, capsys):
    quantized = tmp_path / "int8.onnx"
    config = REPO / "configs" / "digits.ini"
    status, _, _ = cli(capsys, f"--modelFile={MODEL}", f"--outputFile={quantized}",
                       "--quantType=PostTraining", f"--configFile={config}", "--quiet")
    assert status == 0
    before = set(tmp_path.rglob("*"))
    for mode in (["--quantType=PostTraining", f"--configFile={config}"],
                 ["--quantType=WeightQuant", "--bitNum=8"], ["--quantType=DynamicQuant"]):
        status, _, err = cli(capsys, f"--modelFile={quantized}",
                             f"--outputFile={tmp_path / 'again.onnx'}", *mode)
        assert status == 1, err
        line, = err.strip().splitlines()
        assert "int8.onnx is quantized already (" in line and "QuantizeLinear" in line
        assert line.endswith("give ptqconv the float model (onnxruntime runs this one as it is)")
        assert set(tmp_path.rglob("*")) == before


@pytest.mark.parametrize("flag", ["--accuracyThreshold=", "--bitNum=", "--debugDir= ",
                                  "--inputShape=", "--encodingsFile="])
def test_an_empty_flag_value_is_an_error_not_the_flag_left_out(tmp_path, capsys, flag):
    """`--accuracyThreshold=$UNSET` in CI turned the gate off without a word."""
    out = tmp_path / "q.onnx"
    status = main([f"--modelFile={DIGITS / 'model.onnx'}", f"--outputFile={out}",
                   "--quantType=WeightQuant", flag])
    assert status == 2
    name = flag.split("=")[0]
    assert capsys.readouterr().err.strip() == (
        f"ptqconv: error: {name}: empty value; give one, or leave the flag out")
    assert not out.exists()


def test_a_flag_given_twice_is_an_error(tmp_path, capsys):
    """click kept the last: --quantType=WeightQuant --quantType=PostTraining ran PostTraining."""
    out = tmp_path / "q.onnx"
    assert main([f"--modelFile={DIGITS / 'model.onnx'}", f"--outputFile={out}",
                 "--quantType=WeightQuant", "--bitNum=4", "--bitNum", "8"]) == 2
    assert capsys.readouterr().err.strip() == (
        "ptqconv: error: --bitNum given twice (--bitNum=4 and --bitNum); give it once")
    assert main(["benchmark", f"--modelFile={DIGITS / 'model.onnx'}", "--loopCount=2",
                 "--loopCount=3"]) == 2
    assert "--loopCount given twice" in capsys.readouterr().err
    assert not out.exists()


def test_a_flag_taken_for_the_value_of_the_one_before_is_an_error(tmp_path, capsys):
    """`--debugDir --quiet` made a directory named --quiet and ran loudly."""
    assert main([f"--modelFile={DIGITS / 'model.onnx'}", f"--outputFile={tmp_path / 'q.onnx'}",
                 "--quantType=PostTraining", "--debugDir", "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == (
        "ptqconv: error: --debugDir: its value '--quiet' is another flag; give the value as "
        "--debugDir=VALUE")
    assert not (tmp_path / "--quiet").exists()


def test_no_arguments_print_the_usage(capsys):
    """converter_lite alone prints its help; `ptqconv` alone said "--quantType is required"."""
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Usage: ptqconv convert [OPTIONS]") and "ptqconv benchmark" in out
