"""Nothing lost: outputs never replace an input, never go through a symbolic link, and a
failed, full or interrupted run removes exactly what it wrote (README, Flags: --outputFile)."""

from __future__ import annotations

import errno
import os
import resource
import signal

import numpy as np
import onnx
import onnx_ir
import pytest
from harness import (
    STOP_STATUS,
    cli,
    digits_workspace,
    error_line,
    snapshot,
    stop_when,
    subprocess_cli,
)
from models import mlp

from ptqconv import modelio


def _external(path, location: str) -> None:
    onnx.save(mlp((64, 64, 16)), str(path), save_as_external_data=True, location=location,
              size_threshold=0)


def _wq(model, output, *extra: str) -> list[str]:
    return [f"--modelFile={model}", f"--outputFile={output}", "--quantType=WeightQuant", *extra]


def _pt(files, output, *extra: str) -> list[str]:
    return [f"--modelFile={files['model']}", f"--outputFile={output}",
            "--quantType=PostTraining", f"--configFile={files['config']}", *extra]


def _refused(capsys, root, args, culprit: str) -> str:
    before = snapshot(root)
    status, _, err = cli(capsys, *args)
    line = error_line(err)
    assert status == 2, err
    assert culprit in line and "which this run reads" in line, line
    assert snapshot(root) == before
    return line


@pytest.mark.parametrize("target", ["config", "bin", "eval", "debug"])
def test_an_output_naming_a_file_the_run_reads_is_refused(tmp_path, capsys, target):
    files = digits_workspace(tmp_path, config="[evaluate_param]\neval_path=input:calib\n")
    sample = files["calib"] / "000003.bin"
    if target == "config":
        args = _pt(files, files["config"])
        sample = files["config"]
    elif target == "bin":
        args = _pt(files, sample)
    elif target == "eval":  # read only by the gate, after the model is written
        args = _pt(files, sample, "--cosineDistanceThreshold=0.9")
    else:  # the layer report would replace a calibration file named like it
        (files["calib"] / "layer_report.csv").write_bytes(np.zeros(64, np.float32).tobytes())
        files["config"].write_text(files["config"].read_text().replace("calibrate_size=10",
                                                                       "calibrate_size=11"))
        args = _pt(files, tmp_path / "o.onnx", f"--debugDir={files['calib']}")
        sample = files["calib"] / "layer_report.csv"
    _refused(capsys, tmp_path, args, sample.name)


@pytest.mark.parametrize("link", ["hard", "symbolic", "spelling"])
def test_links_and_spellings_of_an_input_are_recognised(tmp_path, capsys, link, monkeypatch):
    files = digits_workspace(tmp_path)
    other = tmp_path / "other.onnx"
    if link == "hard":
        os.link(files["calib"] / "000001.bin", other)
        args = _pt(files, other)
    elif link == "symbolic":
        other.symlink_to(files["config"])
        args = _pt(files, other)
    else:
        monkeypatch.chdir(tmp_path)
        other = "calib/../c.ini"
        args = _pt(files, "./" + other)
    _refused(capsys, tmp_path, args, str(other))


def test_the_models_external_data_is_no_output_or_data_file(tmp_path, capsys):
    _external(tmp_path / "m.onnx", "o.onnx.data")
    # As --outputFile itself, and as the data file beside --outputFile=o.onnx (refused even
    # when this output would be small enough to need none).
    _refused(capsys, tmp_path, _wq(tmp_path / "m.onnx", tmp_path / "o.onnx.data"),
             "o.onnx.data")
    line = _refused(capsys, tmp_path, _wq(tmp_path / "m.onnx", tmp_path / "o.onnx"),
                    "o.onnx.data")
    assert "--outputFile's data file" in line


@pytest.mark.parametrize("which", ["o.onnx", "o.onnx.data"])
def test_never_written_through_a_symbolic_link(tmp_path, capsys, monkeypatch, which):
    files = digits_workspace(tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / which).symlink_to(victim)
    monkeypatch.setattr(modelio, "EXTERNAL_DATA_THRESHOLD", 0)
    before = snapshot(tmp_path)
    status, _, err = cli(capsys, *_wq(files["model"], tmp_path / "o.onnx"))
    assert status == 2 and "is a symbolic link" in error_line(err) and which in err
    assert snapshot(tmp_path) == before


def test_replacing_a_data_file_this_run_did_not_write_is_said(tmp_path, capsys, monkeypatch):
    files = digits_workspace(tmp_path)
    (tmp_path / "o.onnx.data").write_text("someone else's")
    monkeypatch.setattr(modelio, "EXTERNAL_DATA_THRESHOLD", 0)
    status, _, err = cli(capsys, *_wq(files["model"], tmp_path / "o.onnx"))
    assert status == 0
    assert err.startswith("ptqconv: warning: replaced the existing ") and "o.onnx.data" in err
    assert (tmp_path / "o.onnx.data").read_bytes() != b"someone else's"


def test_a_failed_save_removes_only_what_this_run_wrote(tmp_path, capsys, monkeypatch):
    files = digits_workspace(tmp_path)
    (tmp_path / "o.onnx.data").write_text("someone else's")
    monkeypatch.setattr(modelio, "EXTERNAL_DATA_THRESHOLD", 0)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(onnx_ir, "save", full)
    before = snapshot(tmp_path)
    status, _, err = cli(capsys, *_wq(files["model"], tmp_path / "o.onnx"))
    line = error_line(err)
    assert status == 1
    assert f"cannot write {tmp_path / 'o.onnx'}: No space left on device" in line
    assert snapshot(tmp_path) == before


def test_an_interrupted_save_leaves_nothing(tmp_path, capsys, monkeypatch):
    files = digits_workspace(tmp_path)
    save = onnx_ir.save

    def interrupted(*args, **kwargs):
        save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_ir, "save", interrupted)
    before = snapshot(tmp_path)
    status, _, err = cli(capsys, *_pt(files, tmp_path / "o.onnx"))
    assert status == 130 and error_line(err) == "ptqconv: error: interrupted"
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("kind", ["PostTraining", "WeightQuant"])
def test_a_250_character_output_name_works(tmp_path, capsys, monkeypatch, kind):
    files = digits_workspace(tmp_path)
    name = "n" * 245 + ".onnx"
    if kind == "WeightQuant":  # with the data file beside it: 255 characters
        monkeypatch.setattr(modelio, "EXTERNAL_DATA_THRESHOLD", 0)
        args = _wq(files["model"], tmp_path / name)
    else:
        args = _pt(files, tmp_path / name)
    before = snapshot(tmp_path)
    status, _, err = cli(capsys, *args)
    assert status == 0, err
    expected = {name} | ({name + ".data"} if kind == "WeightQuant" else set())
    assert set(snapshot(tmp_path)) - set(before) == expected


def test_an_output_name_too_long_is_a_usage_error(tmp_path, capsys):
    files = digits_workspace(tmp_path)
    before = snapshot(tmp_path)
    status, _, err = cli(capsys, *_wq(files["model"], tmp_path / ("n" * 300)))
    assert status == 2 and "file name too long" in error_line(err)
    assert snapshot(tmp_path) == before


def _file_size_limit(limit: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


@pytest.mark.parametrize("where", ["output", "TMPDIR"])
def test_a_full_disk_names_the_path_that_could_not_be_written(tmp_path, where):
    # The file size limit stands in for a full disk: every write past it fails.
    files = digits_workspace(tmp_path / "w")
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    output = tmp_path / "w" / "o.onnx"
    args = _wq(files["model"], output) if where == "output" else _pt(files, output)
    before = snapshot(tmp_path)
    process = subprocess_cli(args, tmpdir, preexec=_file_size_limit(20_000))
    _, err = process.communicate(timeout=120)
    line = error_line(err)
    assert process.returncode == 1
    assert "File too large" in line
    assert (f"cannot write {output}" if where == "output" else f"{tmpdir}") in line, line
    assert snapshot(tmp_path) == before


# The calibration slowed down, so that there is time to stop it, and progress every 0.2 s.
SLOW_CALIBRATION = """
    import time
    import ptqconv.cli
    from ptqconv.calibrate.dataset import CalibrationSet
    ptqconv.cli.PLAIN_PROGRESS_SECONDS = 0.2
    samples = CalibrationSet.__iter__
    def slow(self):
        for sample in samples(self):
            time.sleep(0.05)
            yield sample
    CalibrationSet.__iter__ = slow
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_calibration_cleans_up_like_ctrl_c(tmp_path, signum):
    files = digits_workspace(tmp_path / "w", samples=100)
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    before = snapshot(tmp_path)
    process = subprocess_cli(_pt(files, tmp_path / "w" / "o.onnx"), tmpdir, SLOW_CALIBRATION)
    status, err = stop_when(process, lambda line: line.startswith("ptqconv: calibrating"),
                            signum)
    assert status == STOP_STATUS[signum], err
    expected = "interrupted" if signum == signal.SIGINT else "terminated by SIGTERM"
    assert error_line(err) == f"ptqconv: error: {expected}"
    assert snapshot(tmp_path) == before  # TMPDIR included


def test_sigterm_during_the_save_cleans_up(tmp_path):
    files = digits_workspace(tmp_path / "w")
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    slow_save = """
        import sys, time, onnx_ir
        save = onnx_ir.save
        def slow(*args, **kwargs):
            save(*args, **kwargs)
            print("ptqconv: saved", file=sys.stderr, flush=True)
            time.sleep(30)
        onnx_ir.save = slow
    """
    before = snapshot(tmp_path)
    process = subprocess_cli(_pt(files, tmp_path / "w" / "o.onnx"), tmpdir, slow_save)
    status, err = stop_when(process, lambda line: line.startswith("ptqconv: saved"),
                            signal.SIGTERM)
    assert status == 143, err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("failure", ["directory", "rename"])
def test_a_commit_that_fails_puts_every_destination_back(tmp_path, monkeypatch, failure):
    """All outputs or none: a model is not replaced when its encodings file cannot be
    written (the encodings path became a directory, or its rename failed)."""
    from ptqconv import files
    from ptqconv.errors import PtqError

    model, encodings = tmp_path / "m.onnx", tmp_path / "enc.json"
    model.write_bytes(b"old model")
    with files.Staging() as staging:
        staging.path(model).write_bytes(b"new model")
        staging.path(encodings).write_text("{}")
        if failure == "directory":
            encodings.mkdir()
        else:
            real = os.replace

            def replace(src, dst):
                if os.fspath(dst) == os.fspath(encodings):
                    raise OSError(errno.EIO, "input/output error")
                real(src, dst)

            monkeypatch.setattr(os, "replace", replace)
        with pytest.raises(PtqError, match=f"cannot write {encodings}"):
            staging.commit()
    assert model.read_bytes() == b"old model"
    assert sorted(p.name for p in tmp_path.iterdir()) == (
        ["enc.json", "m.onnx"] if failure == "directory" else ["m.onnx"])
