"""Calibration data as raw .bin files: pairing, ordering, shapes, validation, streaming."""

from __future__ import annotations

import tracemalloc
import weakref
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from ptqconv.calibrate.dataset import (
    CalibrationSet,
    InputSpec,
    SampleFormat,
    model_inputs,
)
from ptqconv.errors import PtqError, PtqUsageError

F32 = np.dtype(np.float32)
I64 = np.dtype(np.int64)


def spec(name, dtype, shape):
    return InputSpec(name, np.dtype(dtype), tuple(shape))


# The model of most tests: x float32 [N,3,4,4] (dynamic batch), ids int64 [1,seq].
X = spec("x", F32, ("N", 3, 4, 4))
IDS = spec("ids", I64, (1, "seq"))


def write(directory: Path, arrays, names=None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(arrays):
        np.asarray(a).tofile(directory / (names[i] if names else f"{i:06d}.bin"))
    return directory


def two_input_data(tmp_path: Path, n: int = 3, seq: int = 5):
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((1, 3, 4, 4)).astype(np.float32) for _ in range(n)]
    ids = [rng.integers(0, 30000, (1, seq)).astype(np.int64) for _ in range(n)]
    return xs, ids, write(tmp_path / "x", xs), write(tmp_path / "ids", ids)


def usage_error(*args, **kwargs) -> str:
    """The one-line message of the PtqUsageError that CalibrationSet.open raises."""
    with pytest.raises(PtqUsageError) as info:
        CalibrationSet.open(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert info.value.exit_code == 2
    return message


# ---------------------------------------------------------------- model_inputs


def test_model_inputs_skips_initializers_and_maps_types(tmp_path):
    w = numpy_helper.from_array(np.ones((2, 2), np.float32), "w")
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4]),
        helper.make_tensor_value_info("ids", TensorProto.INT64, [1, "seq"]),
        helper.make_tensor_value_info("flag", TensorProto.BOOL, [2, None]),
        helper.make_tensor_value_info("h", TensorProto.FLOAT16, None),
        helper.make_tensor_value_info("w", TensorProto.FLOAT, [2, 2]),
    ]
    outputs = [helper.make_tensor_value_info(f"o{i}", v.type.tensor_type.elem_type, None)
               for i, v in enumerate(inputs)]
    nodes = [helper.make_node("Identity", [v.name], [f"o{i}"]) for i, v in enumerate(inputs)]
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, [w]),
                              opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, tmp_path / "m.onnx")

    specs = model_inputs(tmp_path / "m.onnx")
    assert [s.name for s in specs] == ["x", "ids", "flag", "h"]
    assert specs[0] == InputSpec("x", F32, ("N", 3, 4, 4))
    assert specs[1] == InputSpec("ids", I64, (1, "seq"))
    assert specs[2] == InputSpec("flag", np.dtype(bool), (2, None))
    assert specs[3] == InputSpec("h", np.dtype(np.float16), None)  # no shape: unknown rank


def test_model_inputs_rejects_bad_files(tmp_path):
    with pytest.raises(PtqError, match=r"missing\.onnx: cannot read"):
        model_inputs(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"\xff\xff\xff not protobuf")
    with pytest.raises(PtqError, match=r"junk\.onnx: not an ONNX model"):
        model_inputs(tmp_path / "junk.onnx")
    seq = helper.make_tensor_sequence_value_info("s", TensorProto.FLOAT, None)
    out = helper.make_tensor_value_info("o", TensorProto.FLOAT, None)
    node = helper.make_node("SequenceAt", ["s", "i"], ["o"])
    i = numpy_helper.from_array(np.array(0, np.int64), "i")
    onnx.save(helper.make_model(helper.make_graph([node], "g", [seq], [out], [i]),
                                opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "s.onnx")
    with pytest.raises(PtqError, match=r"s\.onnx: model input 's' is a sequence, not a tensor"):
        model_inputs(tmp_path / "s.onnx")


# ---------------------------------------------------------------- pairing and order


def test_positional_pairing_reads_every_sample(tmp_path):
    xs, ids, dx, di = two_input_data(tmp_path)
    cs = CalibrationSet.open([X, IDS], [(None, dx), (None, di)], count=100)
    assert len(cs) == 3
    assert cs.inputs == (X, IDS)
    assert cs.shapes == {"x": (1, 3, 4, 4), "ids": (1, 5)}
    assert cs.files["x"] == [dx / f"{i:06d}.bin" for i in range(3)]
    samples = list(cs)
    assert len(samples) == 3
    for k, sample in enumerate(samples):
        assert list(sample) == ["x", "ids"]
        np.testing.assert_array_equal(sample["x"], xs[k])
        np.testing.assert_array_equal(sample["ids"], ids[k])
        assert sample["ids"].dtype == np.int64
    # Re-iterable.
    np.testing.assert_array_equal(next(iter(cs))["x"], xs[0])


def test_named_pairing_in_any_order(tmp_path):
    xs, ids, dx, di = two_input_data(tmp_path)
    cs = CalibrationSet.open([X, IDS], [("ids", di), ("x", dx)], count=2)
    assert [s.name for s in cs.inputs] == ["x", "ids"]  # model order
    assert len(cs) == 2
    sample = next(iter(cs))
    np.testing.assert_array_equal(sample["x"], xs[0])
    np.testing.assert_array_equal(sample["ids"], ids[0])


def test_lexicographic_order_hidden_files_and_count(tmp_path):
    names = ["b.bin", "9.bin", "a.raw", "10.bin"]
    arrays = [np.full((1, 2), i, np.float32) for i in range(4)]
    d = write(tmp_path / "x", arrays, names)
    (d / ".DS_Store").write_bytes(b"junk of another size")
    (d / "sub").mkdir()
    s = spec("x", F32, (1, 2))
    cs = CalibrationSet.open([s], [(None, d)], count=3)
    assert [p.name for p in cs.files["x"]] == ["10.bin", "9.bin", "a.raw"]
    assert [float(x["x"][0, 0]) for x in cs] == [3.0, 1.0, 2.0]
    # Fewer files than count: use them all.
    assert len(CalibrationSet.open([s], [(None, d)], count=1000)) == 4


@pytest.mark.parametrize(
    "dtype", [np.float32, np.float16, np.float64, np.int64, np.int32, np.int8, np.uint8, bool]
)
def test_values_read_back_exactly(tmp_path, dtype):
    rng = np.random.default_rng(1)
    if dtype is bool:
        arrays = [rng.integers(0, 2, (2, 3)).astype(bool) for _ in range(3)]
    elif np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        arrays = [rng.integers(info.min, info.max, (2, 3), dtype=dtype) for _ in range(3)]
    else:
        arrays = [(rng.standard_normal((2, 3)) * 100).astype(dtype) for _ in range(3)]
    d = write(tmp_path / "v", arrays)
    cs = CalibrationSet.open([spec("v", dtype, (2, 3))], [(None, d)], count=3)
    got = [x["v"] for x in cs]
    for a, b in zip(arrays, got, strict=True):
        assert b.dtype == np.dtype(dtype) and b.shape == (2, 3)
        assert a.tobytes() == b.tobytes()


# ---------------------------------------------------------------- shapes


def test_one_dynamic_dim_inferred_from_file_size(tmp_path):
    d = write(tmp_path / "x", [np.zeros((2, 3, 4, 4), np.float32)] * 2)
    di = write(tmp_path / "ids", [np.arange(7, dtype=np.int64).reshape(1, 7)] * 2)
    cs = CalibrationSet.open([X, IDS], [("x", d), ("ids", di)], count=5)
    assert cs.shapes == {"x": (2, 3, 4, 4), "ids": (1, 7)}
    np.testing.assert_array_equal(next(iter(cs))["ids"], np.arange(7).reshape(1, 7))


def test_inferred_dim_size_must_divide(tmp_path):
    d = write(tmp_path / "x", [np.zeros(50, np.float32)])
    msg = usage_error([X], [(None, d)], count=1)
    assert msg == (
        f"calibration data: input 'x': {d / '000000.bin'} is 200 bytes, not a positive multiple "
        "of 192 (float32 [N,3,4,4] without dimension 0), so dimension 0 cannot be inferred; "
        "pass --inputShape=x:d0,3,4,4 or input_shape in the config"
    )


def test_input_shape_overrides_dynamic_dims(tmp_path):
    s = spec("x", F32, ("N", 3, "H", None))
    d = write(tmp_path / "x", [np.ones((1, 3, 2, 8), np.float32)])
    cs = CalibrationSet.open([s], [(None, d)], count=1, shapes={"x": (1, 3, 2, 8)})
    assert cs.shapes == {"x": (1, 3, 2, 8)}
    assert next(iter(cs))["x"].shape == (1, 3, 2, 8)
    # The same bytes under another user shape are read with that shape.
    cs = CalibrationSet.open([s], [(None, d)], count=1, shapes={"x": (2, 3, 2, 4)})
    assert next(iter(cs))["x"].shape == (2, 3, 2, 4)


def test_two_unknown_dims_need_input_shape(tmp_path):
    s = spec("x", F32, ("N", 3, "H", None))
    d = write(tmp_path / "x", [np.ones((1, 3, 2, 8), np.float32)])
    msg = usage_error([s], [(None, d)], count=1)
    assert msg == (
        "calibration data: input 'x': model shape [N,3,H,?] has 2 dynamic dimensions besides the "
        "batch, too many to infer from the file size; pass --inputShape=x:d0,3,d2,d3 or "
        "input_shape in the config"
    )
    unranked = InputSpec("u", F32, None)
    msg = usage_error([unranked], [(None, d)], count=1)
    assert "input 'u': the model declares no shape (unknown rank)" in msg
    assert "--inputShape=u:d0,d1,..." in msg
    cs = CalibrationSet.open([unranked], [(None, d)], count=1, shapes={"u": (48,)})
    assert next(iter(cs))["u"].shape == (48,)


def test_input_shape_must_agree_with_model(tmp_path):
    _, _, dx, di = two_input_data(tmp_path)
    paths = [(None, dx), (None, di)]
    msg = usage_error([X, IDS], paths, 1, shapes={"x": (1, 3, 4)})
    assert msg == (
        "calibration data: input 'x': input shape [1,3,4] has rank 3 but the model's shape "
        "[N,3,4,4] has rank 4"
    )
    msg = usage_error([X, IDS], paths, 1, shapes={"x": (1, 5, 4, 4)})
    assert msg == (
        "calibration data: input 'x': input shape [1,5,4,4] disagrees with the model's shape "
        "[N,3,4,4] at dimension 1 (5 vs 3)"
    )
    msg = usage_error([X, IDS], paths, 1, shapes={"y": (1, 2)})
    assert msg == (
        "calibration data: an input shape is given for 'y', which is not an input of the model; "
        "model inputs: 'x', 'ids'"
    )
    msg = usage_error([X, IDS], paths, 1, shapes={"x": (1, 3, 0, 4)})
    assert "input 'x': input shape [1,3,?,4] must hold positive integers" in msg
    # A user shape that agrees but does not match the files is a size error.
    msg = usage_error([X, IDS], paths, 1, shapes={"x": (2, 3, 4, 4)})
    assert f"{dx / '000000.bin'} is 192 bytes; expected 384 (float32 [2,3,4,4])" in msg


# ---------------------------------------------------------------- validation errors


def test_pairing_errors(tmp_path):
    _, _, dx, di = two_input_data(tmp_path)
    msg = usage_error([X, IDS], [(None, dx)], 1)
    assert msg == (
        "calibration data: 1 directories given by position for 2 model inputs ('x', 'ids'); "
        "give one directory per input, in the model's input order"
    )
    msg = usage_error([X, IDS], [("x", dx), ("idz", di)], 1)
    assert msg == (
        f"calibration data: 'idz' (directory {di}) is not an input of the model; "
        "model inputs: 'x', 'ids'"
    )
    msg = usage_error([X, IDS], [("x", dx), ("x", di), ("ids", di)], 1)
    assert msg == f"calibration data: input 'x' is given twice: {dx} and {di}"
    msg = usage_error([X, IDS], [("x", dx)], 1)
    assert msg == (
        "calibration data: no directory for model input(s) 'ids'; every input needs one "
        "(model inputs: 'x', 'ids')"
    )
    msg = usage_error([X, IDS], [("x", dx), (None, di)], 1)
    assert "some directories are named by input and some are not" in msg
    assert "no directories given" in usage_error([X], [], 1)


def test_directory_errors(tmp_path):
    s = spec("x", F32, (1, 2))
    missing = tmp_path / "nope"
    assert usage_error([s], [(None, missing)], 1) == (
        f"calibration data: input 'x': directory {missing} does not exist"
    )
    a_file = tmp_path / "file.bin"
    a_file.write_bytes(b"12345678")
    assert usage_error([s], [(None, a_file)], 1) == (
        f"calibration data: input 'x': directory {a_file} is not a directory"
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".DS_Store").write_bytes(b"x")
    assert usage_error([s], [(None, empty)], 1) == (
        f"calibration data: input 'x': directory {empty} has no data files "
        "(hidden files are ignored)"
    )


def test_unequal_file_counts(tmp_path):
    _, _, dx, di = two_input_data(tmp_path, n=3)
    (di / "000002.bin").unlink()
    msg = usage_error([X, IDS], [(None, dx), (None, di)], count=1)
    assert msg == (
        f"calibration data: input 'x' has 3 files in {dx} but input 'ids' has 2 files in {di}; "
        "sample k is file k of every input directory, so the counts must be equal"
    )


def test_wrong_file_size_names_file_and_sizes(tmp_path):
    s = spec("x", F32, (1, 16, 16))
    arrays = [np.zeros((1, 16, 16), np.float32)] * 4 + [np.zeros(250, np.float32)]
    d = write(tmp_path / "dir", arrays, [f"00000{i}.bin" for i in (0, 1, 2, 4, 3)])
    msg = usage_error([s], [(None, d)], count=10, what="calibration data")
    assert msg == (
        f"calibration data: input 'x': {d / '000003.bin'} is 1000 bytes; "
        "expected 1024 (float32 [1,16,16])"
    )
    # Only the files used are checked.
    assert len(CalibrationSet.open([s], [(None, d)], count=3)) == 3
    # A dimension read from the files' sizes says so; `what` prefixes the message.
    dyn = spec("x", F32, (None, 16, 16))
    msg = usage_error([dyn], [(None, d)], count=10, what="eval data")
    assert msg == (
        f"eval data: input 'x': {d / '000003.bin'} is 1000 bytes, not a positive multiple of "
        "1024 (float32 [?,16,16], dimension 0 read from each file's size); pass "
        "--inputShape=x:d0,16,16 or input_shape in the config if the files are of another shape"
    )


def test_samples_of_different_lengths_are_read_each_at_its_own(tmp_path):
    """A sequence model's one dynamic dimension is read from each file's size: its samples
    may differ in length; `shapes` holds the longest (what latency planning costs)."""
    s = spec("x", F32, (1, None, 4))
    lengths = [5, 3, 9, 1]
    arrays = [np.arange(n * 4, dtype=np.float32).reshape(1, n, 4) for n in lengths]
    data = CalibrationSet.open([s], [(None, write(tmp_path / "x", arrays))], count=4)
    got = [sample["x"] for sample in data]
    assert [a.shape for a in got] == [(1, n, 4) for n in lengths]
    assert all((a == b).all() for a, b in zip(got, arrays, strict=True))
    assert data.shapes == {"x": (1, 9, 4)} and data.shortest == {"x": 1}
    assert data.axes == {"x": 1} and data.inferred == {"x"}
    assert [sample["x"].shape for sample in data.subset([2, 1])] == [(1, 9, 4), (1, 3, 4)]


@pytest.mark.parametrize(
    ("dtype", "bad", "kind"),
    [(np.float32, np.nan, "NaN"), (np.float32, -np.inf, "Inf"), (np.float16, np.inf, "Inf")],
)
def test_non_finite_values_rejected(tmp_path, dtype, bad, kind):
    s = spec("x", dtype, (1, 2, 3))
    arrays = [np.zeros((1, 2, 3), dtype) for _ in range(3)]
    arrays[1][0, 1, 2] = bad
    arrays[1][0, 1, 1] = 0  # the first bad index is flat 5
    d = write(tmp_path / "x", arrays)
    msg = usage_error([s], [(None, d)], 3)
    assert msg == (
        f"calibration data: input 'x': {d / '000001.bin'} holds {kind} at index [0,1,2] "
        f"(flat 5; 1 non-finite values in the file, {np.dtype(dtype).name} [1,2,3]); "
        "calibration data must be finite"
    )
    # Not checked when the caller opts out, nor beyond `count`.
    assert len(CalibrationSet.open([s], [(None, d)], 3, check_values=False)) == 3
    assert len(CalibrationSet.open([s], [(None, d)], 1)) == 1


def test_bool_bytes_must_be_0_or_1(tmp_path):
    s = spec("m", bool, (4,))
    d = write(tmp_path / "m", [np.array([1, 0, 2, 1], np.uint8)])
    msg = usage_error([s], [(None, d)], 1)
    assert msg == (
        f"calibration data: input 'm': {d / '000000.bin'} has byte 2 at index [2] "
        "(flat 2; 1 such bytes); bool data must be 0 or 1"
    )


def test_unusable_types_and_counts(tmp_path):
    d = write(tmp_path / "s", [np.zeros(4, np.uint8)])
    with pytest.raises(PtqError, match=r"input 's' has type object, which raw \.bin files"):
        CalibrationSet.open([spec("s", object, (4,))], [(None, d)], 1)
    with pytest.raises(PtqUsageError, match="count must be at least 1, not 0"):
        CalibrationSet.open([spec("s", np.uint8, (4,))], [(None, d)], 0)


def test_messages_stay_on_one_line(tmp_path):
    d = tmp_path / "a\nb"
    msg = usage_error([spec("x\ny", F32, (1,))], [(None, d)], 1)
    assert "'x\\ny'" in msg and "'" + str(tmp_path) + "/a\\nb'" in msg


# ---------------------------------------------------------------- streaming


def test_iteration_streams_without_keeping_samples(tmp_path):
    n, width = 2000, 1024  # 8 MB of data in 4 KB samples
    d = tmp_path / "x"
    d.mkdir()
    row = np.arange(width, dtype=np.float32)
    for i in range(n):
        (row + i).tofile(d / f"{i:06d}.bin")
    cs = CalibrationSet.open([spec("x", F32, ("N", width))], [(None, d)], count=n)
    assert len(cs) == n and cs.shapes == {"x": (1, width)}

    refs = []
    tracemalloc.start()
    try:
        for k, sample in enumerate(cs):
            assert sample["x"][0, 0] == k
            refs.append(weakref.ref(sample["x"]))
            if k:
                assert refs[k - 1]() is None  # the previous sample is gone
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del sample
    assert all(r() is None for r in refs)
    # Kept samples would cost n * 4 KB = 8 MB; the bound leaves room for the
    # interpreter's own allocations (about 0.2 MB, which varies by machine).
    assert peak < 1_000_000


def test_dynamic_batch_is_one_when_another_dim_is_inferred(tmp_path):
    s = spec("ids", np.dtype(np.int64), ("batch", "seq"))
    d = write(tmp_path / "ids", [np.arange(64, dtype=np.int64).reshape(1, 64)])
    cs = CalibrationSet.open([s], [(None, d)], count=1)
    assert cs.shapes == {"ids": (1, 64)}
    assert next(iter(cs))["ids"].tolist() == [list(range(64))]


def test_a_file_layout_for_a_model_without_4d_inputs_is_said_to_do_nothing():
    assert SampleFormat("bin", (), "NHWC").describe() == (
        ".bin samples in the inputs' shapes (--inputDataFormat=NHWC applies to 4-D inputs "
        "only; the model has none)")
    assert SampleFormat("bin", (), None).describe() == ".bin samples in the inputs' shapes"


@settings(max_examples=200, deadline=None)
@given(st.integers(16, 400), st.floats(1e-3, 1e3), st.integers(0, 2**31 - 1))
def test_float32_saved_as_float64_is_told_from_float32(count, spread, seed):
    from ptqconv.calibrate.dataset import _float64_of_float32

    values = (np.random.default_rng(seed).standard_normal(count * 2) * spread).astype(np.float32)
    assert not _float64_of_float32(values)
    assert _float64_of_float32(values[:count].astype(np.float64).view(np.float32))


@settings(max_examples=200, deadline=None)
@given(st.integers(8, 400), st.integers(3, 2**16), st.sampled_from([1, 16, 255]),
       st.integers(0, 2**31 - 1))
def test_short_values_saved_as_float64_are_told_where_the_batch_is_read(count, top, divisor,
                                                                        seed):
    """Pixels 0-255 (or k/16) saved as float64 have all-zero low words: their float32 reading
    is 0 at every even place, which masks and sparse float32 data can also be. Told only
    where the batch is read from the file size, the one case the size check lets through."""
    from ptqconv.calibrate.dataset import _float64_of_float32

    rng = np.random.default_rng(seed)
    short = rng.integers(0, top + 1, count).astype(np.float64) / divisor
    short[:8] = (np.arange(8) % 3 + 1) / divisor  # 8 not 0, 3 of them distinct
    assert _float64_of_float32(short.view(np.float32), loose=True)
    assert not _float64_of_float32(short.view(np.float32))
    sparse = np.zeros(count * 2, np.float32)
    sparse[1::2] = rng.integers(0, 2, count)  # a 0 / 1 mask at odd places
    assert not _float64_of_float32(sparse, loose=True)
    # Full float64 fractions (x / 255 in float64): random low words.
    full = rng.uniform(0, 1, max(count, 64)) + np.arange(max(count, 64)) % 3
    assert _float64_of_float32(full.view(np.float32), loose=True)
    normal = rng.standard_normal(count * 2).astype(np.float32)
    assert not _float64_of_float32(normal, loose=True)
