"""The Python API's arguments: paths of any kind, numbers of any integer type, and one-line
usage errors (not TypeError from deep inside) for keywords and types the flags do not take."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from models import DIGITS, REPO

import ptqconv
from ptqconv import arguments
from ptqconv.errors import PtqUsageError
from ptqconv.evaluate import BenchmarkSettings, benchmark
from ptqconv.settings import ConvertSettings

MODEL = DIGITS / "model.onnx"
CONFIG = REPO / "configs" / "digits.ini"
EVAL = DIGITS / "eval" / "input"


@pytest.mark.parametrize("keyword, hint", [
    ("bitNum", "did you mean 'bit_num'?"), ("bitnum", "did you mean 'bit_num'?"),
    ("configFile", "did you mean 'config_file'?"), ("quantType", "allowed: bit_num, "),
])
def test_an_unknown_keyword_is_a_usage_error_with_the_nearest_one(tmp_path, keyword, hint):
    with pytest.raises(PtqUsageError, match=f"convert: unknown keyword '{keyword}'; {hint}"):
        ptqconv.convert(MODEL, tmp_path / "q.onnx", "WeightQuant", **{keyword: 8})
    assert list(tmp_path.iterdir()) == []


def test_paths_may_be_bytes_or_path_like_and_integers_of_any_type(tmp_path):
    report = ptqconv.convert(os.fsencode(MODEL), Path(tmp_path) / "q.onnx", "WeightQuant",
                             bit_num=np.int64(4), quant_weight_size=np.uint16(0),
                             config_file=None)
    assert report.bit_num == 4 and (tmp_path / "q.onnx").is_file()


@pytest.mark.parametrize("flags, message", [
    (dict(skip_quant_node=b"conv"), "--skipQuantNode: b'conv' is not a name or a list"),
    (dict(skip_quant_node=5), "--skipQuantNode: 5 is not a name or a list"),
    (dict(skip_quant_node=["a", 5]), "--skipQuantNode: 5 is not a name (str)"),
    (dict(input_shape=5), "--inputShape: 5 is not a shape"),
    (dict(debug_dir=5), "--debugDir: 5 is not a path"),
    (dict(encodings_file=3.5), "--encodingsFile: 3.5 is not a path"),
    (dict(sensitivity="maybe"), "--sensitivity: 'maybe' is not a boolean"),
    (dict(bit_num=True), "--bitNum: True is not an integer"),
])
def test_values_of_a_type_the_flag_does_not_take_are_usage_errors(tmp_path, flags, message):
    with pytest.raises(PtqUsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ConvertSettings.create(MODEL, tmp_path / "q.onnx", "PostTraining", config_file=CONFIG,
                               **flags)


@pytest.mark.parametrize("given, expected", [
    ("false", False), ("no", False), (0, False), (False, False), (None, False),
    ("true", True), (1, True), (True, True),
])
def test_sensitivity_is_parsed_as_a_boolean_not_by_truthiness(tmp_path, given, expected):
    settings = ConvertSettings.create(MODEL, tmp_path / "q.onnx", "PostTraining",
                                      config_file=CONFIG, sensitivity=given)
    assert settings.mode.sensitivity is expected


def test_input_shape_may_be_a_mapping_in_both_apis(tmp_path):
    converted = ConvertSettings.create(MODEL, tmp_path / "q.onnx", "PostTraining",
                                       config_file=CONFIG, input_shape={"input": (1, 1, 8, 8)})
    bench = BenchmarkSettings.create(MODEL, MODEL, in_data_dir={"input": EVAL},
                                     input_shape={"input": "1,1,8,8"})
    assert dict(converted.input_shapes)["input"] == (1, 1, 8, 8)
    assert bench.input_shape == (("input", (1, 1, 8, 8)),)
    assert bench.in_data_dir == (("input", EVAL),)


@pytest.mark.parametrize("flags, message", [
    (dict(in_data_dir=5), "--inDataDir: 5 is not a path or a list of paths"),
    (dict(input_shapes=[5]), "--inputShapes: input '#1': 5 is not a list of dimensions"),
    (dict(input_shapes=[(1, 1, 8.5, 8)]), "dimension '8.5' is not a positive integer"),
    (dict(input_shapes=5), "--inputShapes: 5 is not a list of shapes"),
])
def test_benchmark_settings_refuse_what_their_flags_do_not_take(flags, message):
    base = dict(in_data_dir=Path(EVAL)) if "in_data_dir" not in flags else {}
    with pytest.raises(PtqUsageError, match=message):
        BenchmarkSettings.create(MODEL, MODEL, **base, **flags)


def test_benchmark_takes_its_settings_not_a_path():
    with pytest.raises(PtqUsageError, match=r"benchmark takes BenchmarkSettings\.create"):
        benchmark(str(MODEL))  # type: ignore[arg-type]


@given(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
               min_size=1, max_size=40))
def test_a_path_is_the_same_str_as_str_bytes_or_path_like(text):
    assert arguments.path("--x", text) == text
    assert arguments.path("--x", os.fsencode(text)) == text
    assert arguments.path("--x", Path(text)) == str(Path(text))


@given(st.one_of(st.integers(), st.floats(), st.lists(st.integers(), max_size=3),
                 st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)))
def test_anything_else_is_not_a_path(value):
    with pytest.raises(PtqUsageError, match=r"--x: .* is not a path"):
        arguments.path("--x", value)


@pytest.mark.parametrize("flags, message", [
    (dict(bit_num=17), "bit_num: 17 is out of range; allowed: [0, 16] for WeightQuant"),
    (dict(cosine_threshold=2), "cosine_threshold: 2 is out of range"),
    (dict(skip_quant_node="nope"), "skip_quant_node: 'nope' matches no node name"),
])
def test_convert_names_the_keywords_the_caller_gave(tmp_path, flags, message):
    with pytest.raises(PtqUsageError) as failure:
        ptqconv.convert(MODEL, tmp_path / "q.onnx", "WeightQuant", **flags)
    assert str(failure.value).startswith(message) and "--" not in str(failure.value)
    # The command line keeps its flags' names.
    with pytest.raises(PtqUsageError, match=r"^--bitNum: 17 is out of range"):
        ConvertSettings.create(MODEL, tmp_path / "q.onnx", "WeightQuant", bit_num=17)


@given(st.sampled_from(["bit_num", "quant_weight_size", "skip_quant_node", "input_shape",
                        "cosine_threshold", "config_file", "fp16"]),
       st.text(alphabet=st.characters(blacklist_characters="-"), max_size=20))
def test_each_flag_becomes_its_keyword_and_nothing_else_changes(keyword, text):
    from ptqconv.arguments import as_keywords

    flag = {"cosine_threshold": "--cosineDistanceThreshold"}.get(keyword) or "--" + "".join(
        part.capitalize() if i else part for i, part in enumerate(keyword.split("_")))
    keywords = ["bit_num", "quant_weight_size", "skip_quant_node", "input_shape",
                "cosine_threshold", "config_file", "fp16"]
    assert as_keywords(f"{flag}: {text}", keywords) == f"{keyword}: {text}"
    assert as_keywords(text, keywords) == text
    assert as_keywords(f"{flag}s {text}", keywords) == f"{flag}s {text}"  # another word
    # The flag or the config key ("--inputShape / input_shape") is the keyword alone.
    assert as_keywords(f"{flag} / {keyword}: {text}", keywords) == f"{keyword}: {text}"


def test_ptqconv_benchmark_takes_the_benchmarks_flags_as_keywords(tmp_path):
    report = ptqconv.benchmark(MODEL, os.fsencode(MODEL), in_data_dir={"input": EVAL},
                               loop_count=np.int32(2), report_file=tmp_path / "r.json")
    assert report.passed and report.comparisons["logits"].cosine == pytest.approx(1.0)
    assert (tmp_path / "r.json").is_file()


@pytest.mark.parametrize("flags, message", [
    (dict(inDataDir=EVAL), "benchmark: unknown keyword 'inDataDir'; did you mean "
                           "'in_data_dir'?"),
    (dict(in_data_dir="input:/no/such/dir"), "in_data_dir: input 'input': directory "
                                             "/no/such/dir does not exist"),
    (dict(in_data_dir=EVAL, accuracy_threshold=-1), "accuracy_threshold: -1 is out of range"),
    (dict(in_data_dir=EVAL, cosine_distance_threshold=2),
     "cosine_distance_threshold: 2 is out of range"),
])
def test_ptqconv_benchmarks_errors_name_the_keywords(flags, message):
    with pytest.raises(PtqUsageError, match=message):
        ptqconv.benchmark(MODEL, MODEL, **flags)
