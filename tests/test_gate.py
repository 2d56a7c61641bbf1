"""The converter's accuracy gate: evaluate the written model on held-out samples, exit 1 when
it misses --accuracyThreshold / --cosineDistanceThreshold, check eval data before any work."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from models import DIGITS

from ptqconv.cli import main

MODEL = str(DIGITS / "model.onnx")


def config(tmp_path, eval_dir=DIGITS / "eval" / "input") -> str:
    path = tmp_path / "gate.ini"
    path.write_text(
        f"[data_preprocess_param]\ncalibrate_path=input:{DIGITS / 'calib' / 'input'}\n"
        f"[evaluate_param]\neval_path=input:{eval_dir}\neval_size=50\n"
    )
    return str(path)


@pytest.mark.parametrize(
    ("flags", "status"),
    [
        (["--accuracyThreshold=50", "--cosineDistanceThreshold=0.999"], 0),
        (["--accuracyThreshold=0.01"], 1),
        (["--accuracyThreshold=50", "--cosineDistanceThreshold=0.9999999"], 1),
    ],
)
def test_gate_passes_and_fails_with_the_right_status(tmp_path, capsys, flags, status):
    out = tmp_path / "q.onnx"
    assert (
        main(
            [
                f"--modelFile={MODEL}",
                f"--outputFile={out}",
                "--quantType=PostTraining",
                f"--configFile={config(tmp_path)}",
                *flags,
            ]
        )
        == status
    )
    captured = capsys.readouterr()
    assert "accuracy gate on 50 eval samples" in captured.out
    assert "logits: mean bias" in captured.out and "top-1" in captured.out
    assert out.exists()  # the model is complete either way; CI keeps it as an artifact
    if status:
        (line,) = captured.err.strip().splitlines()
        assert line.startswith("ptqconv: error: accuracy gate failed: ")


def test_gate_needs_eval_data_and_checks_it_before_converting(tmp_path, capsys):
    out = tmp_path / "q.onnx"
    plain = tmp_path / "plain.ini"
    plain.write_text(
        f"[data_preprocess_param]\ncalibrate_path=input:{DIGITS / 'calib' / 'input'}\n"
    )
    assert (
        main(
            [
                f"--modelFile={MODEL}",
                f"--outputFile={out}",
                "--quantType=PostTraining",
                f"--configFile={plain}",
                "--accuracyThreshold=1",
            ]
        )
        == 2
    )
    assert "needs held-out data: set eval_path" in capsys.readouterr().err
    assert (
        main(
            [
                f"--modelFile={MODEL}",
                f"--outputFile={out}",
                "--quantType=PostTraining",
                f"--configFile={config(tmp_path, tmp_path / 'nowhere')}",
                "--accuracyThreshold=1",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "eval data: input 'input': directory" in err and "does not exist" in err
    assert not out.exists()


def test_benchmark_subcommand_gate_from_the_console(tmp_path):
    out = tmp_path / "w8.onnx"
    assert (
        main([f"--modelFile={MODEL}", f"--outputFile={out}", "--quantType=WeightQuant", "--quiet"])
        == 0
    )
    report = tmp_path / "report.json"
    args = [
        sys.executable,
        "-m",
        "ptqconv.cli",
        "benchmark",
        f"--modelFile={out}",
        f"--referenceModel={MODEL}",
        f"--inDataDir=input:{DIGITS / 'eval' / 'input'}",
        "--cosineDistanceThreshold=0.999",
        "--accuracyThreshold=50",
        f"--reportFile={report}",
        "--loopCount=2",
    ]
    result = subprocess.run(args, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert json.loads(report.read_text())["passed"] is True
    result = subprocess.run(
        [*args[:-3], "--accuracyThreshold=0.001", f"--reportFile={report}"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert json.loads(report.read_text())["passed"] is False
