"""The target CPU: detected or given, and the weights' width it implies."""

from __future__ import annotations

import pytest
from models import DIGITS

from ptqconv import target
from ptqconv.errors import PtqUsageError
from ptqconv.settings import ConvertSettings

MODEL = DIGITS / "model.onnx"
CALIB = DIGITS / "calib" / "input"


@pytest.mark.parametrize(("flags", "machine", "name", "saturates"), [
    ({"fpu", "avx2"}, "x86_64", "x86_avx2", True),
    ({"avx2", "avx512f", "avx512_vnni"}, "x86_64", "x86_vnni", False),
    ({"avx2", "avx_vnni"}, "x86_64", "x86_vnni", False),
    ({"fp", "asimd", "asimddp"}, "aarch64", "arm64", False),
    ({"fp", "asimd"}, "aarch64", "arm64", True),
])
def test_detection_reads_the_cpu_flags(monkeypatch, flags, machine, name, saturates):
    monkeypatch.setattr(target, "_cpu_flags", lambda: flags)
    monkeypatch.setattr(target, "_numpy_features", set)
    monkeypatch.setattr(target.platform, "machine", lambda: machine)
    found = target.detect()
    assert (found.name, found.saturates) == (name, saturates)
    assert found.why.startswith("detected: ")


def _settings(tmp_path, extra: str):
    config = tmp_path / "c.ini"
    config.write_text(f"[common_quant_param]\n{extra}\n[data_preprocess_param]\n"
                      f"calibrate_path=input:{CALIB}\n")
    return ConvertSettings.create(MODEL, tmp_path / "o.onnx", "PostTraining",
                                  config_file=config).mode


@pytest.mark.parametrize(("key", "name", "reduce_range"), [
    ("target_device=x86_avx2", "x86_avx2", True),
    ("target_device=x86_vnni", "x86_vnni", False),
    ("target_device=ARM64", "arm64", False),
    ("target_device=x86_vnni\n[full_quant_param]\nreduce_range=true", "x86_vnni", True),
])
def test_reduce_range_follows_the_target_unless_set(tmp_path, key, name, reduce_range):
    mode = _settings(tmp_path, key)
    assert (mode.target.name, mode.reduce_range) == (name, reduce_range)


def test_auto_and_cpu_detect_the_host(tmp_path, monkeypatch):
    monkeypatch.setattr(target, "detect", lambda: target.Target("x86_vnni", False, "test"))
    for key in ("", "target_device=auto", "target_device=CPU"):
        mode = _settings(tmp_path, key)
        assert (mode.target.why, mode.reduce_range) == ("test", False)


def test_other_devices_have_no_meaning_here(tmp_path):
    with pytest.raises(PtqUsageError, match=r"c.ini:2: \[common_quant_param\] target_device: "
                       r"'KIRIN' has no meaning here"):
        _settings(tmp_path, "target_device=KIRIN")
    with pytest.raises(PtqUsageError, match="'x86' is not supported; allowed: auto, x86_avx2"):
        _settings(tmp_path, "target_device=x86")


def test_a_target_without_saturation_converted_here_says_the_errors_are_this_cpus(
        tmp_path, capsys, monkeypatch):
    """AUTO's scores for x86_vnni measured on an AVX2 machine include the int16 saturation of
    its U8S8 kernels, which the target does not have; nothing said so."""
    from models import DIGITS

    from ptqconv import target as target_module
    from ptqconv.cli import main

    monkeypatch.setattr(target_module, "detect",
                        lambda: target_module.Target("x86_avx2", True, "detected: test"))
    config = tmp_path / "c.ini"
    config.write_text(f"[data_preprocess_param]\ncalibrate_path=input:"
                      f"{DIGITS / 'calib' / 'input'}\n[full_quant_param]\n"
                      "target_device=x86_vnni\nlatency_aware=false\n")
    assert main([f"--modelFile={DIGITS / 'model.onnx'}", f"--outputFile={tmp_path / 'q.onnx'}",
                 "--quantType=PostTraining", f"--configFile={config}"]) == 0
    assert ("note: the errors below are measured on this CPU, whose U8S8 kernels saturate the "
            "8-bit weights x86_vnni's do not") in capsys.readouterr().out


@pytest.mark.parametrize("cpuinfo, name", [
    # A virtual machine's generic name gets the family and model that tell its generation.
    ("processor\t: 0\ncpu family\t: 25\nmodel\t\t: 1\nmodel name\t: AMD EPYC\n"
     "processor\t: 1\ncpu family\t: 25\nmodel\t\t: 1\nmodel name\t: AMD EPYC\n",
     "AMD EPYC family 25 model 1"),
    ("cpu family\t: 6\nmodel\t\t: 106\nmodel name\t: Intel(R) Xeon(R) Platinum 8375C CPU @ "
     "2.90GHz\n", "Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz"),
    ("model name\t: AMD EPYC\n", "AMD EPYC"),  # no family to add
])
def test_the_cpu_is_named_so_that_two_machines_can_be_told_apart(cpuinfo, name):
    from ptqconv.target import cpu_name

    assert cpu_name(cpuinfo) == name


@pytest.mark.parametrize(("key", "threads"), [("", 3), ("thread_num=1", 1)])
def test_thread_num_left_out_is_every_cpu_the_process_may_use(monkeypatch, tmp_path, key,
                                                               threads):
    monkeypatch.setattr(target.os, "sched_getaffinity", lambda pid: {0, 2, 5})
    config = tmp_path / "c.ini"
    config.write_text(f"[data_preprocess_param]\ncalibrate_path=input:{CALIB}\n"
                      f"[full_quant_param]\n{key}\n")
    mode = ConvertSettings.create(MODEL, tmp_path / "o.onnx", "PostTraining",
                                  config_file=config).mode
    assert mode.threads == threads
