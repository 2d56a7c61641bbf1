"""ConversionReport.to_dict: every figure as JSON-ready data."""

from __future__ import annotations

import enum
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from models import DIGITS

import ptqconv
from ptqconv.plain_data import plain


def test_a_post_training_report_with_a_gate_is_json(tmp_path):
    config = tmp_path / "c.ini"
    config.write_text(f"[data_preprocess_param]\ncalibrate_path=input:{DIGITS / 'calib/input'}"
                      "\ncalibrate_size=20\ninput_shape=input:1,1,8,8\n[evaluate_param]\n"
                      f"eval_path=input:{DIGITS / 'eval/input'}\n")
    report = ptqconv.convert(DIGITS / "model.onnx", tmp_path / "q.onnx", "PostTraining",
                             config_file=config, accuracy_threshold=5)
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["passed"] is report.passed is True
    assert data["output_file"] == str(tmp_path / "q.onnx") and data["quant_type"] == "PostTraining"
    assert data["post_training"]["units"] == report.post_training.units
    assert data["post_training"]["weight_grid"]["storage"] == "INT8"
    cosine = data["gate"]["comparisons"]["logits"]["cosine"]
    assert cosine == report.gate.comparisons["logits"].result()["cosine"] > 0.99


def test_a_weight_quant_report_lists_its_weights(tmp_path):
    report = ptqconv.convert(DIGITS / "model.onnx", tmp_path / "q.onnx", "WeightQuant",
                             bit_num=4)
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert [w["name"] for w in data["weights"]] == [w.name for w in report.weights]
    assert data["size_after"] == report.size_after == (tmp_path / "q.onnx").stat().st_size


class Kind(enum.Enum):
    A = 3


class Named(str, enum.Enum):
    B = "b"


@dataclass
class Row:
    x: float
    path: Path
    kinds: frozenset


leaves = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=5),
                   st.just(Kind.A), st.just(Named.B), st.just(Path("a/b")),
                   st.builds(np.float32, st.floats(width=32)), st.builds(np.int64, st.integers(
                       -2**63, 2**63 - 1)))
values = st.recursive(leaves, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=3), inner, max_size=3),
    st.builds(Row, st.floats(), st.just(Path("p")), st.frozensets(st.integers(), max_size=3)),
    st.builds(lambda xs: np.array(xs, dtype=np.float64), st.lists(st.floats(), max_size=4))),
    max_leaves=10)


@given(values)
def test_plain_data_is_json_without_nan_and_keeps_finite_numbers(value):
    data = plain(value)
    text = json.dumps(data, allow_nan=False)
    assert json.loads(text) == data
    if isinstance(value, float) and math.isfinite(value):
        assert data == value
    if isinstance(value, float) and math.isnan(value):
        assert data is None
