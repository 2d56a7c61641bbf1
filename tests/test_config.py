"""Calibration configs: three forms, one validated QuantConfig, one-line errors with file:line."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from models import DIGITS, REPO

from ptqconv.cli import main
from ptqconv.config import QuantConfig, detect_format, load_config
from ptqconv.errors import PtqUsageError
from ptqconv.values import QuantType

CONFIGS = REPO / "configs"
META = ("source", "format", "lines", "keys")
SECTIONS = ("[common_quant_param], [data_preprocess_param], [dynamic_quant_param], "
            "[evaluate_param], [full_quant_param], [mixed_bit_weight_quant_param], "
            "[weight_quant_param]")
COMMON_KEYS = (
    "bit_num, debug_info_save_path, enable_encode, min_quant_weight_channel, "
    "min_quant_weight_size, quant_type, skip_quant_node, target_device"
)
FULL_KEYS = (
    "activation_bit_num, activation_quant_method, bias_correction, dynamic_candidate, "
    "embedding_quant, enable_all_ops, encodings_path, equalize, histogram_sampling, latency_aware, "
    "measure_latency, per_channel, quant_strategy, reduce_range, shallow_convs_8bit, "
    "smooth_quant, target_device, thread_num"
)
FLAT_KEYS = "batch_count, bias_correction, image_path, input_shape, method_x, thread_num"
FAST = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def values(config: QuantConfig) -> dict:
    """The settings, without where they came from."""
    return {
        f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in META
    }


def under(base: Path, text: str) -> Path:
    return Path(os.path.abspath(base / text))


def failure(path: str | Path) -> str:
    with pytest.raises(PtqUsageError) as info:
        load_config(path)
    message = str(info.value)
    assert info.value.exit_code == 2
    assert len(message.splitlines()) == 1, message
    return message


@pytest.fixture
def here(tmp_path, monkeypatch):
    """Work in tmp_path, so messages name files as given: `calib.cfg:7: ...`."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


# --- the shipped examples ---------------------------------------------------------------------


def test_example_configs_load_with_their_documented_values(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative directories follow the config file, not the CWD
    calib = (DIGITS / "calib" / "input").resolve()
    assert len(list(calib.glob("*.bin"))) == 100
    flat = load_config(CONFIGS / "digits_flat.cfg")
    ini = load_config(CONFIGS / "digits.ini")
    yml = load_config(CONFIGS / "digits.yaml")
    assert (flat.format, ini.format, yml.format) == ("flat", "ini", "yaml")

    assert [(n, p.resolve()) for n, p in flat.calibrate_path] == [(None, calib)]
    assert (flat.calibrate_size, flat.activation_quant_method) == (100, "KL")
    assert (flat.thread_num, flat.bias_correction, flat.per_channel) == (1, False, None)
    assert flat.input_shape == (("input", (1, 1, 8, 8)),)
    assert (flat.quant_type, flat.bit_num) == (None, None)

    for config in (ini, yml):
        assert [(n, p.resolve()) for n, p in config.calibrate_path] == [("input", calib)]
        assert config.quant_type == QuantType.POST_TRAINING and config.bit_num == 8
        assert (config.min_quant_weight_size, config.min_quant_weight_channel) == (0, 16)
        assert config.skip_quant_node == () and config.debug_info_save_path is None
        assert config.calibrate_size == 100
        assert config.input_shape == (("input", (1, 1, 8, 8)),)
        assert (config.per_channel, config.thread_num) == (True, 1)
    # The INI example leaves the method and the techniques to measurement (AUTO); the YAML
    # example forces KL without bias correction.
    assert (ini.activation_quant_method, ini.bias_correction, ini.equalize) == (None,) * 3
    assert ini.target_device == "auto" and ini.reduce_range is None
    assert (yml.activation_quant_method, yml.bias_correction) == ("KL", False)
    same = {**values(ini), "activation_quant_method": "KL", "bias_correction": False,
            "target_device": None, "latency_aware": None, "measure_latency": None}
    assert values(yml) == same
    line = (CONFIGS / "digits.ini").read_text().splitlines().index(
        "calibrate_path=input:../examples/digits/calib/input"
    ) + 1
    assert ini.line_of("calibrate_path") == f"{CONFIGS / 'digits.ini'}:{line}"
    assert ini.where("calibrate_path") == (
        f"{CONFIGS / 'digits.ini'}:{line}: [data_preprocess_param] calibrate_path"
    )


# --- the forms agree ----------------------------------------------------------------------------

INI = """\
# a comment
; another
[common_quant_param]
quant_type = WEIGHT_QUANT
bit_num=4    # inline comment
min_quant_weight_size=1024
min_quant_weight_channel=8
skip_quant_node=/conv1/Conv, /fc2/Gemm
debug_info_save_path=dump

[data_preprocess_param]
calibrate_path=input:calib/in,mask:0:/abs/mask
calibrate_size=16
input_type=bin
input_shape=input:1,3,8,8;mask:0:1,64

[full_quant_param]
activation_quant_method=removal_outlier
bias_correction=TRUE
per_channel=0
thread_num=8
"""

YAML = """\
# a comment
common_quant_param:
  quant_type: WeightQuant
  bit_num: 4  # inline comment
  min_quant_weight_size: 1024
  min_quant_weight_channel: "8"
  skip_quant_node: [/conv1/Conv, /fc2/Gemm]
  debug_info_save_path: dump
data_preprocess_param:
  calibrate_path:
    input: calib/in
    "mask:0": /abs/mask
  calibrate_size: 16
  input_type: BIN
  input_shape: {input: [1, 3, 8, 8], "mask:0": "1,64"}
full_quant_param:
  activation_quant_method: REMOVAL_OUTLIER
  bias_correction: yes
  per_channel: false
  thread_num: 8
"""

FLAT = """\
# flat
image_path=calib/in, /abs/mask
batch_count=16
method_x=RemovalOutlier
bias_correction=True
thread_num=8
input_shape=input:1,3,8,8;mask:0:1,64
"""


def test_ini_and_yaml_parse_to_the_same_config(here):
    ini = load_config(_put("calib.ini", INI))
    yml = load_config(_put("calib.yaml", YAML))
    expected = QuantConfig(
        source=Path("calib.ini"),
        format="ini",
        quant_type=QuantType.WEIGHT_QUANT,
        bit_num=4,
        min_quant_weight_size=1024,
        min_quant_weight_channel=8,
        skip_quant_node=("/conv1/Conv", "/fc2/Gemm"),
        debug_info_save_path=here / "dump",
        calibrate_path=(("input", here / "calib" / "in"), ("mask:0", Path("/abs/mask"))),
        calibrate_size=16,
        input_shape=(("input", (1, 3, 8, 8)), ("mask:0", (1, 64))),
        activation_quant_method="REMOVAL_OUTLIER",
        bias_correction=True,
        per_channel=False,
        thread_num=8,
        input_type="BIN",
    )
    assert values(ini) == values(yml) == values(expected)
    assert dict(ini.lines) == {
        "quant_type": 4,
        "bit_num": 5,
        "min_quant_weight_size": 6,
        "min_quant_weight_channel": 7,
        "skip_quant_node": 8,
        "debug_info_save_path": 9,
        "calibrate_path": 12,
        "calibrate_size": 13,
        "input_type": 14,
        "input_shape": 15,
        "activation_quant_method": 18,
        "bias_correction": 19,
        "per_channel": 20,
        "thread_num": 21,
    }
    assert yml.lines["calibrate_path"] == 10 and yml.lines["thread_num"] == 20
    assert ini.line_of("calibrate_size") == "calib.ini:13"
    assert ini.line_of("nowhere") == "calib.ini"
    assert yml.where("input_shape") == "calib.yaml:15: [data_preprocess_param] input_shape"
    assert hash(ini) != hash(yml)  # frozen and hashable despite the line mappings


def test_flat_form_maps_onto_the_same_fields(here):
    flat = load_config(_put("calib.cfg", FLAT))
    ini = load_config(_put("calib.ini", INI))
    assert flat.format == "flat"
    assert flat.calibrate_path == ((None, here / "calib" / "in"), (None, Path("/abs/mask")))
    for name in ("calibrate_size", "activation_quant_method", "bias_correction", "thread_num"):
        assert getattr(flat, name) == getattr(ini, name), name
    assert flat.input_shape == ini.input_shape
    assert (flat.quant_type, flat.bit_num, flat.per_channel, flat.skip_quant_node) == (
        None,
        None,
        None,
        None,
    )
    assert flat.lines["calibrate_path"] == flat.lines["image_path"] == 2
    assert flat.where("calibrate_size") == "calib.cfg:3: batch_count"


def test_absent_keys_are_none(here):
    config = load_config(_put("c.ini", "[full_quant_param]\n"))
    assert config == QuantConfig(source=Path("c.ini"), format="ini")
    assert all(value is None for value in values(config).values())


def test_format_detection(here):
    assert detect_format(Path("a.yml"), "[common_quant_param]\n") == "yaml"
    assert detect_format(Path("a.cfg"), "# c\n\n  [full_quant_param]\nthread_num=2\n") == "ini"
    assert detect_format(Path("a.cfg"), "; c\nfull_quant_param:\n  thread_num: 2\n") == "yaml"
    assert detect_format(Path("a.txt"), "batch_count=10\n") == "flat"
    assert detect_format(Path("a.txt"), "key: value = 1\n") == "flat"
    config = load_config(_put("calib.conf", "full_quant_param:\n  thread_num: 2\n"))
    assert (config.format, config.thread_num) == ("yaml", 2)


def test_relative_directories_follow_the_config_file_not_the_cwd(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    path = _write(tmp_path / "sub" / "c.ini", "[data_preprocess_param]\ncalibrate_path=x:../d\n")
    monkeypatch.chdir(tmp_path / "sub")
    from_sub = load_config("c.ini")
    monkeypatch.chdir("/")
    from_root = load_config(path)
    assert from_sub.calibrate_path == from_root.calibrate_path == (("x", tmp_path / "d"),)


def test_booleans(here):
    for text, value in [("true", True), ("On", True), ("1", True), ("NO", False), ("0", False)]:
        config = load_config(_put("c.ini", f"[full_quant_param]\nper_channel={text}\n"))
        assert config.per_channel is value
    for text, value in [("true", True), ("TRUE", True), ("False", False)]:
        assert load_config(_put("c.cfg", f"bias_correction={text}\n")).bias_correction is value


def test_names_and_paths_edge_cases(here):
    text = (
        "[common_quant_param]\nskip_quant_node=\n[data_preprocess_param]\n"
        "calibrate_path=a:x, b:c:y,\ninput_shape=a:1 , 2;\n"
    )
    config = load_config(_put("c.ini", text))
    assert config.skip_quant_node == ()
    assert config.calibrate_path == (("a", here / "x"), ("b:c", here / "y"))
    assert config.input_shape == (("a", (1, 2)),)
    yml = "common_quant_param:\n  skip_quant_node:\n  bit_num: '8'\n"
    config = load_config(_put("c.yaml", yml))
    assert (config.skip_quant_node, config.bit_num) == ((), 8)
    config = load_config(_put("c.yaml", "data_preprocess_param:\n  calibrate_path: [a:x]\n"))
    assert config.calibrate_path == (("a", here / "x"),)


# --- errors: file:line, section, key, value, what is allowed; one line --------------------------

ERRORS = [
    pytest.param(
        "calib.cfg",
        "[common_quant_param]\nquant_type=FULL_QUANT\n\n[full_quant_param]\nbias_correction=true\n"
        "# the method\nactivation_quant_method=KLD\n",
        "calib.cfg:7: [full_quant_param] activation_quant_method: 'KLD' is not supported; "
        "allowed: MAX_MIN, KL, REMOVAL_OUTLIER, MSE, AUTO",
        id="ini-bad-choice",
    ),
    pytest.param(
        "calib.cfg",
        "[data_preprocess_param]\ncalibrate_path=input:d\ncalibrate_size=0\n",
        "calib.cfg:3: [data_preprocess_param] calibrate_size: 0 is out of range; "
        "allowed: [1, 65535]",
        id="ini-out-of-range",
    ),
    pytest.param(
        "calib.cfg",
        "[common_quant_param]\nbit_num=8.0\n",
        "calib.cfg:2: [common_quant_param] bit_num: '8.0' is not an integer; allowed: [0, 16]",
        id="ini-not-an-integer",
    ),
    pytest.param(
        "calib.cfg",
        "[common_quant_param]\nbit_num=0x8\n",
        "calib.cfg:2: [common_quant_param] bit_num: '0x8' is not an integer; allowed: [0, 16]",
        id="ini-hex",
    ),
    pytest.param(
        "calib.cfg",
        "[full_quant_param]\nthread_num=2\n\n# more\n\n\n\n\n[foo]\nbar=1\n",
        f"calib.cfg:9: unknown section [foo]; allowed: {SECTIONS}",
        id="ini-unknown-section",
    ),
    pytest.param(
        "calib.cfg",
        "[DEFAULT]\nbit_num=8\n",
        f"calib.cfg:1: unknown section [DEFAULT]; allowed: {SECTIONS}",
        id="ini-default-section-is-not-magic",
    ),
    pytest.param(
        "calib.cfg",
        "# x\n[common_quant_param]\nbit_num=8\nbitnum=8\n",
        f"calib.cfg:4: [common_quant_param] bitnum is not supported; allowed keys: {COMMON_KEYS}",
        id="ini-unknown-key",
    ),
    pytest.param(
        "calib.cfg",
        "[common_quant_param]\nBit_Num=8\n",
        f"calib.cfg:2: [common_quant_param] Bit_Num is not supported; allowed keys: {COMMON_KEYS}",
        id="ini-keys-are-case-sensitive",
    ),
    pytest.param(
        "calib.cfg",
        "[full_quant_param]\nbit_num=8\n",
        f"calib.cfg:2: [full_quant_param] bit_num is not supported; allowed keys: {FULL_KEYS} "
        "(bit_num belongs in [common_quant_param])",
        id="ini-key-in-the-wrong-section",
    ),
    pytest.param(
        "calib.cfg",
        "[full_quant_param]\nmethod_x=KL\n",
        f"calib.cfg:2: [full_quant_param] method_x is not supported; allowed keys: {FULL_KEYS} "
        "(method_x is the flat-form name; use activation_quant_method in [full_quant_param])",
        id="ini-flat-key",
    ),
    pytest.param(
        "calib.cfg",
        "[common_quant_param]\nbit_num=8\n[full_quant_param]\nthread_num=1\nbias_correction=true\n"
        "per_channel=true\n\nbias_correction=false\n",
        "calib.cfg:8: [full_quant_param] bias_correction given twice (first on line 5)",
        id="ini-duplicate-key",
    ),
    pytest.param(
        "calib.cfg",
        "[full_quant_param]\nthread_num=1\n[common_quant_param]\n[full_quant_param]\n",
        "calib.cfg:4: section [full_quant_param] given twice (first on line 1)",
        id="ini-duplicate-section",
    ),
    pytest.param(
        "calib.cfg",
        "[data_preprocess_param]\ncalibrate_size=\n",
        "calib.cfg:2: [data_preprocess_param] calibrate_size: empty value; allowed: [1, 65535]",
        id="ini-empty-value",
    ),
    pytest.param(
        "calib.cfg",
        "[data_preprocess_param]\ncalibrate_size= # nothing\n",
        "calib.cfg:2: [data_preprocess_param] calibrate_size: empty value; allowed: [1, 65535]",
        id="ini-empty-value-with-comment",
    ),
    pytest.param(
        "calib.cfg",
        "[full_quant_param]\nper_channel=maybe\n",
        "calib.cfg:2: [full_quant_param] per_channel: 'maybe' is not a boolean; "
        "allowed: true, false (also 1/0, yes/no, on/off)",
        id="ini-bad-boolean",
    ),
    pytest.param(
        "calib.cfg",
        "[common_quant_param]\nquant_type=STATIC\n",
        "calib.cfg:2: [common_quant_param] quant_type: 'STATIC' is not supported; allowed: "
        "WeightQuant, PostTraining, DynamicQuant (MindSpore: WEIGHT_QUANT, FULL_QUANT, "
        "DYNAMIC_QUANT)",
        id="ini-unknown-quant-type",
    ),
    pytest.param(
        "calib.cfg",
        "[data_preprocess_param]\ninput_type=TEXT\n",
        "calib.cfg:2: [data_preprocess_param] input_type: 'TEXT' is not supported; allowed: "
        "BIN, IMAGE",
        id="ini-unknown-input-type",
    ),
    pytest.param(
        "calib.cfg",
        "[data_preprocess_param]\nnormalize_mean=[127.5, 1]\n",
        "calib.cfg:2: [data_preprocess_param] normalize_mean: 2 numbers given; allowed: "
        "[v1, ...] with 1 or 3 numbers in [-1e+09, 1e+09]",
        id="ini-image-vector-length",
    ),
    pytest.param(
        "calib.cfg",
        "[weight_quant_param]\ndequant_strategy=ON_THE_FLY\n",
        "calib.cfg:2: [weight_quant_param] dequant_strategy: 'ON_THE_FLY' has no meaning here: "
        "ON_THE_FLY is dequantization at run time on Ascend; ptqconv's DequantizeLinear nodes "
        "already dequantize at run time on onnxruntime's CPU provider",
        id="ini-ascend-on-the-fly",
    ),
    pytest.param(
        "calib.cfg",
        "[mixed_bit_weight_quant_param]\ninit_scale=1\n",
        "calib.cfg:2: [mixed_bit_weight_quant_param] init_scale: 1 is out of range; "
        "allowed: (0, 1)",
        id="ini-init-scale-open-interval",
    ),
    pytest.param(
        "calib.cfg",
        "[common_quant_param]\ntarget_device=auto\n[full_quant_param]\ntarget_device=CPU\n",
        "calib.cfg:4: [full_quant_param] target_device: given twice (first as "
        "[common_quant_param] target_device on line 2)",
        id="ini-target-device-in-two-sections",
    ),
    pytest.param(
        "calib.cfg",
        "[ascend_context]\nprovider=ge\n",
        f"calib.cfg:1: unknown section [ascend_context] (MindSpore's Ascend backend, which has "
        f"no meaning here: ptqconv writes ONNX for onnxruntime's CPU provider); allowed: "
        f"{SECTIONS}",
        id="ini-foreign-section",
    ),
    pytest.param(
        "calib.cfg",
        "[data_preprocess_param]\ncalibrate_path=input:/a,/data/b\n",
        "calib.cfg:2: [data_preprocess_param] calibrate_path: '/data/b' has no input name; "
        "expected name:dir (e.g. input:calib/input), items separated by ','",
        id="ini-calibrate-path-without-name",
    ),
    pytest.param(
        "calib.cfg",
        "[data_preprocess_param]\ncalibrate_path=a:x,a:y\n",
        "calib.cfg:2: [data_preprocess_param] calibrate_path: input 'a' given twice; "
        "each input has one directory",
        id="ini-calibrate-path-input-twice",
    ),
    pytest.param(
        "calib.cfg",
        "[data_preprocess_param]\ncalibrate_path=a:\n",
        "calib.cfg:2: [data_preprocess_param] calibrate_path: empty directory for input 'a'; "
        "allowed: name:dir[,name:dir...] with the input name before the last ':'",
        id="ini-calibrate-path-empty-dir",
    ),
    pytest.param(
        "calib.cfg",
        "[data_preprocess_param]\ninput_shape=input:1,0,8\n",
        "calib.cfg:2: [data_preprocess_param] input_shape: input 'input': dimension '0' is not a "
        "positive integer; allowed: name:d0,d1,...[;name:d0,d1,...] with every dimension a "
        "positive integer",
        id="ini-shape-zero-dim",
    ),
    pytest.param(
        "calib.cfg",
        "[data_preprocess_param]\ninput_shape=1,3,8,8\n",
        "calib.cfg:2: [data_preprocess_param] input_shape: '1,3,8,8' has no input name; "
        "expected name:d0,d1,... (e.g. input:1,3,8,8)",
        id="ini-shape-without-name",
    ),
    pytest.param(
        "calib.cfg",
        "[full_quant_param]\nthread_num 4\n",
        "calib.cfg:2: cannot parse 'thread_num 4'; expected key=value or a [section] header",
        id="ini-no-equals",
    ),
    pytest.param(
        "calib.cfg",
        "[full_quant_param]\nthread_num=1\n    per_channel=oops\n",
        "calib.cfg:3: [full_quant_param] per_channel: 'oops' is not a boolean; "
        "allowed: true, false (also 1/0, yes/no, on/off)",
        id="ini-indented-line-is-not-a-continuation",
    ),
    # flat form
    pytest.param(
        "calib.cfg",
        "image_path=a\n# c\nimage_paths=b\n",
        f"calib.cfg:3: image_paths is not supported; allowed keys: {FLAT_KEYS}",
        id="flat-unknown-key",
    ),
    pytest.param(
        "calib.cfg",
        "image_path=a\ncalibrate_size=3\n",
        f"calib.cfg:2: calibrate_size is not supported; allowed keys: {FLAT_KEYS} "
        "(calibrate_size is a sectioned-form key: start the file with a [data_preprocess_param] "
        "header to use that form)",
        id="flat-sectioned-key",
    ),
    pytest.param(
        "calib.cfg",
        "image_path=a\n\nbatch_count=70000\n",
        "calib.cfg:3: batch_count: 70000 is out of range; allowed: [1, 65535]",
        id="flat-out-of-range",
    ),
    pytest.param(
        "calib.cfg",
        "bias_correction=1\n",
        "calib.cfg:1: bias_correction: '1' is not a boolean; allowed: true, false",
        id="flat-strict-boolean",
    ),
    pytest.param(
        "calib.cfg",
        "method_x=minmax\n",
        "calib.cfg:1: method_x: 'minmax' is not supported; "
        "allowed: MAX_MIN, KL, REMOVAL_OUTLIER, MSE, AUTO",
        id="flat-bad-method",
    ),
    pytest.param(
        "calib.cfg",
        "image_path=a,,b\n",
        "calib.cfg:1: image_path: directory 2 of 3 is empty; allowed: dir[,dir...], one "
        "directory per model input, in input order",
        id="flat-empty-directory",
    ),
    pytest.param(
        "calib.cfg",
        "thread_num=2\nbatch_count=3\nthread_num=4\n",
        "calib.cfg:3: thread_num given twice (first on line 1)",
        id="flat-duplicate-key",
    ),
    pytest.param(
        "calib.cfg",
        "image_path=a\n[full_quant_param]\nthread_num=2\n",
        "calib.cfg:2: section header [full_quant_param] in a flat key=value config; a sectioned "
        "config starts with its first [section] header",
        id="flat-section-header",
    ),
    pytest.param(
        "calib.cfg",
        "image_path=a\nbatch_count\n",
        "calib.cfg:2: cannot parse 'batch_count'; expected key=value",
        id="flat-no-equals",
    ),
    pytest.param(
        "calib.cfg",
        "image_path=\n",
        "calib.cfg:1: image_path: empty value; allowed: dir[,dir...], one directory per model "
        "input, in input order",
        id="flat-empty-value",
    ),
    # YAML
    pytest.param(
        "calib.yaml",
        "common_quant_param:\n  bit_num: 8\n bad: [\n",
        "calib.yaml:3: not valid YAML: expected <block end>, but found '<block mapping start>'",
        id="yaml-syntax",
    ),
    pytest.param(
        "calib.yaml",
        "[common_quant_param]\nbit_num=8\n",
        "calib.yaml:2: not valid YAML: expected '<document start>', but found '<scalar>' "
        "(.yaml/.yml files are read as YAML)",
        id="yaml-extension-with-ini-content",
    ),
    pytest.param(
        "calib.yaml",
        "- common_quant_param\n",
        "calib.yaml:1: the top level must be a mapping of sections, got a list; "
        f"allowed: {SECTIONS}",
        id="yaml-top-level-list",
    ),
    pytest.param(
        "calib.yaml",
        "# c\ncommon_quant_param: 8\n",
        "calib.yaml:2: section [common_quant_param] must be a mapping of key: value, "
        "got a single value",
        id="yaml-section-not-a-mapping",
    ),
    pytest.param(
        "calib.yaml",
        "full_quant_param:\n  thread_num: 2\nfoo:\n  a: 1\n",
        f"calib.yaml:3: unknown section [foo]; allowed: {SECTIONS}",
        id="yaml-unknown-section",
    ),
    pytest.param(
        "calib.yml",
        "common_quant_param:\n  bit_num: 8\n\n  bitnum: 8\n",
        f"calib.yml:4: [common_quant_param] bitnum is not supported; allowed keys: {COMMON_KEYS}",
        id="yaml-unknown-key",
    ),
    pytest.param(
        "calib.yaml",
        "full_quant_param:\n  bias_correction: true\n  thread_num: 2\n  bias_correction: false\n",
        "calib.yaml:4: [full_quant_param] bias_correction given twice (first on line 2)",
        id="yaml-duplicate-key",
    ),
    pytest.param(
        "calib.yaml",
        "full_quant_param: {}\ncommon_quant_param: {}\nfull_quant_param: {}\n",
        "calib.yaml:3: section [full_quant_param] given twice (first on line 1)",
        id="yaml-duplicate-section",
    ),
    pytest.param(
        "calib.yaml",
        "data_preprocess_param:\n  calibrate_size: 65536\n",
        "calib.yaml:2: [data_preprocess_param] calibrate_size: 65536 is out of range; "
        "allowed: [1, 65535]",
        id="yaml-out-of-range",
    ),
    pytest.param(
        "calib.yaml",
        "common_quant_param:\n  bit_num: 0x10\n",
        "calib.yaml:2: [common_quant_param] bit_num: '0x10' is not an integer; allowed: [0, 16]",
        id="yaml-base-10-only",
    ),
    pytest.param(
        "calib.yaml",
        "common_quant_param:\n  bit_num: [8]\n",
        "calib.yaml:2: [common_quant_param] bit_num: expected one value, got a YAML list; "
        "allowed: [0, 16]",
        id="yaml-list-for-a-single-value",
    ),
    pytest.param(
        "calib.yaml",
        "data_preprocess_param:\n  calibrate_path:\n",
        "calib.yaml:2: [data_preprocess_param] calibrate_path: empty value; "
        "allowed: name:dir[,name:dir...] with the input name before the last ':'",
        id="yaml-empty-value",
    ),
    pytest.param(
        "calib.yaml",
        "common_quant_param:\n  quant_type: !!python/object/apply:os.system [echo]\n",
        "calib.yaml:2: not valid YAML: could not determine a constructor for the tag "
        "'tag:yaml.org,2002:python/object/apply:os.system'",
        id="yaml-unsafe-tag",
    ),
    pytest.param(
        "calib.yaml",
        "full_quant_param:\n  thread_num: 1\n---\nfull_quant_param: {}\n",
        "calib.yaml:3: not valid YAML: expected a single document in the stream, "
        "but found another document",
        id="yaml-two-documents",
    ),
    # any form
    pytest.param(
        "calib.cfg",
        "",
        "calib.cfg: empty file: no settings, only blank lines and comments",
        id="empty-file",
    ),
    pytest.param(
        "calib.yaml",
        "# nothing\n\n",
        "calib.yaml: empty file: no settings, only blank lines and comments",
        id="only-comments",
    ),
]


@pytest.mark.parametrize(("name", "text", "message"), ERRORS)
def test_errors_name_file_line_section_key_value_and_allowed(here, name, text, message):
    _write(here / name, text)
    assert failure(name) == message


def test_unreadable_files(here):
    assert failure("calib.cfg") == "calib.cfg: cannot read: No such file or directory"
    (here / "dir.cfg").mkdir()
    assert failure("dir.cfg") == "dir.cfg: cannot read: Is a directory"
    (here / "bin.cfg").write_bytes(b"image_path=a\nbatch_count=\xff\n")
    assert failure("bin.cfg") == "bin.cfg:2: cannot read: not UTF-8 text (byte 0xff)"


def test_a_bom_and_crlf_line_ends_are_fine(here):
    (here / "c.ini").write_bytes(b"\xef\xbb\xbf[full_quant_param]\r\nthread_num=3\r\nfoo=1\r\n")
    assert failure("c.ini").startswith("c.ini:3: [full_quant_param] foo is not supported")


def test_messages_stay_on_one_line_whatever_the_value(here):
    _put("c.yaml", 'full_quant_param:\n  activation_quant_method: "K\\nL\\u2028X"\n')
    assert failure("c.yaml") == (
        "c.yaml:2: [full_quant_param] activation_quant_method: 'K\\nL\\u2028X' is not supported; "
        "allowed: MAX_MIN, KL, REMOVAL_OUTLIER, MSE, AUTO"
    )
    _put("c.yaml", 'full_quant_param:\n  "bad key\\n": 1\n')
    assert failure("c.yaml") == (
        f"c.yaml:2: [full_quant_param] 'bad key\\n' is not supported; allowed keys: {FULL_KEYS}"
    )


def test_the_first_problem_in_file_order_is_reported(here):
    _put("c.yaml", "full_quant_param:\n  thread_num: 0\nfoo: {}\n")
    assert failure("c.yaml").startswith(
        "c.yaml:2: [full_quant_param] thread_num: 0 is out of range")


# --- properties -----------------------------------------------------------------------------------

NAME = st.from_regex(r"[A-Za-z_/][A-Za-z0-9_./:-]{0,10}", fullmatch=True)
DIR = st.from_regex(
    r"(/|\.\./)?[A-Za-z0-9_-][A-Za-z0-9_.-]{0,7}(/[A-Za-z0-9_-]{1,8}){0,2}", fullmatch=True
)


def _spelled(value, *spellings):
    return st.sampled_from(spellings).map(lambda text: (value, text, text))


def _integer(low, high):
    return st.integers(low, high).map(lambda n: (n, str(n), n))


def _boolean():
    true = ("true", "True", "TRUE", "1", "yes", "on")
    false = ("false", "False", "0", "no", "OFF")
    texts = st.one_of(*(_spelled(True, t) for t in true), *(_spelled(False, t) for t in false))
    native = st.booleans().map(lambda b: (b, str(b).lower(), b))
    return st.one_of(texts, native)


@st.composite
def _skip_names(draw):
    names = draw(st.lists(NAME, max_size=4))
    as_yaml = draw(st.sampled_from([names, ",".join(names)]))
    return tuple(names), ",".join(names), as_yaml


@st.composite
def _calibrate_path(draw):
    names = draw(st.lists(NAME, min_size=1, max_size=3, unique=True))
    dirs = draw(st.lists(DIR, min_size=len(names), max_size=len(names)))
    items = [f"{n}:{d}" for n, d in zip(names, dirs, strict=True)]
    as_yaml = draw(st.sampled_from([dict(zip(names, dirs, strict=True)), items, ",".join(items)]))
    return tuple(zip(names, dirs, strict=True)), ",".join(items), as_yaml


@st.composite
def _input_shape(draw):
    names = draw(st.lists(NAME, min_size=1, max_size=3, unique=True))
    shapes = [tuple(draw(st.lists(st.integers(1, 4096), min_size=1, max_size=4))) for _ in names]
    text = ";".join(f"{n}:{','.join(map(str, s))}" for n, s in zip(names, shapes, strict=True))
    as_yaml = draw(
        st.sampled_from(
            [
                {n: list(s) for n, s in zip(names, shapes, strict=True)},
                {n: ",".join(map(str, s)) for n, s in zip(names, shapes, strict=True)},
                text,
            ]
        )
    )
    return tuple(zip(names, shapes, strict=True)), text, as_yaml


# (section, key) -> strategy of (expected value, INI text, YAML value)
SCHEMA = {
    ("common_quant_param", "quant_type"): st.one_of(
        _spelled("WeightQuant", "WEIGHT_QUANT", "WeightQuant", "weight_quant"),
        _spelled("PostTraining", "FULL_QUANT", "PostTraining", "full_quant"),
    ),
    ("common_quant_param", "bit_num"): _integer(0, 16),
    ("common_quant_param", "min_quant_weight_size"): _integer(0, 65535),
    ("common_quant_param", "min_quant_weight_channel"): _integer(0, 65535),
    ("common_quant_param", "skip_quant_node"): _skip_names(),
    ("common_quant_param", "debug_info_save_path"): DIR.map(lambda d: (d, d, d)),
    ("common_quant_param", "target_device"): st.one_of(
        _spelled("auto", "auto", "CPU", "cpu"),
        _spelled("x86_vnni", "x86_vnni", "X86_VNNI", "x86vnni"),
        _spelled("arm64", "arm64", "ARM64"),
    ),
    ("data_preprocess_param", "calibrate_path"): _calibrate_path(),
    ("data_preprocess_param", "calibrate_size"): _integer(1, 65535),
    ("data_preprocess_param", "input_type"): st.one_of(
        _spelled("BIN", "BIN", "bin", "Bin"), _spelled("IMAGE", "IMAGE", "image")),
    ("data_preprocess_param", "image_to_format"): _spelled("GRAY", "GRAY", "gray"),
    ("data_preprocess_param", "normalize_mean"): st.lists(
        st.integers(-1000, 1000), min_size=3, max_size=3).map(
        lambda v: (tuple(float(x) for x in v), "[" + ", ".join(map(str, v)) + "]",
                   [str(x) for x in v])),
    ("data_preprocess_param", "resize_width"): _integer(1, 65535),
    ("data_preprocess_param", "resize_method"): _spelled("CUBIC", "CUBIC", "cubic"),
    ("full_quant_param", "enable_all_ops"): _boolean(),
    ("weight_quant_param", "per_channel"): _boolean(),
    ("weight_quant_param", "quant_strategy"): _spelled("GPTQ", "GPTQ", "gptq"),
    ("weight_quant_param", "measure_latency"): _boolean(),
    ("mixed_bit_weight_quant_param", "max_iterations"): _integer(40, 65535),
    ("mixed_bit_weight_quant_param", "auto_tune"): _boolean(),
    ("dynamic_quant_param", "quant_strategy"): _spelled("ACWL", "ACWL", "acwl"),
    ("dynamic_quant_param", "measure_latency"): _boolean(),
    ("data_preprocess_param", "input_shape"): _input_shape(),
    ("full_quant_param", "activation_quant_method"): st.one_of(
        _spelled("MAX_MIN", "MAX_MIN", "max_min", "MaxMin"),
        _spelled("KL", "KL", "kl"),
        _spelled("REMOVAL_OUTLIER", "REMOVAL_OUTLIER", "RemovalOutlier", "removal_outlier"),
    ),
    ("full_quant_param", "bias_correction"): _boolean(),
    ("full_quant_param", "per_channel"): _boolean(),
    ("full_quant_param", "reduce_range"): _boolean(),
    ("full_quant_param", "smooth_quant"): _boolean(),
    ("full_quant_param", "equalize"): _boolean(),
    ("full_quant_param", "latency_aware"): _boolean(),
    ("full_quant_param", "measure_latency"): _boolean(),
    ("full_quant_param", "embedding_quant"): _boolean(),
    ("full_quant_param", "histogram_sampling"): _boolean(),
    ("full_quant_param", "activation_bit_num"): _integer(1, 8),
    ("full_quant_param", "thread_num"): _integer(1, 64),
    ("evaluate_param", "eval_size"): _integer(1, 65535),
}
PATHS = {"debug_info_save_path", "calibrate_path"}
# Keys two sections share are kept in fields of their own.
FIELDS = {
    ("weight_quant_param", "per_channel"): "weight_per_channel",
    ("weight_quant_param", "quant_strategy"): "weight_quant_strategy",
    ("weight_quant_param", "measure_latency"): "weight_measure_latency",
    ("dynamic_quant_param", "quant_strategy"): "dynamic_quant_strategy",
    ("dynamic_quant_param", "measure_latency"): "dynamic_measure_latency",
}
NOT_KEPT = {"enable_all_ops"}  # checked, nothing kept


def _expected(key, value, base):
    if key == "quant_type":
        return QuantType(value) if value in ("WeightQuant", "PostTraining") else value
    if key == "skip_quant_node":
        return tuple(dict.fromkeys(value))  # each name once
    if key == "debug_info_save_path":
        return under(base, value)
    if key == "calibrate_path":
        return tuple((name, under(base, d)) for name, d in value)
    return value


def _render_ini(chosen) -> tuple[str, dict[str, int]]:
    lines, where = [], {}
    for section in (
        "common_quant_param",
        "data_preprocess_param",
        "full_quant_param",
        "weight_quant_param",
        "mixed_bit_weight_quant_param",
        "dynamic_quant_param",
        "evaluate_param",
    ):
        keys = [(k, v) for (s, k), v in chosen.items() if s == section]
        if keys:
            lines += ["", f"[{section}]", "# keys"]
        for key, (_, text, _) in keys:
            lines.append(f"{key}={text}")
            where[FIELDS.get((section, key), key)] = len(lines)
    return "\n".join(lines) + "\n", where


def _render_yaml(chosen) -> str:
    document: dict = {}
    for (section, key), (_, _, value) in chosen.items():
        document.setdefault(section, {})[key] = value
    return yaml.safe_dump(document, sort_keys=False) if document else "full_quant_param: {}\n"


@FAST
@given(chosen=st.fixed_dictionaries({}, optional=SCHEMA))
def test_round_trip_ini_and_yaml(tmp_path, chosen):
    ini_text, where = _render_ini(chosen)
    ini = load_config(_write(tmp_path / "c.ini", ini_text if chosen else "[full_quant_param]\n"))
    yml = load_config(_write(tmp_path / "c.yaml", _render_yaml(chosen)))
    expected = {FIELDS.get((section, key), key): _expected(key, v[0], tmp_path)
                for (section, key), v in chosen.items() if key not in NOT_KEPT}
    for config in (ini, yml):
        got = values(config)
        assert {key: got[key] for key in expected} == expected
        defaults = values(QuantConfig(source=tmp_path, format="ini"))
        assert {k: v for k, v in got.items() if k not in expected} == {
            k: v for k, v in defaults.items() if k not in expected
        }
    assert {k: ini.lines[k] for k in where if k not in NOT_KEPT} == {
        k: v for k, v in where.items() if k not in NOT_KEPT}


FLAT_SCHEMA = {
    "image_path": st.lists(DIR, min_size=1, max_size=3),
    "batch_count": st.integers(1, 65535),
    "method_x": st.sampled_from(["MAX_MIN", "KL", "RemovalOutlier"]),
    "thread_num": st.integers(1, 64),
    "bias_correction": st.sampled_from(["true", "false", "TRUE", "False"]),
    "input_shape": _input_shape(),
}


@FAST
@given(
    chosen=st.fixed_dictionaries({}, optional=FLAT_SCHEMA).filter(bool),
    comments=st.lists(st.booleans()),
)
def test_round_trip_flat(tmp_path, chosen, comments):
    lines, where = [], {}
    for index, (key, value) in enumerate(chosen.items()):
        if index < len(comments) and comments[index]:
            lines += ["# comment", ""]
        text = {"image_path": ",".join, "input_shape": lambda v: v[1]}.get(key, str)(value)
        lines.append(f"{key}={text}")
        where[key] = len(lines)
    config = load_config(_write(tmp_path / "c.cfg", "\n".join(lines) + "\n"))
    assert config.format == "flat"
    if "image_path" in chosen:
        assert config.calibrate_path == tuple(
            (None, under(tmp_path, d)) for d in chosen["image_path"]
        )
    assert config.calibrate_size == chosen.get("batch_count")
    method = chosen.get("method_x")
    assert config.activation_quant_method == (
        "REMOVAL_OUTLIER" if method and method[0] == "R" else method)
    assert config.thread_num == chosen.get("thread_num")
    bias = chosen.get("bias_correction")
    assert config.bias_correction == (None if bias is None else bias.lower() == "true")
    assert config.input_shape == (chosen["input_shape"][0] if "input_shape" in chosen else None)
    assert {k: config.lines[k] for k in where} == where


KNOWN = {key for _, key in SCHEMA} | set(FLAT_SCHEMA) | {"true", "false", "yes", "no", "on"}
JUNK = st.from_regex(r"[A-Za-z_][A-Za-z0-9_.-]{0,15}", fullmatch=True).filter(
    lambda k: k not in KNOWN
)


@FAST
@given(key=JUNK, position=st.integers(0, 3), form=st.sampled_from(["ini", "yaml", "flat"]))
def test_junk_keys_are_rejected_naming_the_key_and_its_line(tmp_path, key, position, form):
    if form == "flat":
        lines = ["image_path=d", "# c", "batch_count=10", "thread_num=2"]
        lines.insert(position, f"{key}=1")
        prefix = f"{key} is not supported; allowed keys: {FLAT_KEYS}"
        line = position + 1
    else:
        body = ["thread_num{0}2", "# c", "per_channel{0}true", "bias_correction{0}false"]
        body.insert(position, key + "{0}1")
        if form == "ini":
            lines = ["[full_quant_param]"] + [b.format("=") for b in body]
        else:
            lines = ["full_quant_param:"] + ["  " + b.format(": ") for b in body]
        prefix = f"[full_quant_param] {key} is not supported; allowed keys: {FULL_KEYS}"
        line = position + 2
    path = _write(tmp_path / f"c.{form}", "\n".join(lines) + "\n")
    assert failure(path) == f"{path}:{line}: {prefix}"


INT_KEYS = [
    ("common_quant_param", "bit_num", 0, 16),
    ("common_quant_param", "min_quant_weight_size", 0, 65535),
    ("common_quant_param", "min_quant_weight_channel", 0, 65535),
    ("data_preprocess_param", "calibrate_size", 1, 65535),
    ("full_quant_param", "thread_num", 1, 64),
    ("mixed_bit_weight_quant_param", "max_iterations", 40, 65535),
]


@FAST
@given(
    spec=st.sampled_from(INT_KEYS),
    data=st.data(),
    form=st.sampled_from(["ini", "yaml", "flat"]),
)
def test_integers_out_of_range_are_rejected(tmp_path, spec, data, form):
    section, key, low, high = spec
    number = data.draw(
        st.one_of(st.integers(max_value=low - 1), st.integers(min_value=high + 1)), label="n"
    )
    # Past 18 digits the number is not even read: too large (or small) says so.
    why = ("out of range" if len(str(abs(number))) <= 18
           else "too small" if number < 0 else "too large")
    allowed = f"{number} is {why}; allowed: [{low}, {high}]"
    if form == "flat":
        flat_key = {"calibrate_size": "batch_count", "thread_num": "thread_num"}.get(key)
        if flat_key is None:
            return
        path = _write(tmp_path / "c.cfg", f"image_path=d\n{flat_key}={number}\n")
        expected = f"{path}:2: {flat_key}: {allowed}"
    elif form == "ini":
        path = _write(tmp_path / "c.ini", f"# c\n[{section}]\n{key} = {number}\n")
        expected = f"{path}:3: [{section}] {key}: {allowed}"
    else:
        path = _write(tmp_path / "c.yaml", f"# c\n{section}:\n  {key}: {number}\n")
        expected = f"{path}:3: [{section}] {key}: {allowed}"
    assert failure(path) == expected


FRAGMENTS = st.sampled_from(
    [
        "\n", " ", "=", ":", ",", ";", "#", "[", "]", "-", "{", "}", "'", '"', "  ", "0", "8",
        "99999", "x", "~", "&a", "*a", "!!str", "\t", "\r", "\x85", "\u2028",
        "[common_quant_param]", "[full_quant_param]", "[data_preprocess_param]",
        "common_quant_param:", "full_quant_param:", "data_preprocess_param:",
        "bit_num", "calibrate_path", "input_shape", "image_path", "batch_count",
        "skip_quant_node", "thread_num", "bias_correction", "input:1,3", "true",
    ]
)  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(
    parts=st.lists(st.one_of(FRAGMENTS, st.text(max_size=3)), max_size=30),
    suffix=st.sampled_from([".cfg", ".ini", ".yaml"]),
)
def test_any_text_gives_a_config_or_a_one_line_usage_error(tmp_path_factory, parts, suffix):
    path = tmp_path_factory.getbasetemp() / f"fuzz{suffix}"
    path.write_text("".join(parts), encoding="utf-8", errors="surrogatepass")
    try:
        config = load_config(path)
    except PtqUsageError as exc:
        assert len(str(exc).splitlines()) == 1 and str(exc).startswith(str(path))
    else:
        assert config.format in ("flat", "ini", "yaml")


def _put(name: str, text: str) -> str:
    """Write `name` in the current directory (see `here`) and return the name as given."""
    Path(name).write_text(text, encoding="utf-8")
    return name


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(("extra", "args", "message"), [
    ("per_channel=false\nequalize=true\n", [],
     "equalize: true needs per_channel=true (cross-layer equalization rescales weight "
     "channels)"),
    ("", ["--quantWeightSize=0"],
     "--quantWeightSize is for --quantType=WeightQuant and DynamicQuant"),
    ("", ["--bitNum=4"], None),
])
def test_post_training_settings_that_cannot_apply_are_refused(tmp_path, capsys, extra, args,
                                                             message):
    """A sweep found them ignored in silence (the equalization asked for never ran)."""
    config = tmp_path / "c.ini"
    config.write_text(f"[common_quant_param]\nenable_encode=false\n[data_preprocess_param]\n"
                      f"calibrate_path=input:{DIGITS / 'calib' / 'input'}\n"
                      f"[full_quant_param]\n{extra}")
    status = main([f"--modelFile={DIGITS / 'model.onnx'}", f"--outputFile={tmp_path / 'q.onnx'}",
                   "--quantType=PostTraining", f"--configFile={config}", *args])
    err = capsys.readouterr().err
    assert status == 2, err
    # enable_encode=false below 8 bits is refused for PostTraining as for WeightQuant.
    assert (message or "enable_encode: false needs bit_num 8 or 16") in err, err


@pytest.mark.parametrize(("given", "shown"), [("-32", "-32 is out of range"),
                                               ("24", "24 is not allowed"),
                                               (str(2**30), "1073741824 is out of range")])
def test_block_size_errors_state_the_rule_with_integer_bounds(given, shown):
    """`allowed: [0, 1.04858e+06]` gave a float for an integer bound and not the rule."""
    from ptqconv import values

    with pytest.raises(values.Invalid) as caught:
        values.block_size(given)
    assert str(caught.value).startswith(f"{shown}; allowed: 0 (per channel) or a power of two "
                                        ">= 16")
    assert "e+" not in str(caught.value)


@pytest.mark.parametrize(("quant_type", "section", "key"), [
    ("WeightQuant", "full_quant_param", "per_channel=false"),
    ("DynamicQuant", "weight_quant_param", "quant_strategy=GPTQ"),
    ("PostTraining", "mixed_bit_weight_quant_param", "init_scale=0.5"),
])
def test_another_quant_types_section_is_refused(tmp_path, capsys, quant_type, section, key):
    """Its keys were ignored in silence (a sweep: per_channel=false under WeightQuant)."""
    config = tmp_path / "c.ini"
    config.write_text(f"[data_preprocess_param]\ncalibrate_path=input:"
                      f"{DIGITS / 'calib' / 'input'}\n[{section}]\n{key}\n")
    status = main([f"--modelFile={DIGITS / 'model.onnx'}", f"--outputFile={tmp_path / 'q.onnx'}",
                   f"--quantType={quant_type}", f"--configFile={config}"])
    err = capsys.readouterr().err
    assert status == 2, err
    owner = {"full_quant_param": "PostTraining", "weight_quant_param": "WeightQuant",
             "mixed_bit_weight_quant_param": "WeightQuant"}[section]
    assert (f"{config}:4: [{section}] {key.split('=')[0]}: [{section}] is for "
            f"--quantType={owner}, not {quant_type}") in err, err
    assert not (tmp_path / "q.onnx").exists()
