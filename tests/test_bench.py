"""The bench's plumbing: clean skip without a corpus, the report writer, child measurement."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import accuracy  # noqa: E402
from bench.__main__ import parse  # noqa: E402
from bench.common import Measure, Section, run_child, table  # noqa: E402
from bench.report import write  # noqa: E402


def test_missing_corpus_skips_cleanly(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", "accuracy", "--corpus",
         "/nonexistent", "--out-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert ("corpus /nonexistent not found; build it with ../shared/corpus/build_corpus.sh "
            "DIR; skipping accuracy") in result.stdout
    # A quick run never writes the files the README quotes.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["quick.json", "quick.md"]
    report = json.loads((tmp_path / "quick.json").read_text())
    assert report["quick"] is True
    assert report["command"] == ("python -m bench --quick --only accuracy --corpus /nonexistent "
                                 f"--out-dir {tmp_path}")
    section = report["sections"]["accuracy"]
    assert section["error"] is None
    assert "skipping accuracy" in section["data"]["skipped"]
    assert "QUICK" in (tmp_path / "quick.md").read_text()


def test_writer_renders_sections_and_json(tmp_path):
    meta = {"command": "python -m bench --x", "date": "2026-01-01 00:00 UTC", "quick": False,
            "wall_seconds": 90.0, "load_average_end": [0.5, 0.4, 0.3],
            "machine": {"cpu": "Test CPU", "cores": 2, "memory_gb": 8.0, "simd": ["avx2"],
                        "vnni": False, "load_average": [1.0, 0.5, 0.25], "python": "3.11",
                        "onnxruntime": "1.31", "onnx": "1.20", "numpy": "2.0"}}
    good = Section("calibration", "Calibration cost",
                   markdown=table(["case", "time (s)"], [["ptqconv KL", "1.50"]]),
                   data={"time": float("nan"), "path": Path("/x"), "runs": (1, 2)}, seconds=12)
    bad = Section("bert", "BERT", error="RuntimeError: boom", seconds=3)
    md_path, json_path = write(tmp_path, "latest", meta, [good, bad])
    md = md_path.read_text()
    assert md.startswith("# ptqconv bench\n")
    assert "- command: `python -m bench --x`" in md
    assert "total wall time 1.5 min" in md
    assert "Test CPU, 2 cores, 8 GB, avx2 (no VNNI)" in md
    assert "1.00 / 0.50 / 0.25, at end: 0.50 / 0.40 / 0.30" in md
    assert "## Calibration cost\n\n| case | time (s) |\n|---|---:|\n| ptqconv KL | 1.50 |" in md
    assert "## BERT\n\n**Section failed:** RuntimeError: boom" in md
    data = json.loads(json_path.read_text())  # strict JSON: NaN would not parse back as null
    assert data["sections"]["calibration"]["data"] == {"time": None, "path": "/x",
                                                      "runs": [1, 2]}
    assert data["sections"]["bert"]["error"] == "RuntimeError: boom"
    assert data["machine"]["cpu"] == "Test CPU"


def test_run_child_reports_result_medians_and_memory_cap():
    m = run_child("tests.bench_children:multiply", {"a": 6, "b": 7}, repeat=3)
    assert m.ok and len(m.runs) == 3 and m.result == 42
    assert 0 < m.seconds < 5 and 1 < m.rss_mb < 500
    capped = run_child("tests.bench_children:allocate", {"gigabytes": 2}, mem_cap_gb=1)
    assert not capped.ok and capped.error.startswith("out of memory above 1 GB")
    failed = run_child("tests.bench_children:fail", {"message": "no good"})
    assert failed.error == "failed: ValueError: no good"
    assert Measure(runs=[{"seconds": s, "rss_mb": 1.0} for s in (3, 1, 2)]).seconds == 2


def test_unknown_section_is_a_usage_error():
    with pytest.raises(SystemExit) as exc:
        parse(["--only", "calibration,nope"])
    assert exc.value.code == 2
    assert parse(["--only", "bert"]).sections == ["bert"]


def _graph_model(ops: list[str], body: list[str] | None = None):
    from onnx import helper

    nodes = [helper.make_node(op, ["x"], ["x"]) for op in ops]
    if body is not None:
        inner = helper.make_graph([helper.make_node(op, ["x"], ["x"]) for op in body], "b",
                                  [], [])
        nodes.append(helper.make_node("If", ["c"], ["y"], then_branch=inner, else_branch=inner))
    return helper.make_model(helper.make_graph(nodes, "g", [], []))


def test_transformer_detection_reads_op_types_only():
    is_transformer = accuracy.is_transformer
    assert is_transformer(_graph_model(["MatMul", "Add", "Softmax"]))  # matmuls, no conv
    assert is_transformer(_graph_model(["Conv", "MatMul", "Softmax", "LayerNormalization"]))
    assert not is_transformer(_graph_model(["Conv", "Gemm", "Softmax"]))  # a CNN
    assert not is_transformer(_graph_model(["Conv", "MatMul", "Softmax"]))  # CNN + attention
    assert not is_transformer(_graph_model(["LSTM", "Gemm"]))
    assert is_transformer(_graph_model(["Add"], body=["MatMul", "Gelu"]))  # inside an If


def test_output_cosine_and_auto_verdict():
    import numpy as np

    ref = [[np.array([1.0, 0.0]), np.array([0.0, 2.0])]]
    assert accuracy.output_cosine(ref, ref) == pytest.approx(1.0)
    got = [[np.array([1.0, 0.0]), np.array([2.0, 0.0])]]  # one output right, one orthogonal
    assert accuracy.output_cosine(ref, got) == pytest.approx(0.5)

    def row(auto, ort, nncf):
        variants = {accuracy.AUTO: {"cosine": auto}, accuracy.ORT: {"cosine": ort},
                    accuracy.NNCF: {"cosine": nncf} if nncf else {"error": "not installed"}}
        return {"variants": variants}

    assert accuracy.auto_verdict(row(0.99991, 0.9, 0.99994)) == "yes"  # a tie at 4 decimals
    assert accuracy.auto_verdict(row(0.98, 0.9, 0.99)) == "no (-0.0100)"
    assert accuracy.auto_verdict(row(0.95, 0.9, None)) == "yes"  # NNCF not installed


def test_nncf_column_says_not_installed(monkeypatch):
    monkeypatch.setattr(accuracy.importlib.util, "find_spec", lambda name: None)
    assert accuracy.nncf_version() is None
    rows = [{"model": "m", "metric": "output cosine", "float": 1.0, "calib": 4,
             "transformer": False, "latency": {"error": "skipped"},
             "variants": {accuracy.NNCF: {"error": accuracy.NOT_INSTALLED},
                          accuracy.AUTO: {"value": 0.99, "cosine": 0.99,
                                          "convert_seconds": 3.0}}}]
    md = accuracy.markdown(rows, cpu="Test CPU (AVX2, no VNNI)")
    assert "Measured on Test CPU (AVX2, no VNNI); NNCF not installed" in md
    assert "| not installed |" in md
    assert md.count("on Test CPU (AVX2, no VNNI)") >= 4  # every table names the CPU


def test_hardswish_spellings_are_one_function():
    """bench/hardswish.py: the three spellings, same weights, give the same logits."""
    import numpy as np
    import onnxruntime as ort

    from bench.hardswish import SPELLINGS, Builder, image

    feed = {"input": image(np.random.default_rng(0))}
    found = {}
    for spelling in SPELLINGS:
        builder = Builder(spelling)
        model = builder.build()
        assert builder.convs == 31
        session = ort.InferenceSession(model.SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        found[spelling] = session.run(None, feed)[0]
    for spelling in SPELLINGS:
        np.testing.assert_allclose(found[spelling], found["hardswish"], rtol=1e-3, atol=1e-3)
    assert parse(["--only", "hardswish"]).sections == ["hardswish"]


def test_export_samples_fit_the_committed_models():
    # Every committed export gets samples of its inputs' element types and static dims.
    import onnx

    from bench import exports

    types = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.INT64: np.int64}
    for name, (file, draw) in exports.MODELS.items():
        model = onnx.load(exports.HERE / file, load_external_data=False)
        drawn = draw(np.random.default_rng(0), 3)
        assert sorted(drawn) == sorted(v.name for v in model.graph.input), name
        for value in model.graph.input:
            samples = drawn[value.name]
            assert samples.shape[0] == 3 and samples.dtype == types[
                value.type.tensor_type.elem_type], (name, value.name)
            dims = [d.dim_value or None for d in value.type.tensor_type.shape.dim]
            assert all(want in (None, got) for want, got in
                       zip(dims, samples.shape[1:], strict=True)), (name, dims, samples.shape)
