"""The converter's accuracy gate: evaluate the written model on held-out samples, exit 1 when
it misses --accuracyThreshold / --cosineDistanceThreshold, check eval data before any work."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from models import DIGITS, write_samples

import ptqconv
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
    ("flags", "repaired"),
    [
        (["--accuracyThreshold=50", "--cosineDistanceThreshold=0.999"], False),
        (["--accuracyThreshold=0.01"], True),
        (["--accuracyThreshold=50", "--cosineDistanceThreshold=0.9999999"], True),
    ],
)
def test_a_missed_target_keeps_the_most_harmful_units_float(tmp_path, capsys, flags,
                                                            repaired):
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
        == 0
    )
    captured = capsys.readouterr()
    assert "accuracy gate on 50 eval samples" in captured.out
    assert "logits: mean bias" in captured.out and "top-1" in captured.out
    assert ("accuracy target: the quantized model missed it" in captured.out) == repaired
    if repaired:
        # The written model passes; the units kept float are named, with what they cost.
        assert "float: pass" in captured.out and "met with " in captured.out
        assert "cost: size" in captured.out and captured.err == ""
        # AUTO's scores are the model's before the repair, and the summary says so.
        assert "(before the accuracy target's repair, below):" in captured.out
        keys = {"--accuracyThreshold": "accuracy_threshold",
                "--cosineDistanceThreshold": "cosine_threshold"}
        report = ptqconv.convert(MODEL, tmp_path / "again.onnx", "PostTraining",
                                 config_file=config(tmp_path),
                                 **{keys[f.split("=")[0]]: f.split("=")[1] for f in flags})
        target = report.target
        assert target.met and report.passed and report.gate.failures == []
        # The three models timed together, interleaved (one timing, one CPU).
        assert set(target.latency_ms) == {"float", "quantized", "written"}
        # The summary describes the model written: the units kept float are not counted.
        plain = ptqconv.convert(MODEL, tmp_path / "plain.onnx", "PostTraining",
                                config_file=config(tmp_path))
        assert 0 < len(target.float_units) <= plain.post_training.units
        assert report.post_training.units == plain.post_training.units - len(
            target.float_units)
        # The fewest units that pass: one fewer failed.
        counts = {a.float_units: a.passed for a in target.attempts}
        assert counts[len(target.float_units)] and not counts.get(
            len(target.float_units) - 1, False)


def test_a_target_nothing_can_meet_exits_1(tmp_path, capsys):
    # Log of negative eval inputs is NaN in the float model too: keeping every unit float
    # cannot help, so the quantized model is written and the run fails.
    import numpy as np
    from models import save, write_samples
    from onnx import TensorProto, helper, numpy_helper

    # 64 x 64 weights: the quantized model must be smaller, or the float one is written.
    w = np.random.default_rng(0).standard_normal((64, 64, 1, 1)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Log", ["c"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64, 4, 4])],
        [numpy_helper.from_array(w, "w")])
    model = save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
                 tmp_path / "log.onnx")
    rng = np.random.default_rng(1)
    data = write_samples(tmp_path / "x", [rng.standard_normal((1, 64, 4, 4)).astype(np.float32)
                                          for _ in range(8)])
    ini = tmp_path / "c.ini"
    ini.write_text(f"[data_preprocess_param]\ncalibrate_path=x:{data}\n"
                   "[full_quant_param]\nlatency_aware=false\n"
                   f"[evaluate_param]\neval_path=x:{data}\n")
    out = tmp_path / "q.onnx"
    status = main([f"--modelFile={model}", f"--outputFile={out}", "--quantType=PostTraining",
                   f"--configFile={ini}", "--accuracyThreshold=50"])
    captured = capsys.readouterr()
    assert status == 1 and out.exists()
    assert "not met even with every unit float" in captured.out
    (line,) = captured.err.strip().splitlines()
    assert line.startswith("ptqconv: error: accuracy gate failed: ") and "NaN/Inf" in line


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
    assert "--accuracyThreshold needs held-out data: set eval_path" in capsys.readouterr().err
    # The flag given is the one named.
    assert main([f"--modelFile={MODEL}", f"--outputFile={out}", "--quantType=PostTraining",
                 f"--configFile={plain}", "--cosineDistanceThreshold=0.99"]) == 2
    assert "--cosineDistanceThreshold needs held-out data" in capsys.readouterr().err
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


def test_big_model_route_maps_weights_and_still_repairs(tmp_path, capsys, monkeypatch):
    """Models over IN_MEMORY_BYTES are simplified into a mapped data file and reach
    onnxruntime as files; lowered to 0 here, the digits model takes that route through
    calibration, AUTO's candidates and the accuracy-target repair, which reads models built
    from the mapped weights after the first one is written."""
    import onnx

    from ptqconv import modelio, runtime

    monkeypatch.setattr(runtime, "IN_MEMORY_BYTES", 0)
    monkeypatch.setattr(modelio, "IN_MEMORY_BYTES", 0)
    monkeypatch.setattr(modelio, "SIMPLIFIED_EXTERNAL_BYTES", 64)
    made = []
    simplify = modelio.simplify_with_onnxruntime

    def spy(path, workdir, size=None):
        out = simplify(path, workdir, size)
        made.append(sorted(p.name for p in workdir.iterdir()))
        return out

    monkeypatch.setattr(modelio, "simplify_with_onnxruntime", spy)
    out = tmp_path / "q.onnx"
    args = [f"--modelFile={MODEL}", f"--outputFile={out}", "--quantType=PostTraining",
            f"--configFile={config(tmp_path)}", "--accuracyThreshold=0.01"]
    assert main(args) == 0
    assert made == [["simplified.onnx", "simplified.onnx.data"]]
    assert "accuracy target: the quantized model missed it" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gate.ini", "q.onnx"]
    model = onnx.load(str(out))  # one self-contained file
    assert not any(t.external_data for t in model.graph.initializer)


def test_a_repair_that_keeps_every_unit_float_writes_no_bigger_model(tmp_path, capsys):
    """Conv -> Tanh -> Conv, nothing for simplification to fold: with every unit float the
    repaired model computes float's outputs exactly and meets a cosine of 1, and the
    summary then describes that model (no unit quantized), which is never written bigger
    than the float model."""
    import numpy as np
    import onnx
    from models import random_samples, save
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
         helper.make_node("Tanh", ["c1"], ["t"]),
         helper.make_node("Conv", ["t", "w2"], ["y"], pads=[1, 1, 1, 1])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 12, 12])],
        [numpy_helper.from_array((rng.standard_normal((16, 4, 3, 3)) / 6).astype(np.float32),
                                 "w1"),
         numpy_helper.from_array((rng.standard_normal((8, 16, 3, 3)) / 12).astype(np.float32),
                                 "w2")])
    model = save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
                 tmp_path / "m.onnx")
    random_samples(tmp_path / "calib", 8, 0, (1, 4, 12, 12))
    random_samples(tmp_path / "eval", 4, 1, (1, 4, 12, 12))
    (tmp_path / "c.ini").write_text(
        f"[data_preprocess_param]\ncalibrate_path=x:{tmp_path / 'calib'}\n"
        "[full_quant_param]\nlatency_aware=false\nmeasure_latency=false\n"
        f"[evaluate_param]\neval_path=x:{tmp_path / 'eval'}\n")
    out = tmp_path / "q.onnx"
    status = main([f"--modelFile={model}", f"--outputFile={out}", "--quantType=PostTraining",
                   f"--configFile={tmp_path / 'c.ini'}", "--cosineDistanceThreshold=1"])
    text = capsys.readouterr().out
    assert status == 0, text
    assert "units float: " in text and "  node units quantized: 0\n" in text
    assert " (measure_latency=false: not timed)\n" in text  # nothing timed when asked not to
    assert out.stat().st_size <= model.stat().st_size
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear")
                   for n in onnx.load(str(out)).graph.node)


def test_a_sequence_output_is_calibrated_around_and_compared_element_by_element(tmp_path,
                                                                                 capsys):
    """A model output that is a sequence (SplitToSequence) carries no tensor statistics and
    is compared with its elements end to end (it failed calibration with an internal
    error, then the gate)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((8, 3, 3, 3)) * 0.2).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c"], ["y"]),
         helper.make_node("SplitToSequence", ["y", "parts"], ["ys"], axis=1)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
         helper.make_tensor_sequence_value_info("ys", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([3, 5]), "parts")])
    src = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), src)
    dirs = {split: write_samples(tmp_path / split, [
        rng.standard_normal((1, 3, 8, 8)).astype(np.float32) for _ in range(8)])
        for split in ("calib", "eval")}
    ini = tmp_path / "c.ini"
    ini.write_text(f"[data_preprocess_param]\ncalibrate_path=x:{dirs['calib']}\n"
                   f"[evaluate_param]\neval_path=x:{dirs['eval']}\n"
                   "[full_quant_param]\nlatency_aware=false\n")
    out = tmp_path / "q.onnx"
    assert main([f"--modelFile={src}", f"--outputFile={out}", "--quantType=PostTraining",
                 f"--configFile={ini}", "--accuracyThreshold=50"]) == 0
    printed = capsys.readouterr().out
    assert "node units quantized: 1" in printed
    line = next(x for x in printed.splitlines() if x.strip().startswith("ys:"))
    assert float(line.split("cosine ")[1].split(",")[0]) > 0.99, line
    # Weight-only: the latency line's sample error reads the sequence too.
    assert main([f"--modelFile={src}", f"--outputFile={tmp_path / 'w.onnx'}",
                 "--quantType=WeightQuant", "--quantWeightSize=0",
                 "--quantWeightChannel=0"]) == 0
    assert "output error against float on a seeded random input" in capsys.readouterr().out


def test_a_threshold_from_the_config_is_named_as_the_config_names_it(tmp_path, capsys):
    """The gate's message named --accuracyThreshold where the config's key set it."""
    path = config(tmp_path)
    with open(path, "a") as f:
        f.write("accuracy_threshold=0.000001\n")
    status = main([f"--modelFile={MODEL}", f"--outputFile={tmp_path / 'q.onnx'}",
                   "--quantType=WeightQuant", "--bitNum=2", f"--configFile={path}"])
    assert status == 1
    err = capsys.readouterr().err
    assert "is above accuracy_threshold in [evaluate_param] 1e-06%" in err, err
    assert "--accuracyThreshold" not in err
