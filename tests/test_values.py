"""The value parsers shared by flags, configs and the benchmark."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ptqconv import values
from ptqconv.values import Invalid, QuantType

names = st.text(
    alphabet=st.characters(blacklist_characters=";", blacklist_categories=("Cs",)), min_size=1
).filter(lambda s: s == s.strip() and s != "")
dims = st.lists(st.integers(1, 10**6), min_size=1, max_size=6).map(tuple)


@given(st.dictionaries(names, dims, min_size=1, max_size=4), st.sampled_from(["", " "]))
@settings(max_examples=150, deadline=None)
def test_shapes_round_trip(spec_map, pad):
    text = ";".join(f"{pad}{n}{pad}:{pad}{','.join(map(str, s))}" for n, s in spec_map.items())
    assert dict(values.shapes(text)) == spec_map
    assert [n for n, _ in values.shapes(text + ";")] == list(spec_map)


@given(st.text(max_size=40))
@settings(max_examples=300, deadline=None)
def test_shapes_never_crash(text):
    try:
        result = values.shapes(text)
    except Invalid as exc:
        assert "\n" not in str(exc)
    else:
        assert result
        for name, shape in result:
            assert name and all(isinstance(d, int) and d > 0 for d in shape)


@given(names, st.text(alphabet="abc-.e x0", min_size=1, max_size=5))
@settings(max_examples=100, deadline=None)
def test_shapes_reject_non_integer_dims(name, junk):
    if junk.strip().isdigit() and int(junk) > 0:
        return
    with pytest.raises(Invalid, match="is not a positive integer"):
        values.shapes(f"{name}:1,{junk}")


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("", "no input given"),
        (" ; ", "no input given"),
        ("x1,3,224", "'x1,3,224' has no input name"),
        (":1,3", "':1,3' has no input name"),
        ("x:", "input 'x' has no dimensions"),
        ("x:1,,3", "dimension '' is not a positive integer"),
        ("x:1,0", "dimension '0' is not a positive integer"),
        ("x:1,-1", "dimension '-1' is not a positive integer"),
        ("x:1.5", "dimension '1.5' is not a positive integer"),
        ("x:١", "is not a positive integer"),  # Arabic-Indic digit: int() would take it
        ("x:1;y:2;x:3", "input 'x' given twice"),
    ],
)
def test_shapes_reject_junk(text, needle):
    with pytest.raises(Invalid) as info:
        values.shapes(text)
    assert needle in str(info.value)


def test_shapes_take_names_with_colons_and_spaces():
    assert values.shapes(" x:0 : 1, 3 ;ids:1,64;") == (("x:0", (1, 3)), ("ids", (1, 64)))


@given(st.integers(-10**6, 10**6), st.integers(-100, 100), st.integers(0, 200))
def test_integer_accepts_exactly_the_range(number, low, span):
    high = low + span
    if low <= number <= high:
        assert values.integer(str(number), low, high) == number
        assert values.integer(f" {number} ", low, high) == number
    else:
        # A one-value range is that value ("allowed: 8", not "[8, 8]").
        allowed = rf"{low}$" if span == 0 else rf"\[{low}, {high}\]$"
        with pytest.raises(Invalid, match=rf"^{number} is out of range; allowed: {allowed}"):
            values.integer(str(number), low, high)


@pytest.mark.parametrize("text", ["4.5", "0x10", "eight", "", "1e3", "١", True])
def test_integer_rejects_what_is_not_base_10(text):
    with pytest.raises(Invalid, match="is not an integer; allowed: >= 0"):
        values.integer(text, 0)


def test_real_rejects_nan_and_out_of_range():
    assert values.real("0.5", 0, 1) == 0.5
    for bad, why in (("nan", "out of range"), ("2", "out of range"), ("x", "not a number")):
        with pytest.raises(Invalid, match=why):
            values.real(bad, 0, 1)


@pytest.mark.parametrize(("text", "expected"), [
    ("true", True), ("FALSE", False), ("1", True), ("off", False), (" Yes ", True)])
def test_boolean(text, expected):
    assert values.boolean(text) is expected


def test_strict_boolean_is_the_flat_forms():
    assert values.boolean("TRUE", strict=True) is True
    with pytest.raises(Invalid, match=r"allowed: true, false$"):
        values.boolean("1", strict=True)


def test_name_dirs_split_at_the_last_colon():
    assert values.name_dirs("x:0:calib/x, ids:calib/ids,") == (
        ("x:0", "calib/x"), ("ids", "calib/ids"))
    assert values.name_dirs("a,b", positional=True) == ((None, "a"), (None, "b"))
    for text, why in (("a", "has no input name"), ("x:a,,y:b", "item 2 of 3 is empty"),
                      ("x:a,x:b", "input 'x' given twice"), (":a", "empty input name"),
                      ("x:", "empty directory")):
        with pytest.raises(Invalid, match=why):
            values.name_dirs(text)
    with pytest.raises(Invalid, match="some directories are named by input and some are not"):
        values.name_dirs("x:a,b", positional=True)


@pytest.mark.parametrize(("text", "expected"), [
    ("WeightQuant", QuantType.WEIGHT_QUANT), ("weight_quant", QuantType.WEIGHT_QUANT),
    ("FULL_QUANT", QuantType.POST_TRAINING), ("posttraining", QuantType.POST_TRAINING)])
def test_quant_type_spellings(text, expected):
    assert values.quant_type(text) is expected


def test_quant_type_dynamic_spellings():
    for text in ("DYNAMIC_QUANT", "DynamicQuant", "dynamicquant"):
        assert values.quant_type(text) is QuantType.DYNAMIC_QUANT


@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False).map(lambda v: round(v, 3)),
                min_size=1, max_size=3).filter(lambda v: len(v) != 2),
       st.booleans())
def test_reals_round_trip(numbers, brackets):
    text = ", ".join(repr(v) for v in numbers)
    assert values.reals(f"[{text}]" if brackets else text, -1e9, 1e9) == tuple(numbers)


@given(st.lists(st.lists(st.integers(1, 4096), min_size=1, max_size=4), min_size=1,
                max_size=3))
def test_positional_shapes_round_trip(shapes):
    text = ":".join(",".join(map(str, s)) for s in shapes)
    assert values.positional_shapes(text) == tuple(tuple(s) for s in shapes)


def test_data_format_and_bad_positional_shape():
    assert values.data_format("nhwc") == "NHWC"
    with pytest.raises(Invalid, match="allowed: NHWC, NCHW"):
        values.data_format("HWC")
    with pytest.raises(Invalid, match="dimension '0' is not a positive integer"):
        values.positional_shapes("1,3,0,4")
